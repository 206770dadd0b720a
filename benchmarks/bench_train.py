"""Training throughput of the run.sh model (online-schema vocabularies) against this machine's
arithmetic ceiling in the dtype it trains in.

    python3 benchmarks/bench_train.py --batch_size 64 [--loader_workers 2] [--profile 25]

Data: demo data generated with the online schema's real vocabulary sizes (about 240M
embedding parameters) and competition-like history lengths. The timed figure is the training
step alone (forward, backward, clipping, both optimiser steps) on batches converted once and
held on the device ("compute-only"); with ``--loader_workers N`` a second pass feeds the same
steps from the DataLoader with N workers ("loader-fed"), and ``loader_ratio`` is its speed
over the compute-only one (the data pipeline has its own benchmark, bench_data.py).

The trainer chooses the precision as train.py does (the seed asks for bf16 where the device
runs it fast; ``--extra "--train_precision float32"`` forces float32). The ceiling: the
FLOPs of one training step per sample (forward + backward, matrix products and attention,
``torch.utils.flop_counter``) against the matrix-product rate of that dtype measured in the
same run (an n x n x n product, n = 2048), i.e. the samples/s of a step that ran every FLOP
at the matrix-product peak. The last lines are ``samples_per_s``, ``peak_rss_gb``,
``train_dtype`` and ``ratio_to_ceiling``.
"""
from __future__ import annotations

import argparse
import os
import time

from common import (DTYPES, ROOT, count_flops, ensure_online_data, machine_line,
                    matmul_gflops, peak_rss_gb, profile_table, sync)

import torch

from pcvr import runtime
from pcvr.config import parse_config
from pcvr.data.loaders import get_pcvr_data
from pcvr.model.build import build_model
from pcvr.runtime import count_params, resolve_device, set_seed
from pcvr.schema import load_layout
from pcvr.training.losses import training_loss
from pcvr.training.trainer import Trainer


def timed_steps(trainer, batches, warmup: int, device) -> float:
    """Runs ``warmup`` untimed then the remaining steps; returns the timed seconds."""
    for b in batches[:warmup]:
        trainer.train_step(b)
    sync(device)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        trainer.train_step(b)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--seq_len_scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0 = the project's rule, pcvr.runtime)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--loader_workers", type=int, default=-1,
                        help=">= 0: also time the steps fed by the DataLoader with this many "
                             "workers (-1 = compute-only)")
    parser.add_argument("--profile", type=int, default=0,
                        help="print the N ops that take most time over two steps")
    parser.add_argument("--extra", default="", help="extra train.py flags, quoted")
    args = parser.parse_args()
    device = resolve_device(args.device)
    workers = max(0, args.loader_workers)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif hasattr(runtime, "configure_threads"):
        runtime.configure_threads(workers, device)

    n_batches = args.steps + args.warmup
    # The loader-fed pass needs a few row groups per worker to reach its steady state.
    data_dir = ensure_online_data(rows=max(512, args.batch_size * n_batches
                                           * (2 if args.loader_workers >= 0 else 1)),
                                  seq_len_scale=args.seq_len_scale)
    cfg = parse_config(["--preset", "seed", "--data_dir", data_dir, "--batch_size",
                        str(args.batch_size), "--num_workers", str(workers),
                        "--valid_ratio", "0", "--buffer_batches", "0",
                        "--ckpt_dir", os.path.join(ROOT, "outputs", "bench")]
                       + args.extra.split(), environ={})
    set_seed(0)
    layout, _ = load_layout(os.path.join(data_dir, "schema.json"), cfg.data)
    loader, _, _ = get_pcvr_data(data_dir, layout, cfg.data, cfg.train)
    host_batches = [b for b in loader if b.size == args.batch_size]
    while len(host_batches) < n_batches:  # reuse batches if the data is short
        host_batches += host_batches
    host_batches = host_batches[:n_batches]
    batches = [b.to(device) for b in host_batches]

    model = build_model(cfg, layout).to(device)
    trainer = Trainer(model, cfg, [], None, device)
    dtype = "bf16" if trainer.use_bf16 else "float32"
    print(machine_line(), flush=True)
    print(f"model: {count_params(model.parameters()) / 1e6:.1f}M parameters "
          f"({count_params(model.sparse_parameters()) / 1e6:.1f}M in embedding tables); "
          f"train dtype {dtype}, compile {getattr(cfg.train, 'compile', False)}, batch "
          f"{args.batch_size}, device {device}", flush=True)

    # FLOPs of one training forward + backward per sample, on the eager model (the
    # compiled one runs the same products).
    def one_step_flops() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                            enabled=trainer.use_bf16):
            out = model(batches[0])
        training_loss(out, batches[0].label, cfg.train)[0].backward()
    flops = count_flops(one_step_flops)
    model.zero_grad(set_to_none=True)
    per_sample = flops["total"] / args.batch_size

    compute_s = timed_steps(trainer, batches, args.warmup, device)
    sps = args.batch_size * args.steps / compute_s
    print(f"compute-only: {args.steps} steps in {compute_s:.2f} s, {compute_s / args.steps:.3f} "
          f"s/step, {sps:.2f} samples/s", flush=True)
    if args.loader_workers >= 0:
        pin = device.type == "cuda"
        fed = []
        t0 = None
        for i, b in enumerate(loader):
            if b.size != args.batch_size:
                continue
            if i == args.warmup:
                sync(device)
                t0 = time.perf_counter()
            trainer.train_step((b.pin_memory() if pin and not b.user_int.is_pinned() else b)
                               .to(device, non_blocking=True))
            fed.append(b.size)
            if len(fed) == n_batches:
                break
        sync(device)
        timed = len(fed) - args.warmup
        loader_s = time.perf_counter() - t0 if t0 is not None and timed > 0 else float("nan")
        loader_sps = args.batch_size * timed / loader_s
        print(f"loader-fed ({workers} workers): {timed} steps, {loader_sps:.2f} samples/s; "
              f"loader_ratio {loader_sps / sps:.3f}", flush=True)
    if args.profile:
        print(profile_table(lambda: [trainer.train_step(b) for b in batches[:2]],
                            rows=args.profile), flush=True)

    n = 8192 if device.type == "cuda" else 2048  # a GPU needs a larger product to peak
    # The other dtype on a 4x smaller product: it is only shown, and an emulated bf16 (2
    # GFLOP/s) would take minutes at full size.
    rates = {name: matmul_gflops(dt, n=n if name == dtype else n // 4, device=device.type)
             for name, dt in DTYPES.items()}
    ceiling = rates[dtype] * 1e9 / per_sample
    print(f"FLOPs per sample (forward + backward, matrix products and attention): "
          f"{per_sample / 1e9:.3f} GFLOP ({flops['attention'] / args.batch_size / 1e9:.3f} "
          f"in attention)")
    print("matrix products here: " + ", ".join(f"{k} {v:.0f} GFLOP/s"
                                               for k, v in rates.items())
          + f"; ceiling in {dtype}: {ceiling:.1f} samples/s")
    if device.type == "cuda":
        print(f"peak_gpu_memory_gb {torch.cuda.max_memory_allocated(device) / 1e9:.2f}")
    print(f"samples_per_s {sps:.2f}")
    print(f"peak_rss_gb {peak_rss_gb():.2f}")
    print(f"train_dtype {dtype}")
    print(f"ratio_to_ceiling {sps / ceiling:.3f}")


if __name__ == "__main__":
    main()
