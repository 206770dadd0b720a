"""The rows of the Coat and simulator tables, the equal-budget random search that tunes each
row on the validation lists, the seeded runs of the tuned rows, and their report (markdown
tables, the two machine-readable summary lines, the NDCG-vs-bias plot)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pcvr.config import DecouplingConfig
from pcvr.debias.data import RatingData
from pcvr.debias.explicit import PointwiseSettings, run_pointwise
from pcvr.debias.metrics import mean_std


@dataclass(frozen=True)
class Row:
    """One compared model: a scorer and a loss weighting (``explicit.PointwiseSettings``)."""
    key: str
    title: str
    model: str
    weighting: str = "none"


COAT_ROWS: Tuple[Row, ...] = (
    Row("concat_mlp", "two-tower, MLP(concat(side, atom)) (log baseline 1)", "concat_mlp"),
    Row("mlp_concat", "two-tower, concat(MLP(side), MLP(atom)) (log baseline 2)", "mlp_concat"),
    Row("control", "baseline 2 -> head MLP, no losses (control)", "mlp_concat_head"),
    Row("decoupled", "endogenous decoupling", "decoupled"),
    Row("decoupled_distance", "decoupling + atom/side-distance weights (the log's IPW)",
        "decoupled", "distance"),
    Row("decoupled_ips", "decoupling + IPS", "decoupled", "ips"),
    Row("mf", "matrix factorisation", "mf"),
    Row("mf_ips", "MF + IPS", "mf", "ips"),
    Row("mf_dr", "MF + doubly robust (joint learning)", "mf", "dr"),
)
# In the simulator the propensities given to IPS are the true ones; the control network
# with them is the ceiling that a debiasing of that network would like to approach.
SIM_ROWS: Tuple[Row, ...] = COAT_ROWS + (
    Row("control_ips", "control + IPS (true propensities: the ceiling)", "mlp_concat_head",
        "ips"),)
BASELINES = ("concat_mlp", "mlp_concat", "control")
TABLE_METRICS = (("ndcg5", "NDCG@5"), ("ndcg", "NDCG"), ("auc", "AUC"))

# Random-search space, identical for every row (``draw_trial``). Shared knobs are drawn from
# one stream per trial, so trial t of every row shares them; row-specific knobs come from a
# second stream.
SHARED_SPACE: Dict[str, Sequence[Any]] = {
    "lr": (1e-3, 2e-3, 5e-3, 1e-2),
    "weight_decay": (0.0, 0.03, 0.1, 0.3, 1.0),
    "epochs": (10, 20, 40),
    "dim": (8, 16, 32),
    "init_std": (0.01, 0.1, 0.3),
}
IPS_SPACE: Dict[str, Sequence[Any]] = {"propensity_clip": (0.005, 0.01, 0.02, 0.05, 0.1)}
HEAD_SPACE: Dict[str, Sequence[Any]] = {"head": ("mlp", "split")}
DECOUPLING_SPACE: Dict[str, Sequence[Any]] = {
    "decouple_loss_weight": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "decouple_temperature": (0.1, 0.2, 0.5),
    "decouple_stage1_margin": (0.3, 0.5, 0.7, 0.9),
    "decouple_stage1_weight": (0.25, 1.0),
    "ssl_entities": ("batch", "unique", "uniform"),
}


def base_decoupling() -> DecouplingConfig:
    """The log's decoupling values, user and item both decoupled (as in the log)."""
    return dataclasses.replace(DecouplingConfig(), decouple_user=True)


@dataclass(frozen=True)
class Params:
    """A row's hyper-parameters: pointwise settings and decoupling overrides."""
    settings: PointwiseSettings
    decoupling: Tuple[Tuple[str, float], ...] = ()

    def config(self) -> DecouplingConfig:
        return dataclasses.replace(base_decoupling(), **dict(self.decoupling))

    def to_json(self) -> Dict[str, Any]:
        return {"settings": dataclasses.asdict(self.settings),
                "decoupling": dict(self.decoupling)}

    @staticmethod
    def from_json(obj: Dict[str, Any]) -> "Params":
        return Params(PointwiseSettings(**obj["settings"]),
                      tuple(sorted(obj.get("decoupling", {}).items())))


