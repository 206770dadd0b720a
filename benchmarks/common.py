"""Shared pieces of the training and inference benchmarks."""
from __future__ import annotations

import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def ensure_online_data(rows: int, seq_len_scale: float, seed: int = 0) -> str:
    """Generates (once, cached) demo data with the online schema's real vocabulary sizes.

    Runs in a subprocess so that the generator's memory does not count in the peak RSS.
    """
    out = os.path.join(ROOT, ".demo_data", f"bench_online_r{rows}_s{seq_len_scale:g}_seed{seed}")
    if not os.path.isfile(os.path.join(out, "schema.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "demo_data.py"), "--out", out,
                        "--rows", str(rows), "--seed", str(seed), "--vocab_cap", "0",
                        "--seq_len_scale", str(seq_len_scale), "--eval_rows", "0"],
                       check=True)
    return out


def peak_rss_gb() -> float:
    """Peak resident set size of this process in GB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
