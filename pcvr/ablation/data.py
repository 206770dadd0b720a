"""The data a table runs on: data and generator fingerprints, and the cached demo data."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from typing import Optional, Sequence

from pcvr.config import PROJECT_DIR

DEMO_PY = os.path.join(PROJECT_DIR, "demo_data.py")
DEMO_ROOT = os.path.join(PROJECT_DIR, ".demo_data", "ablation")
DEMO_TZ = {"default": 8.0, "west": -5.0, "utc": 0.0}     # pcvr/demo/variants.py


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