def default_params(row: Row) -> Params:
    """Trial 0 of every row: the settings' defaults and the log's decoupling values."""
    return Params(PointwiseSettings(model=row.model, weighting=row.weighting))


def draw_trial(row: Row, trial: int, seed: int = 0) -> Params:
    """The row's hyper-parameters of random-search trial ``trial`` (0 = ``default_params``).

    The embedding width equals the tower half width (``emb_dim = dim``); IPS/DR rows also
    draw the propensity clip, rows with a ranking head (control, decoupled) the head, and
    decoupled rows the decoupling knobs of ``DECOUPLING_SPACE``.
    """
    if trial == 0:
        return default_params(row)
    shared = np.random.default_rng([seed, trial])
    own = np.random.default_rng([seed, trial, zlib.crc32(row.key.encode())])
    pick = {k: v[shared.integers(len(v))] for k, v in SHARED_SPACE.items()}
    kw: Dict[str, Any] = dict(model=row.model, weighting=row.weighting, lr=float(pick["lr"]),
                              weight_decay=float(pick["weight_decay"]),
                              epochs=int(pick["epochs"]), dim=int(pick["dim"]),
                              emb_dim=int(pick["dim"]), init_std=float(pick["init_std"]))
    if row.weighting in ("ips", "dr"):
        kw["propensity_clip"] = float(own.choice(IPS_SPACE["propensity_clip"]))
    if row.model in ("mlp_concat_head", "decoupled"):
        kw["head"] = str(own.choice(HEAD_SPACE["head"]))
    decoupling: List[Tuple[str, float]] = []
    if row.model == "decoupled":
        for k, v in DECOUPLING_SPACE.items():
            value = v[own.integers(len(v))]
            if k == "ssl_entities":
                kw[k] = str(value)
            else:
                decoupling.append((k, float(value)))
    return Params(PointwiseSettings(**kw), tuple(sorted(decoupling)))


def cap_epochs(p: Params, max_epochs: int) -> Params:
    """``p`` with at most ``max_epochs`` epochs (0 = unchanged), for smoke runs."""
    if max_epochs <= 0 or p.settings.epochs <= max_epochs:
        return p
    return dataclasses.replace(p, settings=dataclasses.replace(p.settings, epochs=max_epochs))


# One seeded run: {eval name: {metric: value}}.
RunResult = Dict[str, Dict[str, float]]
Log = Callable[[str], None]


def tune(data: RatingData, rows: Sequence[Row], trials: int, seeds: Sequence[int],
         metric: str = "ndcg5", log: Optional[Log] = None, max_epochs: int = 0,
         previous: Sequence[Dict[str, Any]] = ()
         ) -> Tuple[Dict[str, Params], List[Dict[str, Any]]]:
    """Equal-budget random search: ``trials`` draws per row, each trained from every seed in
    ``seeds`` and scored by the mean ``metric`` on ``data.evals['valid']`` (``max_epochs``:
    ``cap_epochs``, for smoke runs).

    ``previous``: records of an earlier search with the same seeds; a trial whose record
    holds exactly the params drawn now is not trained again (so a search can be extended to
    more trials, every row alike).

    Returns:
        (the best ``Params`` of each row, one record per trial for the report).
    """
    valid = {"valid": data.evals["valid"]}
    done = {(r["row"], r["trial"]): r for r in previous}
    best: Dict[str, Params] = {}
    records: List[Dict[str, Any]] = []
    for row in rows:
        scores = []
        for t in range(trials):
            p = cap_epochs(draw_trial(row, t), max_epochs)
            old = done.get((row.key, t))
            if old is not None and Params.from_json(old) == p:
                scores.append(float(old[metric]))
                records.append(old)
                continue
            values = [run_pointwise(data, p.settings, p.config(), s, valid)["valid"][metric]
                      for s in seeds]
            scores.append(float(np.mean(values)))
            records.append({"row": row.key, "trial": t, metric: scores[-1], **p.to_json()})
            if log:
                log(f"tune {row.key} trial {t}: valid {metric} {scores[-1]:.4f}")
        best[row.key] = cap_epochs(draw_trial(row, int(np.argmax(scores))), max_epochs)
    return best, records


