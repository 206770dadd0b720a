"""Data pipeline throughput against the cost of merely reading the parquet.

    python3 benchmarks/bench_data.py [--rows 4096] [--event_order oldest_first] [--workers 2]

Data: ``demo_data.py`` with the online schema's vocabulary sizes and competition-like history
lengths (means a/b ~300, c ~510, d ~2,450, capped at 4,000), cached under ``.demo_data/``.
Stages, each in its own process so that its peak RSS is its own:

* ``ceiling``: pyarrow ``iter_batches`` over the same columns plus ``to_numpy`` of every
  column's values and offsets, nothing else (one process, no threads, like the pipeline);
* ``pipeline``: the training dataset (row-group shuffle + shuffle buffer) in one process;
* ``eval``: the inference dataset (no shuffle) in one process;
* ``workers``: the training DataLoader with ``--workers`` workers.

Rows/s are medians over ``--rounds`` rounds (the stages run in turn in each round; the best
pass of a round counts); each ratio is the median of the per-round ratios, so a busy spell
of the machine hits both sides of a ratio alike. The last line is
``ratio_to_ceiling <pipeline rows/s / ceiling rows/s>``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pcvr.config import DataConfig  # noqa: E402
from pcvr.data.files import list_parquet_files, required_columns, scan_parquet  # noqa: E402
from pcvr.data.loaders import make_loader  # noqa: E402
from pcvr.data.stream import PCVRDataset  # noqa: E402
from pcvr.schema import load_layout  # noqa: E402


def ensure_data(rows: int, rows_per_group: int, event_order: str, seed: int) -> str:
    """Generates (once, cached under .demo_data/) competition-like data with demo_data.py.

    The online schema's real vocabulary sizes and history lengths (``--vocab_cap 0
    --seq_len_scale 1``), in a subprocess so that the generator's memory stays out of the way.
    """
    out = os.path.join(ROOT, ".demo_data", f"bench_data_r{rows}_g{rows_per_group}_"
                                           f"{event_order}_s{seed}")
    if not os.path.isdir(out):
        tmp = out + ".tmp"
        subprocess.run([sys.executable, os.path.join(ROOT, "demo_data.py"), "--out", tmp,
                        "--rows", str(rows), "--seed", str(seed), "--vocab_cap", "0",
                        "--seq_len_scale", "1", "--event_order", event_order,
                        "--rows_per_group", str(rows_per_group), "--eval_rows", "0",
                        "--files", "1"], check=True, stdout=subprocess.DEVNULL)
        os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- stages
STAGES = ("ceiling", "pipeline", "eval", "workers")


def _peak_rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def run_stage(stage: str, data: str, batch_size: int, workers: int, passes: int,
              buffer_batches: int) -> Dict[str, Any]:
    """Times ``passes`` passes over the data (after one warm-up pass) in this process."""
    cfg = DataConfig()
    layout, _ = load_layout(os.path.join(data, "schema.json"), cfg)
    files = list_parquet_files(data)
    columns = list(required_columns(layout, read_labels=True))
    row_groups, _ = scan_parquet(files, required_columns(layout, read_labels=True))
    rows = sum(rg.num_rows for rg in row_groups)
    if stage == "ceiling":
        def one_pass(epoch: int) -> None:
            for path in files:
                for rb in pq.ParquetFile(path).iter_batches(batch_size=batch_size,
                                                            columns=columns, use_threads=False):
                    for arr in rb.columns:
                        if pa.types.is_list(arr.type):
                            arr.offsets.to_numpy()
                            arr = arr.values
                        arr.to_numpy(zero_copy_only=False)  # a copy only where there are nulls
    else:
        train = stage != "eval"
        ds = PCVRDataset(row_groups, layout, cfg, batch_size, shuffle=train,
                         buffer_batches=buffer_batches if train else 0)
        loader = make_loader(ds, workers if stage == "workers" else 0, pin_memory=False)

        def one_pass(epoch: int) -> None:
            loader.set_epoch(epoch)
            n = sum(b.size for b in loader)
            assert n == rows, (n, rows)

    one_pass(0)  # warm-up: page cache, lazy imports, allocator
    times = []
    for epoch in range(1, passes + 1):
        t0 = time.perf_counter()
        one_pass(epoch)
        times.append(time.perf_counter() - t0)
    return {"rows": rows, "times": times, "peak_rss_mb": _peak_rss_mb(resource.RUSAGE_SELF),
            "peak_worker_rss_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN)}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--rows_per_group", type=int, default=512)
    p.add_argument("--event_order", default="oldest_first",
                   choices=("newest_first", "oldest_first", "unordered"))
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--buffer_batches", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--passes", type=int, default=1, help="timed passes per stage and round")
    p.add_argument("--rounds", type=int, default=5,
                   help="the stages run in turn this many times; each round's best pass "
                        "counts and the median round is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.stage is not None:  # child process: one stage, one JSON line
        print(json.dumps(run_stage(a.stage, a.data, a.batch_size, a.workers, a.passes,
                                   a.buffer_batches)))
        return

    t0 = time.perf_counter()
    data = ensure_data(a.rows, a.rows_per_group, a.event_order, a.seed)
    print(f"data {os.path.relpath(data, ROOT)}: {a.rows} rows, row groups of "
          f"{a.rows_per_group}, {a.event_order} ({time.perf_counter() - t0:.1f} s); batch "
          f"{a.batch_size}, shuffle buffer {a.buffer_batches} batches", flush=True)
    runs: Dict[str, List[Dict[str, Any]]] = {s: [] for s in STAGES}
    for _ in range(a.rounds):  # interleaved, so that a busy spell hits every stage alike
        for stage in STAGES:
            cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--data", data,
                   "--batch_size", str(a.batch_size), "--workers", str(a.workers),
                   "--passes", str(a.passes), "--buffer_batches", str(a.buffer_batches)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[stage].append(json.loads(out.strip().splitlines()[-1]))
    # A busy spell slows every stage of a round alike but lands in different rounds for
    # different stages: the ratios are taken within each round, and the median over rounds
    # is reported (a best-of over all rounds would pair the ceiling's luckiest spell with
    # the pipeline's).
    rate = {s: [r["rows"] / min(r["times"]) for r in runs[s]] for s in STAGES}
    for stage in STAGES:
        rss = max(r["peak_rss_mb"] for r in runs[stage])
        label = {"ceiling": "ceiling (read+decode)", "pipeline": "pipeline (train, 1 proc)",
                 "eval": "pipeline (eval, 1 proc)",
                 "workers": f"pipeline (train, {a.workers} workers)"}[stage]
        extra = ""
        if stage == "workers":
            extra = f", largest worker {max(r['peak_worker_rss_mb'] for r in runs[stage]):.0f} MB"
        median = statistics.median(rate[stage])
        print(f"{label:<28} {median:8.0f} rows/s  {1e3 * a.batch_size / median:6.1f} "
              f"ms/batch  peak RSS {rss:5.0f} MB{extra}", flush=True)
    ratio = {s: statistics.median(p / c for p, c in zip(rate[s], rate["ceiling"]))
             for s in STAGES}
    print("per-round ratio_to_ceiling: " + ", ".join(
        f"{p / c:.3f}" for p, c in zip(rate["pipeline"], rate["ceiling"])))
    print(f"eval_ratio_to_ceiling {ratio['eval']:.3f}")
    print(f"workers_ratio_to_ceiling {ratio['workers']:.3f}")
    print(f"ratio_to_ceiling {ratio['pipeline']:.3f}")


if __name__ == "__main__":
    main()
