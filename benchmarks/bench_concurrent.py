"""Two trainings at once on one machine: each must keep at least 0.4 of its solo speed.

    python3 benchmarks/bench_concurrent.py [--batch_size 64] [--steps 8] [--rounds 1]

Runs ``bench_train.py`` (the run.sh model's training step, compute-only, with the project's
thread rule and OpenMP wait policy) alone, then two of them at the same time, and compares
each one's ``samples_per_s`` with its solo figure. Each round runs solo A, solo B, then A and
B together, so a change in the machine's load hits both sides of a ratio alike. The last lines
are ``solo_samples_per_s``, ``concurrent_samples_per_s`` (both processes) and
``concurrent_ratio_min`` (the slower process's together / solo; goal >= 0.4).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import machine_line  # noqa: E402


def parse(out: str) -> Dict[str, str]:
    """The ``name value`` lines of a benchmark's output."""
    fields = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            fields[parts[0]] = parts[1]
    return fields


def run_together(cmds: List[List[str]]) -> List[float]:
    """Starts every command at once; returns each one's ``samples_per_s``."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"bench_train failed ({p.returncode}):\n{out}")
    return [float(parse(out)["samples_per_s"]) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--extra", default="", help="extra train.py flags, quoted")
    args = parser.parse_args()
    cmd = [sys.executable, os.path.join(HERE, "bench_train.py"), "--batch_size",
           str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.extra:
        cmd += ["--extra", args.extra]
    print(machine_line(), flush=True)
    solos: List[float] = []
    together: List[float] = []
    ratios: List[float] = []
    for r in range(args.rounds):
        solo = [run_together([cmd])[0] for _ in range(2)]
        both = run_together([cmd, cmd])
        solos += solo
        together += both
        ratios += [b / s for b, s in zip(both, solo)]
        print(f"round {r + 1}: solo {solo[0]:.2f}, {solo[1]:.2f} samples/s; together "
              f"{both[0]:.2f}, {both[1]:.2f} samples/s; ratios "
              f"{both[0] / solo[0]:.3f}, {both[1] / solo[1]:.3f}", flush=True)
    print(machine_line())
    print(f"solo_samples_per_s {statistics.median(solos):.2f}")
    print(f"concurrent_samples_per_s {statistics.median(together):.2f}")
    print(f"concurrent_ratio_min {min(ratios):.3f}")


if __name__ == "__main__":
    main()