def tune_into(path: str, datasets: Sequence[Tuple[str, RatingData, Sequence[Row]]],
              trials: int, seeds: Sequence[int], only: Sequence[str] = (), resume: bool = False,
              max_epochs: int = 0, note: Optional[Dict[str, Any]] = None,
              log: Optional[Log] = None) -> None:
    """``tune`` every ``(name, data, rows)`` and write the result to ``path``
    (``save_params``).

    only: tune just these row keys; the other rows keep their entries of ``path``.
    resume: reuse ``path``'s trials (same seeds required), e.g. to extend every row to more
        ``trials``.
    note: extra entries of the recorded budget.

    Raises:
        ValueError: ``resume`` with other seeds than ``path`` was tuned with.
    """
    old = os.path.isfile(path) and (bool(only) or resume)
    tuned, records, budget = load_tuning(path) if old else ({}, {}, {})
    if resume and old and budget.get("seeds_per_trial") != list(seeds):
        raise ValueError(f"resuming {path} needs its seeds {budget.get('seeds_per_trial')}, "
                         f"not {list(seeds)}")
    for name, data, rows in datasets:
        rows = [r for r in rows if not only or r.key in only]
        best, recs = tune(data, rows, trials, seeds, log=log, max_epochs=max_epochs,
                          previous=records.get(name, []) if resume else ())
        tuned.setdefault(name, {}).update(best)
        records[name] = [r for r in records.get(name, []) if r["row"] not in best] + recs
    save_params(path, tuned, {"trials_per_row": trials, "seeds_per_trial": list(seeds),
                              "metric": "validation NDCG@5", **(note or {})}, records)


def run_rows(data: RatingData, rows: Sequence[Row], params: Dict[str, Params],
             seeds: Sequence[int], log: Optional[Log] = None) -> Dict[str, List[RunResult]]:
    """Every row with its tuned ``params`` from every seed, evaluated on every evaluation set
    of ``data`` but the validation lists."""
    evals = {k: v for k, v in data.evals.items() if k != "valid"}
    out: Dict[str, List[RunResult]] = {}
    for row in rows:
        p = params[row.key]
        for s in seeds:
            r = run_pointwise(data, p.settings, p.config(), s, evals)
            out.setdefault(row.key, []).append(r)
            if log:
                log(f"{row.key} seed {s}: " + "; ".join(
                    f"{ev} " + " ".join(f"{m} {v:.4f}" for m, v in res.items())
                    for ev, res in r.items()))
    return out


def row_stats(runs: List[RunResult], ev: str, metric: str) -> Tuple[float, float]:
    """Mean and seed std of ``metric`` on ``ev`` over a row's runs."""
    return mean_std([r[ev][metric] for r in runs])


def markdown_table(results: Dict[str, List[RunResult]], rows: Sequence[Row],
                   evals: Sequence[Tuple[str, str]]) -> str:
    """One line per row: mean ± std of each ``TABLE_METRICS`` on each ``(eval, title)``."""
    head = " | ".join(f"{title} {name}" for _, title in evals for _, name in TABLE_METRICS)
    lines = [f"| model | {head} |", "|---" * (1 + len(evals) * len(TABLE_METRICS)) + "|"]
    for row in rows:
        if row.key not in results:
            continue
        cells = [f"{m:.4f} ± {s:.4f}" for ev, _ in evals for metric, _ in TABLE_METRICS
                 for m, s in [row_stats(results[row.key], ev, metric)]]
        lines.append(f"| {row.title} | {' | '.join(cells)} |")
    return "\n".join(lines)


