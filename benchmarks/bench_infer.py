"""Inference throughput of the run.sh model (online-schema vocabularies), float32, end to end
and forward-only, against this machine's float32 arithmetic ceiling.

    python3 benchmarks/bench_infer.py [--rows 4096] [--profile 25]

Builds the run.sh model, saves it as a platform checkpoint, then times
``infer.run_inference`` on generated data with competition-like history lengths: model
rebuild and loading, reading parquet, conversion (in DataLoader workers), the float32 forward
pass and writing ``predictions.json`` (``rows_per_s``, end to end). The same run times the
forward pass alone (``model.predict`` under ``inference_mode`` on batches converted
beforehand, ``forward rows/s``), and the arithmetic ceiling: the model's matrix-product and
attention FLOPs per row (``torch.utils.flop_counter`` on one batch) against the float32
matrix-product rate measured here (a 2048^3 product), i.e. the rows/s of a forward pass that
ran every FLOP at that peak. The last lines are ``rows_per_s``, ``fp32_ceiling_rows_per_s``,
``forward_ratio_to_ceiling`` (forward rows/s over the ceiling) and ``pipeline_ratio`` (end to
end rows/s over forward rows/s; ``--rows`` large enough that the model load does not
dominate).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from common import (ROOT, count_flops, ensure_online_data, machine_line, matmul_gflops,
                    peak_rss_gb, profile_table, sync)

import torch

import infer
from pcvr import checkpoint
from pcvr.config import parse_config
from pcvr.data.loaders import get_eval_loader
from pcvr.model.build import build_model
from pcvr.runtime import resolve_device, set_seed
from pcvr.schema import load_layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seq_len_scale", type=float, default=1.0)
    parser.add_argument("--forward_batches", type=int, default=8,
                        help="batches timed by the forward-only pass (before and again after "
                             "the end-to-end pass; the mean of the two counts)")
    parser.add_argument("--device", default="cpu",
                        help="device of the forward-only pass (end to end, infer.py takes "
                             "CUDA when it is available)")
    parser.add_argument("--profile", type=int, default=0,
                        help="print the N ops that take most time in the forward pass")
    args = parser.parse_args()

    data_dir = ensure_online_data(rows=args.rows, seq_len_scale=args.seq_len_scale, seed=1)
    cfg = parse_config(["--preset", "seed", "--data_dir", data_dir, "--batch_size",
                        str(args.batch_size), "--num_workers",
                        str(args.num_workers)], environ={})
    set_seed(0)
    print(machine_line(), flush=True)
    layout, raw_schema = load_layout(os.path.join(data_dir, "schema.json"), cfg.data)
    device = resolve_device(args.device)
    model = build_model(cfg, layout).eval().to(device)
    batches = []
    for b in get_eval_loader(data_dir, layout, cfg.data, args.batch_size, 0):
        if b.size == args.batch_size:
            batches.append(b.to(device))
        if len(batches) == args.forward_batches + 1:
            break
    predict = model.predict

    @torch.inference_mode()
    def forward_rows_per_s() -> float:
        sync(device)
        t0 = time.perf_counter()
        for b in batches[1:]:
            predict(b)
        sync(device)
        return args.batch_size * (len(batches) - 1) / (time.perf_counter() - t0)

    with torch.inference_mode():
        gflop = count_flops(lambda: predict(batches[0]))["total"] / args.batch_size / 1e9
        predict(batches[0])  # warm-up
        if args.profile:
            print(profile_table(lambda: predict(batches[1]), rows=args.profile),
                  flush=True)
    forward_rps = [forward_rows_per_s()]
    peak = matmul_gflops(torch.float32, n=8192 if device.type == "cuda" else 2048,
                         device=device.type)
    ceiling = peak / gflop
    print(f"forward {gflop:.3f} GFLOP/row (matrix products and attention); float32 matrix "
          f"products {peak:.0f} GFLOP/s here", flush=True)

    with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, ".demo_data")) as tmp:
        ckpt = os.path.join(tmp, "global_step0.bench")
        checkpoint.save(ckpt, model.state_dict(), cfg, raw_schema, {},
                        checkpoint.CheckpointMeta())
        t0 = time.perf_counter()
        checkpoint.load_model(checkpoint.read(ckpt))
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred = infer.run_inference(ckpt, data_dir, os.path.join(tmp, "out"))
        elapsed = time.perf_counter() - t0
        n = len(json.load(open(os.path.join(tmp, "out", "predictions.json")))["predictions"])
    assert n == pred.user_id.size
    rps = n / elapsed
    forward_rps.append(forward_rows_per_s())
    print(f"forward only: {forward_rps[0]:.1f} rows/s before the end-to-end pass, "
          f"{forward_rps[1]:.1f} after ({len(batches) - 1} batches of {args.batch_size})")
    forward_rps = sum(forward_rps) / len(forward_rps)
    print(f"end to end: {n} rows in {elapsed:.2f} s (model rebuild and load included), batch "
          f"{args.batch_size}, {args.num_workers} workers, threads {torch.get_num_threads()}; "
          f"model rebuild and load alone {load_s:.2f} s, without it "
          f"{n / max(elapsed - load_s, 1e-9):.1f} rows/s")
    print(f"peak_rss_gb {peak_rss_gb():.2f}")
    print(f"rows_per_s {rps:.2f}")
    print(f"fp32_ceiling_rows_per_s {ceiling:.1f}")
    print(f"forward_ratio_to_ceiling {forward_rps / ceiling:.3f}")
    print(f"pipeline_ratio {rps / forward_rps:.3f}")


if __name__ == "__main__":
    main()
