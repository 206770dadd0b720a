"""Endogenous decoupling where the training log is biased and the test is not: Coat and a simulator.

    python3 benchmarks/debias.py [--quick] [--tune] [--plot PNG] [--report MD]

* Coat (``--coat_dir``, default ../shared/data/coat): trained on the self-selected ratings,
  tested on the uniformly random ratings of 80 % of the users (the other 20 % validate).
* Simulator (``pcvr.debias.simulator``): known relevance, Zipf-like exposure of strength
  ``alpha``; a uniform and a logged-style test; one table at ``--main_skew`` and NDCG@5
  against every ``--skews`` value (``--plot`` draws it).

Every row's hyper-parameters come from ``--params`` (written by ``--tune``: the same number of
random-search trials for every row, scored on the validation lists; protocol in
benchmarks/results/debias_protocol.md). The run ends with exactly two lines::

    coat_ndcg_decoupled <x> best_baseline <y> spread <s>
    sim_ndcg_decoupled <x> best_baseline <y> spread <s>

(NDCG@5 on the uniform test at ``--main_skew``; ``y`` the best of the two two-tower baselines
and the control; ``s`` the larger seed std of the two rows.)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from pcvr.debias import experiment as ex  # noqa: E402
from pcvr.debias.data import DataError, load_coat  # noqa: E402
from pcvr.debias.simulator import SimConfig, simulate  # noqa: E402

DEFAULT_PARAMS = os.path.join(ROOT, "benchmarks", "results", "debias_params.json")
QUICK = {"seeds": 2, "sweep_seeds": 1, "max_epochs": 3, "skews": "0,1"}


def floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coat_dir", default=os.path.join(ROOT, "..", "shared", "data", "coat"),
                   help="Coat folder (train.ascii, test.ascii, propensities.ascii, "
                        "user_item_features/)")
    p.add_argument("--params", default=DEFAULT_PARAMS,
                   help="tuned hyper-parameters (JSON, written by --tune); missing = every "
                        "row at its defaults")
    p.add_argument("--seeds", type=int, default=5,
                   help="seeds 0..N-1 per row (Coat and the main simulator table); 0 with "
                        "--tune = tune only")
    p.add_argument("--sweep_seeds", type=int, default=5,
                   help="seeds per row at the other --skews values")
    p.add_argument("--skews", default="0,0.5,1,1.5,2",
                   help="simulator popularity skews alpha of the NDCG-vs-bias sweep")
    p.add_argument("--main_skew", type=float, default=1.0,
                   help="the simulator's main table and summary line (tuned there)")
    p.add_argument("--sim_users", type=int, default=SimConfig.n_users, help="simulated users")
    p.add_argument("--sim_items", type=int, default=SimConfig.n_items, help="simulated items")
    p.add_argument("--max_epochs", type=int, default=0,
                   help="cap every row's epochs (0 = no cap)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK} (explicit flags still win)")
    p.add_argument("--tune", action="store_true",
                   help="random-search every row first and write --params")
    p.add_argument("--trials", type=int, default=16, help="random-search trials per row")
    p.add_argument("--tune_rows", default="",
                   help="comma list: tune only these rows, keeping the others' entries of "
                        "--params (default: every row)")
    p.add_argument("--resume", action="store_true",
                   help="with --tune: reuse the trials of --params that draw the same "
                        "hyper-parameters (e.g. to extend every row to more --trials)")
    p.add_argument("--tune_seeds", default="100,101",
                   help="seeds each trial is trained from (mean validation NDCG@5)")
    p.add_argument("--plot", default=None, help="write the NDCG-vs-bias PNG here")
    p.add_argument("--report", default=None, help="write the tables (markdown) here")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # quick values only where the flag was left at its default
        defaults = {k: parser.get_default(k) for k in QUICK}
        for k, v in QUICK.items():
            if getattr(args, k) == defaults[k]:
                setattr(args, k, v)
    if args.main_skew not in floats(args.skews):
        args.skews = ",".join(str(x) for x in sorted(floats(args.skews) + [args.main_skew]))
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, List[ex.RunResult]]]:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        coat = load_coat(args.coat_dir)
    except DataError as e:
        raise SystemExit(f"error: {e}") from e
    skews = floats(args.skews)
    sim_cfg = SimConfig(n_users=args.sim_users, n_items=args.sim_items)

    def sim_at(alpha: float):
        return simulate(dataclasses.replace(sim_cfg, popularity_skew=alpha))[0]

    if args.tune:
        try:
            ex.tune_into(args.params, [("coat", coat, ex.COAT_ROWS),
                                       ("sim", sim_at(args.main_skew), ex.SIM_ROWS)],
                         args.trials, [int(s) for s in args.tune_seeds.split(",")],
                         only=[k for k in args.tune_rows.split(",") if k], resume=args.resume,
                         max_epochs=args.max_epochs, note={"main_skew": args.main_skew},
                         log=log)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from e
        log(f"# tuned in {time.time() - t0:.0f}s; wrote {args.params}")
        if args.seeds <= 0:
            return {}
    if os.path.isfile(args.params):
        params = ex.load_params(args.params)
    else:
        log(f"# {args.params} missing: every row runs at its default hyper-parameters")
        params = {}
    rows_params = {name: {r.key: ex.cap_epochs(
        params.get(name, {}).get(r.key, ex.default_params(r)), args.max_epochs) for r in rows}
                   for name, rows in (("coat", ex.COAT_ROWS), ("sim", ex.SIM_ROWS))}

    seeds = list(range(args.seeds))
    report: List[str] = []

    def out(text: str = "") -> None:
        print(text)
        report.append(text)

    coat_res = ex.run_rows(coat, ex.COAT_ROWS, rows_params["coat"], seeds, log)
    out(f"## Coat: uniform test ({len(coat.evals['test'].users)} users x 16 random items), "
        f"{len(seeds)} seeds, mean ± std\n")
    out(ex.markdown_table(coat_res, ex.COAT_ROWS, [("test", "uniform")]))
    out("\n" + ex.verdict(coat_res, "test"))

    sweep: Dict[float, Dict[str, List[ex.RunResult]]] = {}
    for alpha in skews:
        main_table = alpha == args.main_skew
        s = seeds if main_table else list(range(args.sweep_seeds))
        log(f"# simulator alpha {alpha}")
        sweep[alpha] = ex.run_rows(sim_at(alpha), ex.SIM_ROWS, rows_params["sim"], s, log)
    main_res = sweep[args.main_skew]
    out(f"\n## Simulator at alpha {args.main_skew}: uniform and logged-style tests, "
        f"{len(seeds)} seeds, mean ± std\n")
    out(ex.markdown_table(main_res, ex.SIM_ROWS, [("test", "uniform"),
                                                  ("test_logged", "logged")]))
    out("\n" + ex.verdict(main_res, "test") + "\n" + ex.verdict(main_res, "test_logged"))
    for ev, title in (("test", "uniform"), ("test_logged", "logged-style")):
        out(f"\n## Simulator: NDCG@5 on the {title} test against the popularity skew alpha "
            f"({args.sweep_seeds} seeds; {len(seeds)} at alpha {args.main_skew})\n")
        out(ex.sweep_table(sweep, skews, ex.SIM_ROWS, ev))
    if args.plot:
        note = ex.plot_sweep(args.plot, skews, sweep, ex.SIM_ROWS)
        log(note or f"# wrote {args.plot}")
    log(f"# total {time.time() - t0:.0f}s with {args.threads} thread(s)")
    lines = [ex.summary_line("coat", coat_res), ex.summary_line("sim", main_res)]
    if args.report:
        with open(args.report, "w", encoding="utf-8") as fh:
            fh.write("\n".join(report + [""] + ["```"] + lines + ["```", ""]))
    print()
    for line in lines:
        print(line)
    return {"coat": coat_res, **{f"sim_{a}": r for a, r in sweep.items()}}


if __name__ == "__main__":
    main()