def summary_line(name: str, results: Dict[str, List[RunResult]], ev: str = "test",
                 metric: str = "ndcg5") -> str:
    """``<name>_ndcg_decoupled <x> best_baseline <y> spread <s>``.

    ``y`` is the best mean of ``BASELINES`` (the log's two two-towers and the control) and
    ``s`` the larger seed std of the decoupled row and that baseline (NaN: a row not run).
    """
    nan = (math.nan, math.nan)
    dec = row_stats(results["decoupled"], ev, metric) if "decoupled" in results else nan
    ran = [row_stats(results[k], ev, metric) for k in BASELINES if k in results]
    best = max(ran, key=lambda ms: ms[0]) if ran else nan
    return (f"{name}_ndcg_decoupled {dec[0]:.4f} best_baseline {best[0]:.4f} "
            f"spread {max(dec[1], best[1]):.4f}")


def verdict(results: Dict[str, List[RunResult]], ev: str, metric: str = "ndcg5") -> str:
    """Whether the decoupled row beats every baseline by more than 2 seed stds on ``ev``."""
    dec_m, dec_s = row_stats(results["decoupled"], ev, metric)
    parts = []
    for k in BASELINES:
        if k in results:
            m, s = row_stats(results[k], ev, metric)
            gap, bar = dec_m - m, 2 * max(dec_s, s)
            parts.append(f"{k} {gap:+.4f} ({'>' if gap > bar else '<='} 2 std = {bar:.4f})")
    return f"decoupled vs baselines on {ev} {metric}: " + ", ".join(parts)


def sweep_table(sweep: Dict[float, Dict[str, List[RunResult]]], skews: Sequence[float],
                rows: Sequence[Row], ev: str, metric: str = "ndcg5") -> str:
    """One line per row, one column per skew: mean ± std of ``metric`` on ``ev``."""
    lines = ["| model | " + " | ".join(f"alpha {a:g}" for a in skews) + " |",
             "|---" * (len(skews) + 1) + "|"]
    for row in rows:
        cells = [f"{m:.4f} ± {s:.4f}" for a in skews
                 for m, s in [row_stats(sweep[a][row.key], ev, metric)]]
        lines.append(f"| {row.key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_params(path: str, params: Dict[str, Dict[str, Params]], budget: Dict[str, Any],
                trials: Dict[str, List[Dict[str, Any]]]) -> None:
    """Writes ``{dataset: {row: params}}``, the tuning budget and every trial as JSON."""
    obj = {"budget": budget, "trials": trials,
           "params": {d: {k: p.to_json() for k, p in rows.items()}
                      for d, rows in params.items()}}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")


def load_tuning(path: str) -> Tuple[Dict[str, Dict[str, Params]],
                                    Dict[str, List[Dict[str, Any]]], Dict[str, Any]]:
    """Reads what ``save_params`` wrote: (params, trials, budget)."""
    with open(path, "r", encoding="utf-8") as fh:
        obj = json.load(fh)
    params = {d: {k: Params.from_json(p) for k, p in rows.items()}
              for d, rows in obj["params"].items()}
    return params, obj.get("trials", {}), obj.get("budget", {})


def load_params(path: str) -> Dict[str, Dict[str, Params]]:
    """The tuned params of ``save_params``'s file."""
    return load_tuning(path)[0]


def plot_sweep(path: str, skews: Sequence[float], sweep: Dict[float, Dict[str, List[RunResult]]],
               rows: Sequence[Row], ev: str = "test", metric: str = "ndcg5") -> Optional[str]:
    """Writes a PNG of ``metric`` on ``ev`` against the popularity skew, one line per row
    (error bars: seed std). Returns None, or a note when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: the plot was skipped"
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        stats = [row_stats(sweep[a][row.key], ev, metric) for a in skews]
        style = "-" if row.key in BASELINES or row.key == "decoupled" else "--"
        ax.errorbar(skews, [m for m, _ in stats], yerr=[s for _, s in stats], label=row.key,
                    linestyle=style, marker="o", capsize=2,
                    linewidth=2.5 if row.key == "decoupled" else 1.2)
    ax.set_xlabel("popularity skew alpha (exposure ~ rank^-alpha)")
    name = dict(TABLE_METRICS).get(metric, metric)
    which = "uniform" if ev == "test" else "logged-style"
    ax.set_ylabel(f"{name} on the {which} test (mean ± seed std)")
    ax.set_title(f"Simulator: {name} on the {which} test against exposure bias")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
