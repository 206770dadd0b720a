"""Ablation tables a user can trust: a base configuration x variant flag sets x seeds.

Every cell of the table is one ``train.py`` run (the base flags, then the variant's, then
``--seed S``) followed by one ``infer.py --score`` on the held-out split, each in its own
process, so that a cell runs exactly what a user would run and a failing variant cannot take
the table down with it. A finished cell is cached (``<work_dir>/cells/<cell>/result.json``,
keyed by the flags, the seed and the data's fingerprint), so an interrupted table continues
where it stopped; a failed cell is never cached and runs again next time.

Per variant the table gives the held-out AUC mean ± std over the seeds, the paired delta
against the base (``variant - base`` per seed, mean ± the 95 % Student-t half-width over the
seeds both finished) and whether that interval excludes 0 ("beyond noise"), the oracle AUC
and lift when the data has a truth sidecar (``pcvr.demo.oracle``), the effect capture on
demo data, and the wall time per cell. Outputs: ``<prefix>.md``, ``<prefix>.csv`` and, when
matplotlib is installed, ``<prefix>.png`` (the deltas with their intervals).

The command line is ``benchmarks/ablate.py``; this module holds everything it needs (and the
tests), see ``main``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from pcvr.config import PROJECT_DIR, parse_config, to_flat_dict

TRAIN_PY = os.path.join(PROJECT_DIR, "train.py")
INFER_PY = os.path.join(PROJECT_DIR, "infer.py")
DEMO_PY = os.path.join(PROJECT_DIR, "demo_data.py")
DEMO_ROOT = os.path.join(PROJECT_DIR, ".demo_data", "ablation")
RESULT_FILE = "result.json"
EFFECTS = ("base", "abs_time", "activity", "pair_62_66", "seq_affinity", "user_x_item",
           "dense_dot")
DEMO_TZ = {"default": 8.0, "west": -5.0, "utc": 0.0}     # pcvr/demo/variants.py
DEFAULT_BASE = "--preset seed --num_epochs 1"
DEFAULT_DEMO_ROWS = 50000
QUICK_DEMO_ROWS, QUICK_EVAL_ROWS = 6000, 2000


# ----------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class Variant:
    """One row of the table: train.py flags added to the base.

    Attributes:
        name: the row's label (``base`` is the reference every delta is taken against).
        flags: the flags, as a train.py command line would list them.
        seed_report: what the seed's log reported for this feature (README comparison).
    """
    name: str
    flags: Tuple[str, ...] = ()
    seed_report: str = ""


BASE = Variant("base", (), "0.811 -> 0.8309 in total")
# Each seed feature off (its report is the gain the seed's log gave for adding it).
SEED_FEATURES_OFF: Tuple[Variant, ...] = (
    Variant("-abs_time", ("--no_abs_time_emb",), "+0.012"),
    Variant("-activity_dense", ("--no_user_activity_dense",), "+0.0005"),
    Variant("-pair_62_66", ("--no_pair_62_66",), "+0.06 (as written)"),
    Variant("-bf16_train", ("--no_bf16_train",), "not scored (with EMA: 'implemented wrong, "
                                                 "gain ~1e-4')"),
)
# Each experimental option on (the seed's code has them, its run.sh leaves them off).
EXPERIMENTAL_ON: Tuple[Variant, ...] = (
    Variant("+ns_se_gate", ("--use_ns_se_gate",), "+0.002 (with NS self-attention)"),
    Variant("+ns_self_attn", ("--use_ns_self_attn",), "+0.002 (with the SE gate)"),
    Variant("+combined_autoint", ("--use_combined_autoint",), "not scored"),
    Variant("+target_attention", ("--use_target_attention",), "negative"),
    Variant("+head_cross", ("--head_cross_layers", "2"), "negative"),
    Variant("+dense_cross_token", ("--use_dense_cross_token", "--user_ns_tokens", "4"),
            "large drop"),
    Variant("+randomized_split", ("--randomized_split",), "negative"),
    Variant("+ema", ("--ema_decay", "0.999", "--ema_start_epoch", "1"),
            "'implemented wrong', ~1e-4"),
    # issue 17's options
    Variant("+swa", ("--swa_start_frac", "0.5"), "new (issue 17)"),
    Variant("+field_cross", ("--use_field_cross", "--interaction_lr", "3e-3"),
            "new (issue 17)"),
    Variant("+pair_target_attn", ("--use_pair_target_attn", "--interaction_lr", "3e-3"),
            "new (issue 17)"),
    Variant("recommended", ("--preset", "recommended"), "new (issue 17): both of the above + --use_history_fields"),
)
DEFAULT_VARIANTS: Tuple[Variant, ...] = (BASE,) + SEED_FEATURES_OFF + EXPERIMENTAL_ON
QUICK_VARIANTS: Tuple[Variant, ...] = (BASE, SEED_FEATURES_OFF[2], EXPERIMENTAL_ON[-1])


def parse_variant(text: str) -> Variant:
    """``'NAME=FLAGS'`` (or ``'NAME: FLAGS'``) -> a ``Variant``; ``'base'`` alone is the base.

    Raises:
        ValueError: no name.
    """
    m = re.search(r"[=:]", text)
    name, flags = (text[:m.start()], text[m.end():]) if m else (text, "")
    name = name.strip()
    if not name:
        raise ValueError(f"variant {text!r}: expected NAME=FLAGS")
    return Variant(name, tuple(shlex.split(flags)))


def load_variants(spec: str) -> List[Variant]:
    """``'default'``, ``'quick'``, or a file of one ``NAME=FLAGS`` line per variant (``#``
    comments; a line ``base`` or ``base=`` is the base, added first when missing)."""
    if spec == "default":
        return list(DEFAULT_VARIANTS)
    if spec == "quick":
        return list(QUICK_VARIANTS)
    with open(spec, "r", encoding="utf-8") as fh:
        out = [parse_variant(line.strip()) for line in fh
               if line.strip() and not line.lstrip().startswith("#")]
    return with_base(out)


def with_base(variants: Sequence[Variant]) -> List[Variant]:
    """The variants with the base first (added when missing); duplicate names refused."""
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate variant names: {dup}")
    base = [v for v in variants if v.name == BASE.name]
    rest = [v for v in variants if v.name != BASE.name]
    return [dataclasses.replace(base[0], flags=base[0].flags) if base else BASE] + rest


# ----------------------------------------------------------------------------- statistics

# Two-sided 95 % Student-t quantiles t_{0.975, df}, df = 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError("t975 needs df >= 1")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """(mean, sample std); std is NaN for fewer than two values, both NaN for none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def paired_delta(base: Mapping[int, float], other: Mapping[int, float]
                 ) -> Tuple[float, float, int]:
    """(mean delta, 95 % half-width, n) of ``other[s] - base[s]`` over the seeds in both.

    The half-width is NaN with fewer than two pairs (mean NaN with none).
    """
    seeds = sorted(s for s in other if s in base and math.isfinite(other[s])
                   and math.isfinite(base[s]))
    d = [other[s] - base[s] for s in seeds]
    m, sd = mean_std(d)
    if len(d) < 2:
        return m, float("nan"), len(d)
    return m, t975(len(d) - 1) * sd / math.sqrt(len(d)), len(d)


