"""Running a table or a learning curve, and the command line of ``benchmarks/ablate.py``."""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pcvr.ablation.cells import Cell, Settings, load_cached, plan_cells, run_cell
from pcvr.ablation.data import DEMO_TZ, ensure_demo_data
from pcvr.ablation.report import (Row, aggregate, curve_markdown, markdown_table, write_csv,
                                  write_curve_csv, write_curve_png, write_png)
from pcvr.ablation.variants import BASE, Variant, load_variants, parse_variant, with_base
from pcvr.config import PROJECT_DIR

DEFAULT_BASE = "--preset seed --num_epochs 1"
DEFAULT_DEMO_ROWS = 50000
QUICK_DEMO_ROWS, QUICK_EVAL_ROWS = 6000, 2000


def run_table(variants: Sequence[Variant], st: Settings, prefix: str, title: str = "",
              log=print) -> List[Row]:
    """Runs (or takes from the cache) every cell and writes ``prefix.{md,csv,png}`` after
    each finished cell; returns the rows."""
    variants = with_base(variants)
    cells = plan_cells(variants, st)
    results: Dict[str, Dict[str, Any]] = {}
    todo = []
    for c in cells:
        cached = load_cached(c)
        if cached is not None:
            results[c.key] = cached
        else:
            todo.append(c)
    log(f"ablation: {len(cells)} cells, {len(cells) - len(todo)} cached, {len(todo)} to run "
        f"({st.jobs} at a time, {st.threads} thread(s) and {st.workers} loader worker(s) "
        f"each)")
    lock = threading.Lock()
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)

    def write() -> List[Row]:
        rows = aggregate(variants, list(results.values()), st.seeds)
        md = markdown_table(rows)
        with open(prefix + ".md", "w", encoding="utf-8") as fh:
            fh.write((f"{title}\n\n" if title else "") + md)
        write_csv(rows, prefix + ".csv")
        write_png(rows, prefix + ".png", title)
        return rows

    def one(c: Cell) -> None:
        try:
            res = run_cell(c, st)
        except Exception as exc:  # noqa: BLE001 - one cell's failure never ends the table
            res = {"variant": c.variant.name, "seed": c.seed, "status": "error",
                   "error": f"runner: {type(exc).__name__}: {exc}"}
        with lock:
            results[c.key] = res
            done = sum(1 for k in results if results[k].get("status") == "ok")
            msg = (f"auc {res['auc']:.4f}" + (f" lift {res['oracle_lift']:.3f}"
                                              if "oracle_lift" in res else "")
                   + f" ({res.get('wall_s', 0):.0f} s)") if res.get("status") == "ok" \
                else f"ERROR {res.get('error')}"
            log(f"[{done}/{len(cells)}] {c.label}: {msg}")
            write()

    if todo:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, st.jobs)) as pool:
            list(pool.map(one, todo))
    return write()


def run_curve(args: argparse.Namespace, variants: Sequence[Variant], base: List[str]
              ) -> List[Row]:
    """``--curve``: the variants on demo data of every size; writes the learning curve."""
    sizes = [int(x) for x in args.curve.split(",") if x.strip()]
    seeds = [int(x) for x in args.curve_seeds.split(",") if x.strip()] or \
        [args.seeds] * len(sizes)
    if len(seeds) != len(sizes):
        raise ValueError("--curve_seeds needs one count per --curve size")
    base = base + ["--time_zone_offset_hours", str(DEMO_TZ[args.demo_variant])]
    jobs, threads = default_parallelism(usable_cores())
    name = args.name or f"curve_{args.demo_variant}"
    root = args.work_dir or os.path.join(PROJECT_DIR, "outputs", "ablation", name)
    prefix = args.out or os.path.join(root, "ablation")
    points: List[Tuple[int, Row]] = []
    for size, k in zip(sizes, seeds):
        data_dir = ensure_demo_data(size, args.demo_eval_rows, args.demo_variant,
                                    shlex.split(args.demo_flags))
        st = Settings(data_dir=data_dir, eval_dir=os.path.join(data_dir, "eval"),
                      base_flags=tuple(base),
                      seeds=tuple(range(args.first_seed, args.first_seed + k)),
                      work_dir=os.path.join(root, os.path.basename(data_dir)),
                      jobs=args.jobs or jobs, threads=args.threads or threads,
                      workers=args.workers, keep_checkpoints=args.keep_checkpoints,
                      timeout_s=args.timeout_s)
        if args.dry_run:
            for c in plan_cells(variants, st):
                print(f"{size} rows, {c.label}: {' '.join(c.train_flags)} -> {c.dir}")
            continue
        title = f"{size:,} training rows of `{data_dir}`; base `{' '.join(base)}`"
        rows = run_table(variants, st, f"{prefix}_{size}", title)
        points += [(size, r) for r in rows]
        md = curve_markdown(points)
        with open(prefix + "_curve.md", "w", encoding="utf-8") as fh:
            fh.write(f"Learning curve, demo variant `{args.demo_variant}` "
                     f"{args.demo_flags}; base `{' '.join(base)}`\n\n" + md)
        write_curve_png(points, prefix + "_curve.png",
                        f"demo variant {args.demo_variant} {args.demo_flags}")
        write_curve_csv(points, prefix + "_curve.csv")
    if points:
        print(curve_markdown(points))
        print(f"learning curve in {prefix}_curve.md / .csv / .png")
    return [r for _, r in points]


