"""Training throughput and peak memory of the run.sh model with the online schema's vocabularies.

    python3 benchmarks/bench_train.py --batch_size 64

Data: demo data generated with the online schema's real vocabulary sizes (about 240M
embedding parameters) and competition-like history lengths, converted by the data pipeline
once and held in memory, so that the figure is the training step alone (forward, backward,
clipping, both optimiser steps); the data pipeline has its own benchmark (bench_data.py).
The last two lines are ``samples_per_s <x>`` and ``peak_rss_gb <y>``.
"""
from __future__ import annotations

import argparse
import os
import time

from common import ROOT, ensure_online_data, peak_rss_gb

import torch

from pcvr.config import parse_config
from pcvr.data.loaders import get_pcvr_data
from pcvr.model.build import build_model
from pcvr.runtime import count_params, set_seed
from pcvr.schema import load_layout
from pcvr.training.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--seq_len_scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--extra", default="", help="extra train.py flags, quoted")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    n_batches = args.steps + args.warmup
    data_dir = ensure_online_data(rows=max(512, args.batch_size * n_batches),
                                  seq_len_scale=args.seq_len_scale)
    cfg = parse_config(["--preset", "seed", "--data_dir", data_dir, "--batch_size",
                        str(args.batch_size), "--num_workers", "0",
                        "--valid_ratio", "0", "--buffer_batches", "0",
                        "--ckpt_dir", os.path.join(ROOT, "outputs", "bench")]
                       + args.extra.split(), environ={})
    set_seed(0)
    layout, _ = load_layout(os.path.join(data_dir, "schema.json"), cfg.data)
    loader, _, _ = get_pcvr_data(data_dir, layout, cfg.data, cfg.train)
    batches = [b for b in loader if b.size == args.batch_size]
    while len(batches) < n_batches:  # reuse batches if the data is short
        batches += batches
    batches = batches[:n_batches]

    model = build_model(cfg, layout)
    trainer = Trainer(model, cfg, [], None, torch.device("cpu"))
    print(f"model: {count_params(model.parameters()) / 1e6:.1f}M parameters "
          f"({count_params(model.sparse_parameters()) / 1e6:.1f}M in embedding tables), "
          f"bf16 autocast {trainer.use_bf16}, threads {torch.get_num_threads()}", flush=True)
    for b in batches[:args.warmup]:
        trainer.train_step(b)
    times = []
    for b in batches[args.warmup:]:
        t0 = time.perf_counter()
        trainer.train_step(b)
        times.append(time.perf_counter() - t0)
    total = sum(times)
    print(f"step seconds: median {sorted(times)[len(times) // 2]:.3f}, "
          f"min {min(times):.3f}, max {max(times):.3f} over {len(times)} steps")
    print(f"samples_per_s {args.batch_size * len(times) / total:.2f}")
    print(f"peak_rss_gb {peak_rss_gb():.2f}")


if __name__ == "__main__":
    main()
