"""MovieLens 100K benchmark of endogenous decoupling against the tuning log's two-tower baselines.

    python3 benchmarks/movielens.py --data_dir ../shared/data/ml-100k [--seeds 5] [--epochs N]

The protocol (fixed; see benchmarks/results/movielens.md and ``pcvr.debias.movielens``):
per-user temporal hold-out of the last 10 ratings (5 before them validate), each held-out
list padded with as many never-rated items drawn once with a fixed seed, labels 2/1/0, BPR
training, NDCG over the whole list with gain ``2^label - 1``. Beside it, two views of the
same lists: long-tail NDCG (candidates among the least popular 80 % of items) and the
popularity-stratified NDCG (items cut into five equal-count buckets by train popularity, NDCG
within each bucket, unweighted mean over buckets), which gives no credit for ranking popular
items first.

The ``decouple_*_fids`` flags belong to the PCVR model and are ignored here.
The last lines printed are ``ndcg_decoupled <x> ndcg_best_baseline <y> spread <s>`` and the
same for ``ndcg_pop``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pcvr.config import DecouplingConfig, add_section_args, section_from_namespace  # noqa: E402
from pcvr.debias import movielens as ml  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True, help="folder holding u.data, u.user, u.item")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per row")
    p.add_argument("--epochs", type=int, default=15, help="passes over the train ratings")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for tests: 1 epoch of at most 5 steps")
    p.add_argument("--split", default="test", choices=("test", "valid"),
                   help="evaluate on the test lists (the table) or the validation lists "
                        "(tuning)")
    p.add_argument("--rows", default=",".join(r.key for r in ml.ROWS),
                   help="comma list of rows to run")
    p.add_argument("--batch_size", type=int, default=512, help="train ratings per step")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate")
    p.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--emb_dim", type=int, default=32, help="width of every embedding table")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    add_section_args(p, DecouplingConfig)
    # The log decouples both the item and the user; --decouple_dim is the width of each
    # tower half (side, atom) in every row, baselines included.
    p.set_defaults(decouple_user=True, decouple_dim=32)
    return p


def main(argv: Optional[List[str]] = None) -> ml.Results:
    args = build_parser().parse_args(argv)
    keys = [k for k in args.rows.split(",") if k]
    unknown = sorted(set(keys) - {r.key for r in ml.ROWS})
    if unknown:
        raise SystemExit(f"error: unknown --rows {unknown}; choose from "
                         f"{[r.key for r in ml.ROWS]}")
    torch.set_num_threads(args.threads)
    try:
        data = ml.load_movielens(args.data_dir)
        split = ml.make_split(data)
    except ml.MovieLensError as e:
        raise SystemExit(f"error: {e}") from e
    cfg = section_from_namespace(DecouplingConfig, args)
    ts = ml.TrainSettings(epochs=1 if args.quick else args.epochs, batch_size=args.batch_size,
                          lr=args.lr, weight_decay=args.weight_decay, emb_dim=args.emb_dim,
                          dim=cfg.decouple_dim, max_steps_per_epoch=5 if args.quick else None)
    ev = split.valid if args.split == "valid" else split.test
    print(f"# {data.n_users} users, {data.n_items} items, {len(split.train_user)} train "
          f"ratings, {len(ev.users)} {args.split} users; {ts}", file=sys.stderr)
    results: ml.Results = {}
    t0 = time.time()
    for row in ml.ROWS:
        if row.key not in keys:
            continue
        row_cfg = dataclasses.replace(cfg, **dict(row.overrides))
        for seed in range(args.seeds):
            t = time.time()
            r = ml.run_one(data, split, ev, row.variant, row_cfg, ts, seed)
            results.setdefault(row.key, []).append(r)
            print(f"{row.key} seed {seed}: " + " ".join(f"{k} {v:.4f}" for k, v in r.items())
                  + f" ({time.time() - t:.1f}s)", file=sys.stderr)
    print(f"# total {time.time() - t0:.0f}s with {args.threads} thread(s)", file=sys.stderr)
    print(f"MovieLens 100K, {args.split} split, {args.seeds} seed(s), {ts.epochs} epoch(s); "
          f"mean ± std over seeds\n")
    print(ml.markdown_table(results))
    print("\nNDCG by item-popularity bucket (0 = least popular fifth), mean over seeds\n")
    print(ml.bucket_table(results))
    print()
    print(ml.summary_line(results, "ndcg_pop"))
    print(ml.summary_line(results, "ndcg"))
    return results


if __name__ == "__main__":
    main()