def beyond_noise(delta: float, half_width: float) -> str:
    """'yes' when the 95 % interval excludes 0, 'no' when it holds it, 'n/a' without one."""
    if not (math.isfinite(delta) and math.isfinite(half_width)):
        return "n/a"
    return "yes" if abs(delta) > half_width else "no"


# ----------------------------------------------------------------------------- output parsing

def parse_score_output(text: str) -> Dict[str, Any]:
    """``infer.py --score``'s printout -> ``auc``, ``logloss``, ``rows``, ``oracle_auc``,
    ``oracle_lift`` (when printed) and ``capture`` (effect -> weight, when printed).

    Raises:
        ValueError: no ``auc ...`` line.
    """
    out: Dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("planted effect") and ":" in line:
            pairs = [p.strip().rsplit(" ", 1) for p in line.split(":", 1)[1].split(",")]
            out["capture"] = {k.strip(): float(v) for k, v in pairs if k.strip()}
        elif line.startswith("auc "):
            tokens = line.split()
            for key, value in zip(tokens[::2], tokens[1::2]):
                out[key] = float(value)
    if "auc" not in out:
        raise ValueError("infer.py printed no 'auc ...' line")
    return out


def error_line(text: str, returncode: int) -> str:
    """The most telling line of a failed command's output: the last ``error:`` line (the
    project's and argparse's), else the last line of a traceback, else the exit code."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or ": error:" in ln:
            return ln[:300]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", ln):
            return ln[:300]
    tail = lines[-1][:200] if lines else ""
    return f"exit code {returncode}" + (f": {tail}" if tail else "")


# ----------------------------------------------------------------------------- data

def data_fingerprint(data_dir: Optional[str]) -> str:
    """Names, sizes and modification times of a folder's parquet files and schema (or one
    file): a regenerated data folder gets a new fingerprint, so cached cells are not reused."""
    if not data_dir:
        return ""
    h = hashlib.sha1()
    if os.path.isfile(data_dir):
        entries = [data_dir]
    elif os.path.isdir(data_dir):
        entries = [os.path.join(data_dir, n) for n in sorted(os.listdir(data_dir))
                   if n.endswith(".parquet") or n in ("schema.json", "truth.npz")]
    else:
        return "missing:" + os.path.abspath(data_dir)
    for path in entries:
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def generator_fingerprint() -> str:
    """A hash of the demo generator's source (pcvr/demo/*.py): new code, new data."""
    h = hashlib.sha1()
    demo = os.path.join(PROJECT_DIR, "pcvr", "demo")
    for name in sorted(os.listdir(demo)):
        if name.endswith(".py"):
            with open(os.path.join(demo, name), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:10]