def usable_cores() -> int:
    """CPUs this process may use (affinity mask, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_parallelism(cores: int) -> Tuple[int, int]:
    """(jobs, threads per job) for ``cores`` cores: one single-threaded cell per core, so
    that no cell's intra-op threads compete with another's (a cell's small matrix products
    gain little from a second thread, cells side by side gain almost 2x)."""
    return max(1, cores), 1


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Ablation table: base configuration x variants x seeds, each cell one "
                    "train.py + infer.py --score run; finished cells are cached.")
    p.add_argument("--data_dir", default=None,
                   help="training data folder (default: demo data of --demo_rows rows)")
    p.add_argument("--eval_dir", default=None,
                   help="held-out split scored per cell (default <data_dir>/eval when it "
                        "exists; else the validation AUC is the cell's AUC)")
    p.add_argument("--demo_rows", type=int, default=DEFAULT_DEMO_ROWS,
                   help="rows of the generated demo data when no --data_dir")
    p.add_argument("--demo_eval_rows", type=int, default=10000)
    p.add_argument("--demo_variant", default="default", choices=tuple(DEMO_TZ),
                   help="demo variant; its time zone is added to the base flags")
    p.add_argument("--demo_flags", default="", help="extra demo_data.py options, quoted")
    p.add_argument("--base", default=DEFAULT_BASE, help="train.py flags of the base, quoted "
                   f"(default {DEFAULT_BASE!r}: run.sh's demo configuration)")
    p.add_argument("--variants", default="default",
                   help="'default' (each seed feature off, each experimental option on), "
                        "'quick', or a file of NAME=FLAGS lines")
    p.add_argument("--add", action="append", default=[], metavar="NAME=FLAGS",
                   help="one more variant (repeatable)")
    p.add_argument("--only", default="", help="comma list of variant names to keep (the base "
                   "is always kept)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant")
    p.add_argument("--first_seed", type=int, default=1)
    p.add_argument("--jobs", type=int, default=0, help="cells at once (0 = auto)")
    p.add_argument("--threads", type=int, default=0, help="threads per cell (0 = auto)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per cell")
    p.add_argument("--work_dir", default=None,
                   help="cells and their cache (default outputs/ablation/<name>)")
    p.add_argument("--out", default=None, help="table files prefix (default "
                   "<work_dir>/ablation -> .md, .csv, .png)")
    p.add_argument("--name", default=None, help="the table's name (default from the data)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_DEMO_ROWS} demo rows ({QUICK_EVAL_ROWS} held out), 2 seeds, "
                        "the quick variants")
    p.add_argument("--keep_checkpoints", action="store_true")
    p.add_argument("--timeout_s", type=float, default=0.0, help="limit per train.py / infer.py")
    p.add_argument("--dry_run", action="store_true", help="list the cells and stop")
    p.add_argument("--curve", default="", metavar="ROWS,ROWS,...",
                   help="learning curve: the table on demo data of each of these sizes "
                        "(e.g. 5000,15000,50000,300000), plus <prefix>_curve.md/.csv/.png")
    p.add_argument("--curve_seeds", default="", metavar="K,K,...",
                   help="seeds per --curve size (default --seeds for every size)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    args = build_arg_parser().parse_args(argv)
    if args.quick:
        args.demo_rows, args.demo_eval_rows = QUICK_DEMO_ROWS, QUICK_EVAL_ROWS
        args.seeds = min(args.seeds, 2)
        if args.variants == "default":
            args.variants = "quick"
    variants = load_variants(args.variants) + [parse_variant(a) for a in args.add]
    if args.only:
        keep = {n.strip() for n in args.only.split(",") if n.strip()} | {BASE.name}
        variants = [v for v in variants if v.name in keep]
    variants = with_base(variants)
    base = shlex.split(args.base)
    if args.curve:
        return run_curve(args, variants, base)
    if args.data_dir:
        data_dir = args.data_dir
        eval_dir = args.eval_dir or (os.path.join(data_dir, "eval")
                                     if os.path.isdir(os.path.join(data_dir, "eval")) else None)
        name = args.name or os.path.basename(os.path.normpath(data_dir))
    else:
        data_dir = ensure_demo_data(args.demo_rows, args.demo_eval_rows, args.demo_variant,
                                    shlex.split(args.demo_flags))
        eval_dir = args.eval_dir or (os.path.join(data_dir, "eval")
                                     if args.demo_eval_rows > 0 else None)
        base += ["--time_zone_offset_hours", str(DEMO_TZ[args.demo_variant])]
        name = args.name or os.path.basename(data_dir)
    jobs, threads = default_parallelism(usable_cores())
    st = Settings(data_dir=data_dir, eval_dir=eval_dir, base_flags=tuple(base),
                  seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
                  work_dir=args.work_dir or os.path.join(PROJECT_DIR, "outputs", "ablation",
                                                         name),
                  jobs=args.jobs or jobs, threads=args.threads or threads,
                  workers=args.workers, keep_checkpoints=args.keep_checkpoints,
                  timeout_s=args.timeout_s)
    prefix = args.out or os.path.join(st.work_dir, "ablation")
    if args.dry_run:
        for c in plan_cells(variants, st):
            print(f"{c.label}: {' '.join(c.train_flags)} -> {c.dir}")
        return []
    title = (f"Ablation on `{data_dir}` ({'held-out ' + eval_dir if eval_dir else 'validation'}"
             f" AUC); base `{' '.join(base)}`; seeds {list(st.seeds)}")
    t0 = time.perf_counter()
    rows = run_table(variants, st, prefix, title)
    print(markdown_table(rows))
    print(f"ablation: {time.perf_counter() - t0:.0f} s; table in {prefix}.md / .csv"
          + (" / .png" if os.path.isfile(prefix + ".png") else ""))
    return rows
