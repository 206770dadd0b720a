"""One (variant, seed) cell: its plan and cache key, the flag check, the cache, and its run."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pcvr.ablation.data import data_fingerprint
from pcvr.ablation.variants import Variant
from pcvr.config import PROJECT_DIR, parse_config, to_flat_dict

TRAIN_PY = os.path.join(PROJECT_DIR, "train.py")
INFER_PY = os.path.join(PROJECT_DIR, "infer.py")
RESULT_FILE = "result.json"


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