def demo_dir(rows: int, eval_rows: int, variant: str, flags: Sequence[str],
             root: str = DEMO_ROOT) -> str:
    """Where the demo data of these options is cached."""
    key = hashlib.sha1(json.dumps([list(flags), generator_fingerprint()]).encode())
    return os.path.join(root, f"{variant}_r{rows}_e{eval_rows}_{key.hexdigest()[:8]}")


def ensure_demo_data(rows: int, eval_rows: int, variant: str = "default",
                     flags: Sequence[str] = (), root: str = DEMO_ROOT,
                     log=print) -> str:
    """Generates demo data once (``demo_data.py`` in a subprocess) and returns its folder."""
    out = demo_dir(rows, eval_rows, variant, flags, root)
    marker = os.path.join(out, ".ablation_done")
    if not os.path.isfile(marker):
        cmd = [sys.executable, DEMO_PY, "--out", out, "--rows", str(rows), "--eval_rows",
               str(eval_rows), "--variant", variant] + list(flags)
        log(f"generating demo data: {' '.join(shlex.quote(c) for c in cmd[1:])}")
        subprocess.run(cmd, cwd=PROJECT_DIR, check=True)
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write(" ".join(cmd[2:]))
    return out


# ----------------------------------------------------------------------------- cells

@dataclass
class Settings:
    """Where and how the cells run.

    Attributes:
        data_dir: the training data folder.
        eval_dir: the held-out split scored by infer.py (None: the validation AUC is used).
        base_flags: train.py flags of the base (a ``--preset`` among them).
        seeds: the seeds of every variant.
        work_dir: cells (and their cache) live under ``<work_dir>/cells``.
        jobs: cells run at once.
        threads: torch / OpenMP threads per cell.
        workers: DataLoader workers per cell.
        keep_checkpoints: keep each cell's checkpoints (they are deleted once it is scored).
        timeout_s: wall-clock limit of one train.py (0 = none).
    """
    data_dir: str
    eval_dir: Optional[str]
    base_flags: Tuple[str, ...]
    seeds: Tuple[int, ...]
    work_dir: str
    jobs: int = 1
    threads: int = 1
    workers: int = 1
    keep_checkpoints: bool = False
    timeout_s: float = 0.0


@dataclass
class Cell:
    """One (variant, seed) of the table."""
    variant: Variant
    seed: int
    train_flags: Tuple[str, ...]
    key: str
    dir: str

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed {self.seed}"


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("+", "plus_").replace("-", "minus_"))
    return s.strip("_")[:60] or "variant"


