"""Synthetic PCVR demo data in the competition layout, with a known conversion probability:
the options, ``generate`` and the command line.

The generator writes parquet files shaped like the TAAC 2026 PCVR data (pipeline_spec §1.1)
and draws every label from a documented probability, so that a model's AUC can be set against
the best attainable one (the "oracle": ranking by the true probability). Its parts, in the
order they run:

* ``pcvr.demo.layout``  - the columns: the online schema (embedded) or ``--schema``, capped;
* ``pcvr.demo.variants`` - where the planted signals sit (fids, time zone, scales, history
  order): ``--variant``;
* ``pcvr.demo.world``   - items, persons and history domains, fixed by ``--seed``;
* ``pcvr.demo.rows``    - who sees which item, when, with which history;
* ``pcvr.demo.effects`` - the planted effects (their table) and the calibration of the logit;
* ``pcvr.demo.columns`` - the columns, labels, parquet files and truth sidecar of a split;
* ``pcvr.demo.oracle``  - reading the truth back (oracle AUC, effect capture).

Command line: ``python3 demo_data.py --out DIR [options]``; ``--help`` lists every option of
``DemoOptions`` (each one is also a keyword of ``generate``, with the same default).

Outputs (DIR/eval/ holds the same three things for the held-out split, 3 days later)::

    DIR/schema.json           the layout, vocab sizes after the cap (timestamp fids: vocab 0)
    DIR/part-00000.parquet..  rows sorted by request time, files and row groups in time order
    DIR/truth.npz             sidecar, never matched by '*.parquet': user_id, p_true, label,
                              logit_<effect> (each effect's contribution to the logit, noise
                              included), and category_<column> / type_<column>: the id of
                              every latent category / item type in the columns effects link

Exposure-bias mode (``--exposure_bias S``, S > 0; off by default): the training split over-shows
popular items (each item's probability times popularity^S, see ``pcvr.demo.rows``) while the
true conversion probability of a (row, item) pair stays what it is (popular items convert no
more), and the held-out split DIR/eval/ shows items uniformly at random: the biased logs to
train on (their validation tail is a biased test) and an unbiased test to measure debiasing
on. Both truth sidecars then also hold per row ``propensity`` (the probability with which the
split showed the row's item; 1 / 8000 in the held-out split, so ``1 / (8000 * propensity)``
weights a training row to uniform exposure) and ``item_popularity`` (the item's share of the
natural popularity draw, for popularity-stratified metrics).

The default layout has every fid and dim of the online schema: 46 ``user_int_feats_*`` (35
scalar, 11 lists), 10 ``user_dense_feats_*`` (61: 256-d and 87: 320-d user embeddings; 62-66
heavy-tailed values aligned element by element with the int lists of the same fid; 89-91 ten
floats aligned with int 89-91), 14 ``item_int_feats_*`` (fid 11 a tag list) and 45
``domain_{a,b,c,d}_seq_*`` lists (one column per domain is the event timestamp).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np

from pcvr.config import build_parser, flag, section_from_namespace
from pcvr.demo.columns import clear_split, write_split
from pcvr.demo.effects import EFFECTS, calibrate
from pcvr.demo.layout import load_layout
from pcvr.demo.rows import EVAL_DAYS, NATURAL, TRAIN_DAYS, Exposure, train_start
from pcvr.demo.variants import DEFAULT_VARIANT, EVENT_ORDERS, VARIANTS
from pcvr.demo.world import build_world

EVAL_SUBDIR = "eval"
# First user_id of each split: ids stay unique across splits up to 80 M training rows.
TRAIN_USER_ID0, EVAL_USER_ID0 = 10_000_000, 90_000_000
# The automatic row-group size holds about this many list values.
LIST_VALUES_PER_GROUP = 16_000_000


@dataclass
class DemoOptions:
    """Options of the demo data; every one is a flag of demo_data.py and a keyword of
    generate()."""
    out: Optional[str] = flag(None, "output folder, required (the held-out split goes to "
                              "OUT/eval)")
    # One pass over this many fresh rows beats several passes over fewer (run.sh's demo
    # trains one epoch; README "Demo quality").
    rows: int = flag(300000, "training rows (about 1.1 GB at the default)")
    eval_rows: int = flag(10000, "rows of the held-out split OUT/eval, later in time "
                          "(0 = none)")
    seed: int = flag(2026, "seed of the whole world and of every split")
    vocab_cap: int = flag(20000, "cap every vocab so that a CPU can train (0 = the online "
                          "schema's real sizes)")
    seq_len_scale: float = flag(0.04, "history length scale; 1.0 = competition-like lengths "
                                "(0.04: histories of ~12 to ~100 events, at most 160)")
    event_order: str = flag("variant", "storage order of the events inside each history list; "
                            "'variant' = the variant's (default variant: oldest_first, the "
                            "append order of an event log; the real order is undocumented)",
                            choices=("variant",) + EVENT_ORDERS)
    files: int = flag(4, "parquet files per split")
    rows_per_group: int = flag(0, "rows per parquet row group (0 = auto: about 16 M list "
                               "values per group, between 256 and 4096 rows)")
    schema: Optional[str] = flag(None, "schema.json to follow (default: the online platform "
                                 "schema, embedded; any schema with the linked fids works)")
    variant: str = flag(DEFAULT_VARIANT, "where the planted signals sit: their fids, time zone, "
                        "scales and history order (pcvr/demo/variants.py documents each); "
                        "'default' is the data the project was tuned on, the others check a "
                        "choice on data it was not tuned on. Time zones: " + ", ".join(
                            f"{v.name} UTC{v.tz_hours:+d} (--time_zone_offset_hours "
                            f"{v.tz_hours})" for v in VARIANTS.values()),
                        choices=tuple(VARIANTS))
    exposure_bias: float = flag(0.0, "exposure-bias mode, off at 0: the training split "
                                "over-shows popular items (each item's probability times "
                                "popularity^S; 0.25 moderate, 1 extreme) while their true "
                                "conversion probability stays the same, and the held-out split "
                                "shows items uniformly at random (unbiased); both truth sidecars "
                                "record each row's propensity")


_DEFAULT = DemoOptions()


def generate(out_dir: str, rows: int = _DEFAULT.rows, seed: int = _DEFAULT.seed, *,
             eval_rows: int = _DEFAULT.eval_rows, vocab_cap: int = _DEFAULT.vocab_cap,
             seq_len_scale: float = _DEFAULT.seq_len_scale,
             event_order: str = _DEFAULT.event_order, files: int = _DEFAULT.files,
             rows_per_group: int = _DEFAULT.rows_per_group,
             schema: Union[None, str, Mapping[str, Any]] = _DEFAULT.schema,
             variant: str = _DEFAULT.variant, exposure_bias: float = _DEFAULT.exposure_bias,
             verbose: bool = True) -> Dict[str, Any]:
    """Writes the training split to ``out_dir`` (and the held-out one to ``out_dir/eval``).

    Args:
        out_dir: the output folder; a previous run's files there are replaced.
        rows ... exposure_bias: the options of ``DemoOptions`` (``schema`` may also be a
            dict).
        verbose: print one line per split.
    Returns:
        A summary: per split rows, positive rate, oracle AUC, the effects' variance shares,
        files, row groups and seconds; plus the options (event order resolved), the variant
        and the calibration.
    """
    if rows < 1 or eval_rows < 0 or files < 1 or rows_per_group < 0 or exposure_bias < 0:
        raise ValueError("need rows >= 1, eval_rows >= 0, files >= 1, rows_per_group >= 0, "
                         "exposure_bias >= 0")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    var = VARIANTS[variant]
    if event_order == "variant":
        event_order = var.event_order
    if event_order not in EVENT_ORDERS:
        raise ValueError(f"event_order must be 'variant' or one of {EVENT_ORDERS}, got "
                         f"{event_order!r}")
    t0 = time.perf_counter()
    world = build_world(seed, load_layout(schema, vocab_cap), seq_len_scale, var)
    calib = calibrate(world)
    if rows_per_group == 0:
        auto = LIST_VALUES_PER_GROUP / max(calib.list_values_per_row, 1.0)
        rows_per_group = int(np.clip(auto // 64 * 64, 256, 4096))
    common = dict(files=files, rows_per_group=rows_per_group, event_order=event_order)
    biased = exposure_bias > 0
    splits = [write_split(world, calib, out_dir, "train", 0, rows, train_start(var),
                          TRAIN_DAYS, TRAIN_USER_ID0, **common,
                          exposure=Exposure(bias=exposure_bias) if biased else NATURAL)]
    eval_dir = os.path.join(out_dir, EVAL_SUBDIR)
    if eval_rows > 0:
        splits.append(write_split(world, calib, eval_dir, "eval", 1, eval_rows, var.train_end,
                                  EVAL_DAYS, EVAL_USER_ID0, **common,
                                  exposure=Exposure(uniform=True) if biased else NATURAL))
    elif os.path.isdir(eval_dir):
        clear_split(eval_dir)
    summary = {
        "splits": {s["split"]: s for s in splits},
        "effects": [{"name": e.name, "target": e.target, "target_share": share}
                    for e, share in zip(EFFECTS, var.shares)],
        "options": dict(rows=rows, eval_rows=eval_rows, seed=seed, vocab_cap=vocab_cap,
                        seq_len_scale=seq_len_scale, event_order=event_order, files=files,
                        rows_per_group=rows_per_group,
                        schema=schema if isinstance(schema, str) else None, variant=variant,
                        exposure_bias=exposure_bias),
        "variant": var.describe(),
        "calibration": {"intercept": calib.intercept, "scale": calib.scale},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if verbose:
        if variant != DEFAULT_VARIANT:
            print(f"demo_data: {var.describe()}")
        for s in splits:
            exposure = "" if s["exposure"] == NATURAL.describe() else \
                f"exposure={s['exposure']} popular_share={s['popular_share']:.3f} "
            print(f"demo_data: {s['split']}: rows={s['rows']} {exposure}"
                  f"pos_rate={s['pos_rate']:.4f} oracle_auc={s['oracle_auc']:.4f} "
                  f"files={s['files']} row_groups={s['row_groups']} -> {s['dir']} "
                  f"({s['seconds']:.1f}s)")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The command line: parses ``DemoOptions`` and runs ``generate``."""
    parser = build_parser([DemoOptions], "Write synthetic PCVR demo data (competition layout, "
                                         "known p_true).")
    opts = section_from_namespace(DemoOptions, parser.parse_args(argv))
    if not opts.out:
        parser.error("the following argument is required: --out")
    kwargs = asdict(opts)
    return generate(kwargs.pop("out"), **kwargs)


if __name__ == "__main__":
    main()
