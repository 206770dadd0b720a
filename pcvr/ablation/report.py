"""The cells' results as a table: one ``Row`` per variant; markdown, CSV and figures."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from pcvr.ablation.stats import beyond_noise, mean_std, paired_delta
from pcvr.ablation.variants import BASE, Variant

EFFECTS = ("base", "abs_time", "activity", "pair_62_66", "seq_affinity", "user_x_item",
           "dense_dot")


@dataclass
class Row:
    """One variant's aggregate over its seeds."""
    variant: Variant
    n_ok: int
    n: int
    auc: Tuple[float, float]
    delta: Tuple[float, float, int]
    noise: str
    oracle_auc: float
    lift: Tuple[float, float]
    capture: Dict[str, float]
    wall_s: float
    errors: List[str] = field(default_factory=list)


def aggregate(variants: Sequence[Variant], results: Sequence[Mapping[str, Any]],
              seeds: Sequence[int]) -> List[Row]:
    """The table's rows from the cells' results (``variants[0]`` is the base)."""
    by_variant: Dict[str, List[Mapping[str, Any]]] = {v.name: [] for v in variants}
    for r in results:
        if r.get("variant") in by_variant:
            by_variant[r["variant"]].append(r)
    base_name = variants[0].name

    def ok(name: str) -> List[Mapping[str, Any]]:
        return [r for r in by_variant[name] if r.get("status") == "ok"]

    base_auc = {r["seed"]: float(r["auc"]) for r in ok(base_name)}
    rows = []
    for v in variants:
        good = ok(v.name)
        aucs = {r["seed"]: float(r["auc"]) for r in good}
        delta = (0.0, 0.0, len(aucs)) if v.name == base_name else paired_delta(base_auc, aucs)
        noise = "-" if v.name == base_name else beyond_noise(delta[0], delta[1])
        lifts = [r["oracle_lift"] for r in good if "oracle_lift" in r]
        oracles = [r["oracle_auc"] for r in good if "oracle_auc" in r]
        capture = {}
        for e in EFFECTS:
            vals = [r["capture"][e] for r in good if e in r.get("capture", {})]
            if vals:
                capture[e] = mean_std(vals)[0]
        walls = [r.get("wall_s", 0.0) for r in good]
        errors = sorted({f"seed {r['seed']}: {r.get('error', '?')}" for r in by_variant[v.name]
                         if r.get("status") != "ok"})
        rows.append(Row(v, len(good), len(seeds), mean_std(list(aucs.values())), delta, noise,
                        mean_std(oracles)[0], mean_std(lifts), capture,
                        mean_std(walls)[0], errors))
    return rows