def plan_cells(variants: Sequence[Variant], st: Settings) -> List[Cell]:
    """Every (variant, seed) cell, seed-major (a complete one-seed table comes first)."""
    data_fp = data_fingerprint(st.data_dir)
    eval_fp = data_fingerprint(st.eval_dir)
    cells = []
    for seed in st.seeds:
        for v in variants:
            flags = tuple(st.base_flags) + tuple(v.flags) + ("--seed", str(seed))
            key = hashlib.sha1(json.dumps(
                [v.name, resolved_config(flags, st.data_dir), data_fp,
                 os.path.abspath(st.eval_dir) if st.eval_dir else "", eval_fp]
            ).encode()).hexdigest()[:12]
            cells.append(Cell(v, seed, flags, key,
                              os.path.join(st.work_dir, "cells",
                                           f"{_slug(v.name)}.s{seed}.{key}")))
    return cells


# Flags that say where a cell's files go, not what it trains.
_PATH_FLAGS = ("ckpt_dir", "log_dir", "tf_events_dir", "num_workers", "resume")


def resolved_config(flags: Sequence[str], data_dir: str) -> Any:
    """What a cell trains, for its cache key: every flag's value after the presets (so a
    changed preset does not reuse a stale cell), or the flags themselves when they do not
    parse (that cell is reported, never cached)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            # the runner's --data_dir first: a variant's own --data_dir wins, as in run_cell
            cfg = parse_config(["--data_dir", data_dir] + list(flags), environ={})
    except (SystemExit, Exception):  # noqa: BLE001 - reported by check_flags
        return list(flags)
    flat = to_flat_dict(cfg)
    flat["data_dir"] = os.path.abspath(str(flat.get("data_dir") or data_dir))
    return {k: v for k, v in sorted(flat.items()) if k not in _PATH_FLAGS}


def check_flags(flags: Sequence[str]) -> Optional[str]:
    """Parses train.py flags as train.py would; returns the error, or None when they parse."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse_config(list(flags) + ["--data_dir", "."], environ={})
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        return re.sub(r"^\S+: error: ", "", lines[-1].strip()) if lines else \
            "the flags do not parse"
    except Exception as exc:  # noqa: BLE001 - a bad value is reported, not raised
        return f"{type(exc).__name__}: {exc}"
    return None


