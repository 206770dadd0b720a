"""Inference throughput of the run.sh model (online-schema vocabularies), float32, end to end.

    python3 benchmarks/bench_infer.py

Builds the run.sh model, saves it as a platform checkpoint, then times ``infer.run_inference``
on generated data with competition-like history lengths: reading parquet, conversion (in
DataLoader workers), the float32 forward pass and writing ``predictions.json``.
It also prints the arithmetic ceiling of this machine: the model's matrix-product and
attention FLOPs per row (``torch.utils.flop_counter`` on one batch) against the float32
matrix-product rate of the CPU (a 2048^3 product), i.e. the rows/s that a forward pass running
every FLOP at the matrix-product peak would reach. The last line is ``rows_per_s <x>``, end to
end (model rebuild and loading included).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from common import ROOT, ensure_online_data, peak_rss_gb

import torch
from torch.utils.flop_counter import FlopCounterMode

import infer
from pcvr import checkpoint
from pcvr.batch import Batch
from pcvr.config import parse_config
from pcvr.data.loaders import get_eval_loader
from pcvr.model.build import build_model
from pcvr.runtime import set_seed
from pcvr.schema import load_layout


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 rate of an n x n x n matrix product on this machine, in GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def forward_gflop_per_row(model: torch.nn.Module, batch: Batch) -> float:
    """Matrix-product and attention GFLOP per row of one float32 inference forward pass."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.eval().predict(batch)
    return counter.get_total_flops() / batch.size / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seq_len_scale", type=float, default=1.0)
    args = parser.parse_args()

    data_dir = ensure_online_data(rows=args.rows, seq_len_scale=args.seq_len_scale, seed=1)
    cfg = parse_config(["--preset", "seed", "--data_dir", data_dir, "--batch_size",
                        str(args.batch_size), "--num_workers",
                        str(args.num_workers)], environ={})
    set_seed(0)
    layout, raw_schema = load_layout(os.path.join(data_dir, "schema.json"), cfg.data)
    model = build_model(cfg, layout)
    batch = next(iter(get_eval_loader(data_dir, layout, cfg.data, args.batch_size, 0)))
    gflop, peak = forward_gflop_per_row(model, batch), matmul_gflops()
    print(f"forward {gflop:.3f} GFLOP/row (matrix products and attention); float32 matrix "
          f"products {peak:.0f} GFLOP/s here: fp32_ceiling_rows_per_s {peak / gflop:.0f}")
    with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, ".demo_data")) as tmp:
        ckpt = os.path.join(tmp, "global_step0.bench")
        checkpoint.save(ckpt, model.state_dict(), cfg, raw_schema, {},
                        checkpoint.CheckpointMeta())
        del model
        t0 = time.perf_counter()
        checkpoint.load_model(checkpoint.read(ckpt))
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = infer.run_inference(ckpt, data_dir, os.path.join(tmp, "out"))
        elapsed = time.perf_counter() - t0
        n = len(json.load(open(os.path.join(tmp, "out", "predictions.json")))["predictions"])
    assert n == pred.user_id.size
    print(f"{n} rows in {elapsed:.2f} s (model rebuild and load included), batch "
          f"{args.batch_size}, {args.num_workers} workers, threads {torch.get_num_threads()}")
    print(f"model rebuild and load {load_s:.2f} s; without it "
          f"{n / max(elapsed - load_s, 1e-9):.1f} rows/s")
    print(f"peak_rss_gb {peak_rss_gb():.2f}")
    print(f"rows_per_s {n / elapsed:.2f}")


if __name__ == "__main__":
    main()