def _f(x: float, digits: int = 4, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _pm(m: float, s: float, digits: int = 4, sign: bool = False) -> str:
    if not math.isfinite(m):
        return "-"
    return _f(m, digits, sign) + (f" ± {s:.{digits}f}" if math.isfinite(s) else "")


def markdown_table(rows: Sequence[Row], seed_column: bool = True) -> str:
    """The table in markdown (one line per variant; errors listed under it)."""
    has_oracle = any(math.isfinite(r.oracle_auc) for r in rows)
    effects = [e for e in EFFECTS if any(e in r.capture for r in rows)]
    head = ["variant", "flags", "seeds ok", "AUC mean ± std", "Δ AUC vs base (95 % CI)",
            "beyond noise"]
    if has_oracle:
        head += ["oracle AUC", "oracle lift"]
    head += [f"cap. {e}" for e in effects] + ["min / cell"]
    if seed_column:
        head.append("seed's report")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flags = " ".join(r.variant.flags) or "(base)"
        cells = [r.variant.name, f"`{flags}`", f"{r.n_ok}/{r.n}", _pm(*r.auc),
                 "-" if r.variant.name == rows[0].variant.name else _pm(r.delta[0], r.delta[1],
                                                                        sign=True),
                 r.noise]
        if has_oracle:
            cells += [_f(r.oracle_auc), _pm(*r.lift, digits=3)]
        cells += [_f(r.capture.get(e, float("nan")), 2) for e in effects]
        cells.append(_f(r.wall_s / 60.0, 1))
        if seed_column:
            cells.append(r.variant.seed_report or "")
        lines.append("| " + " | ".join(cells) + " |")
    errors = [(r.variant.name, e) for r in rows for e in r.errors]
    if errors:
        lines.append("")
        lines.append("Errors (these cells are left out of the figures above):")
        lines.append("")
        lines += [f"* `{name}` {e}" for name, e in errors]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("variant", "flags", "seeds_ok", "seeds", "auc_mean", "auc_std", "delta_mean",
              "delta_ci95", "delta_pairs", "beyond_noise", "oracle_auc", "oracle_lift_mean",
              "oracle_lift_std") + tuple(f"capture_{e}" for e in EFFECTS) + (
              "wall_s_per_cell", "seed_report", "errors")


def _csv_row(r: Row) -> List[Any]:
    """One row's ``CSV_FIELDS``."""
    return ([r.variant.name, " ".join(r.variant.flags), r.n_ok, r.n,
             _f(r.auc[0], 6), _f(r.auc[1], 6), _f(r.delta[0], 6, True),
             _f(r.delta[1], 6), r.delta[2], r.noise, _f(r.oracle_auc, 6),
             _f(r.lift[0], 4), _f(r.lift[1], 4)]
            + [_f(r.capture.get(e, float("nan")), 3) for e in EFFECTS]
            + [_f(r.wall_s, 1), r.variant.seed_report, "; ".join(r.errors)])


def write_csv(rows: Sequence[Row], path: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for r in rows:
            w.writerow(_csv_row(r))


def _save(plt: Any, fig: Any, ax: Any, path: str, title: str) -> bool:
    """Titles, lays out, writes and closes a figure (``plt``: the caller's pyplot, an optional
    dependency); True (written)."""
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_png(rows: Sequence[Row], path: str, title: str = "") -> bool:
    """The deltas with their 95 % intervals (matplotlib optional: False when missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [r for r in rows[1:] if math.isfinite(r.delta[0])]
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * max(len(shown), 1) + 1.4))
    ys = list(range(len(shown)))[::-1]
    for y, r in zip(ys, shown):
        hw = r.delta[1] if math.isfinite(r.delta[1]) else 0.0
        color = "tab:gray" if r.noise != "yes" else ("tab:green" if r.delta[0] > 0
                                                     else "tab:red")
        ax.errorbar(r.delta[0], y, xerr=hw, fmt="o", color=color, capsize=3)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([r.variant.name for r in shown])
    ax.set_xlabel("held-out AUC delta vs base (mean over seeds, 95 % CI, paired by seed)")
    return _save(plt, fig, ax, path, title)


def curve_markdown(points: Sequence[Tuple[int, Row]]) -> str:
    """A learning curve (training rows x variant) in markdown."""
    effects = [e for e in EFFECTS if any(e in r.capture for _, r in points)]
    head = ["training rows", "variant", "seeds ok", "held-out AUC mean ± std", "oracle lift",
            "Δ AUC vs base (95 % CI)"] + [f"cap. {e}" for e in effects] + ["min / cell"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rows_n, r in points:
        base = r.variant.name == BASE.name
        cells = [f"{rows_n:,}", r.variant.name, f"{r.n_ok}/{r.n}", _pm(*r.auc),
                 _pm(*r.lift, digits=3),
                 "-" if base else _pm(r.delta[0], r.delta[1], sign=True) + f" ({r.noise})"]
        cells += [_f(r.capture.get(e, float("nan")), 2) for e in effects]
        cells.append(_f(r.wall_s / 60.0, 1))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [(n, r.variant.name, e) for n, r in points for e in r.errors]
    if errors:
        lines += ["", "Errors:", ""] + [f"* {n:,} rows, `{v}` {e}" for n, v, e in errors]
    return "\n".join(lines) + "\n"


def write_curve_csv(points: Sequence[Tuple[int, Row]], path: str) -> None:
    """A learning curve in CSV: the training rows, then the table's ``CSV_FIELDS``."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("rows",) + CSV_FIELDS)
        for n, r in points:
            w.writerow([n] + _csv_row(r))


def write_curve_png(points: Sequence[Tuple[int, Row]], path: str, title: str = "") -> bool:
    """Oracle lift (or AUC without a truth sidecar) against training rows, one line per
    variant, ± one std over the seeds (matplotlib optional: False when missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    use_lift = any(math.isfinite(r.lift[0]) for _, r in points)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r.variant.name for _, r in points):
        pts = sorted((n, r.lift if use_lift else r.auc) for n, r in points
                     if r.variant.name == name)
        pts = [(n, v) for n, v in pts if math.isfinite(v[0])]
        if pts:
            ax.errorbar([n for n, _ in pts], [v[0] for _, v in pts],
                        yerr=[v[1] if math.isfinite(v[1]) else 0.0 for _, v in pts],
                        marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training rows")
    ax.set_ylabel("held-out oracle lift" if use_lift else "held-out AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, ax, path, title)