def load_cached(cell: Cell) -> Optional[Dict[str, Any]]:
    """A finished cell's result, or None."""
    path = os.path.join(cell.dir, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as fh:
            res = json.load(fh)
    except (OSError, ValueError):
        return None
    return res if res.get("status") == "ok" else None


def _run(cmd: List[str], log_path: str, env: Mapping[str, str], timeout_s: float
         ) -> Tuple[int, str, float]:
    """Runs ``cmd``, its output to ``log_path``; returns (exit code, output, seconds)."""
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=PROJECT_DIR, env=dict(env), stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout_s or None)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = 124
            log.write(f"\nerror: timed out after {timeout_s:.0f} s\n")
    with open(log_path, "r", encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    return code, text, time.perf_counter() - t0


def cell_env(threads: int) -> Dict[str, str]:
    """The environment of a cell's processes: ``threads`` OpenMP / MKL / torch threads."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    for var in ("TRAIN_DATA_PATH", "TRAIN_CKPT_PATH", "TRAIN_LOG_PATH", "TRAIN_TF_EVENTS_PATH",
                "TRAIN_RESUME"):
        env.pop(var, None)  # the cell's own paths, never the platform's
    return env


def run_cell(cell: Cell, st: Settings) -> Dict[str, Any]:
    """Trains and scores one cell; returns its result (``status`` 'ok' or 'error')."""
    res: Dict[str, Any] = {"variant": cell.variant.name, "seed": cell.seed,
                           "flags": list(cell.variant.flags), "key": cell.key}
    bad = check_flags(list(cell.train_flags))
    if bad is not None:
        return dict(res, status="error", error=f"flags: {bad}")
    if os.path.isdir(cell.dir):
        shutil.rmtree(cell.dir)  # an unfinished earlier attempt
    os.makedirs(cell.dir)
    ckpt = os.path.join(cell.dir, "ckpt")
    env = cell_env(st.threads)
    t0 = time.perf_counter()
    # base flags, the runner's data and workers, the variant's flags (which may name another
    # --data_dir), the seed, and the cell's own folders last
    n_base = len(st.base_flags)
    train_cmd = ([sys.executable, "-u", TRAIN_PY] + list(cell.train_flags[:n_base])
                 + ["--data_dir", st.data_dir, "--num_workers", str(st.workers)]
                 + list(cell.train_flags[n_base:])
                 + ["--ckpt_dir", ckpt, "--log_dir", os.path.join(cell.dir, "logs")])
    code, text, train_s = _run(train_cmd, os.path.join(cell.dir, "train.log"), env,
                               st.timeout_s)
    res["train_s"] = round(train_s, 1)
    if code != 0:
        return dict(res, status="error", error=f"train: {error_line(text, code)}")
    try:
        with open(os.path.join(ckpt, "best_checkpoint.json"), "r", encoding="utf-8") as fh:
            best = json.load(fh)
    except (OSError, ValueError) as exc:
        return dict(res, status="error", error=f"train: no best_checkpoint.json ({exc})")
    res["valid_auc"] = best.get("valid_auc")
    if st.eval_dir:
        score_cmd = [sys.executable, "-u", INFER_PY, "--model_dir",
                     os.path.join(ckpt, best["checkpoint"]), "--data_dir", st.eval_dir,
                     "--result_dir", os.path.join(cell.dir, "predictions"), "--score"]
        code, text, score_s = _run(score_cmd, os.path.join(cell.dir, "score.log"), env,
                                   st.timeout_s)
        res["score_s"] = round(score_s, 1)
        if code != 0:
            return dict(res, status="error", error=f"score: {error_line(text, code)}")
        try:
            res.update(parse_score_output(text))
        except ValueError as exc:
            return dict(res, status="error", error=f"score: {exc}")
        res["auc_source"] = "held-out"
    else:
        if res["valid_auc"] is None:
            return dict(res, status="error", error="no held-out split and no validation AUC")
        res["auc"] = float(res["valid_auc"])
        res["auc_source"] = "validation"
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["status"] = "ok"
    if not st.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    with open(os.path.join(cell.dir, RESULT_FILE), "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=1)
    return res


# ----------------------------------------------------------------------------- the table

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


def write_csv(rows: Sequence[Row], path: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for r in rows:
            w.writerow([r.variant.name, " ".join(r.variant.flags), r.n_ok, r.n,
                        _f(r.auc[0], 6), _f(r.auc[1], 6), _f(r.delta[0], 6, True),
                        _f(r.delta[1], 6), r.delta[2], r.noise, _f(r.oracle_auc, 6),
                        _f(r.lift[0], 4), _f(r.lift[1], 4)]
                       + [_f(r.capture.get(e, float("nan")), 3) for e in EFFECTS]
                       + [_f(r.wall_s, 1), r.variant.seed_report, "; ".join(r.errors)])


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
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- running

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
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def usable_cores() -> int:
    """CPUs this process may use (affinity mask, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
        with open(prefix + "_curve.csv", "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(("rows",) + CSV_FIELDS)
            for n, r in points:
                w.writerow([n, r.variant.name, " ".join(r.variant.flags), r.n_ok, r.n,
                            _f(r.auc[0], 6), _f(r.auc[1], 6), _f(r.delta[0], 6, True),
                            _f(r.delta[1], 6), r.delta[2], r.noise, _f(r.oracle_auc, 6),
                            _f(r.lift[0], 4), _f(r.lift[1], 4)]
                           + [_f(r.capture.get(e, float("nan")), 3) for e in EFFECTS]
                           + [_f(r.wall_s, 1), r.variant.seed_report, "; ".join(r.errors)])
    if points:
        print(curve_markdown(points))
        print(f"learning curve in {prefix}_curve.md / .csv / .png")
    return [r for _, r in points]


def default_parallelism(cores: int) -> Tuple[int, int]:
    """(jobs, threads per job) for ``cores`` cores: one single-threaded cell per core (no
    intra-op threads to oversubscribe; README "ablation runner" has the measurement)."""
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
