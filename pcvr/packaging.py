"""The submission bundle: the inference code and the chosen checkpoint in one zip, checked
against the platform's limit and dry-run before it is called good.

The bundle (``package.py --ckpt DIR --out FILE``) holds::

    code/infer.py, code/pcvr/...    infer.py and exactly the modules it imports (found by
                                    importing it in a fresh interpreter), what the platform's
                                    evaluation uploads: at most ``CODE_LIMIT_BYTES``
    model/<global_step...>/          the checkpoint folder without its training state
                                    (train_state.pt is for resuming, not for inference)

The dry run unpacks the zip into an empty temporary folder and calls ``infer.main()`` there the
way the platform does (no arguments, the three environment variables, an isolated
interpreter that sees only the unpacked files) on a few rows: ``--data DIR`` or, by default,
demo rows generated for the checkpoint's own schema. ``predictions.json`` must then hold one
probability in [0, 1] for every row.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import List, Optional, Tuple

from pcvr import checkpoint
from pcvr.config import flag
from pcvr.errors import CheckpointError, PCVRError

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The platform's limit on the uploaded scripts (pipeline_spec §4.1).
CODE_LIMIT_BYTES = 100 * 1000 * 1000
DRY_RUN_ROWS = 64
DRY_RUN_TIMEOUT_S = 600


class PackageError(PCVRError):
    """A bundle that cannot be built, is too large, or fails its dry run."""
    exit_code = 7
    hint = "see the message; the bundle was not written or must not be uploaded"


@dataclass
class PackageOptions:
    """Options of package.py."""
    ckpt: Optional[str] = flag(None, "checkpoint folder to ship (a global_step* folder, or a "
                               "checkpoint root with best_checkpoint.json), required")
    out: str = flag("submission.zip", "the zip to write")
    data: Optional[str] = flag(None, "parquet rows for the dry run (default: demo rows "
                               "generated for the checkpoint's schema)")


def inference_files() -> List[str]:
    """Paths, relative to the project folder, of ``infer.py`` and every module of the
    project it imports (in a fresh interpreter, so nothing else is loaded)."""
    probe = ("import json, os, sys; sys.path.insert(0, os.getcwd()); import infer; "
             "print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() "
             "if (n == 'pcvr' or n.startswith('pcvr.')) and getattr(m, '__file__', None))))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_DIR, check=True,
                         capture_output=True, text=True).stdout
    files = [os.path.relpath(p, PROJECT_DIR) for p in json.loads(out.strip().splitlines()[-1])]
    return ["infer.py"] + files


def build(ckpt_dir: str, out: str) -> Tuple[int, int]:
    """Writes the bundle ``out``; returns (code bytes, checkpoint bytes).

    Raises:
        PackageError: the code exceeds ``CODE_LIMIT_BYTES``.
    """
    files = inference_files()
    code_bytes = sum(os.path.getsize(os.path.join(PROJECT_DIR, f)) for f in files)
    if code_bytes > CODE_LIMIT_BYTES:
        raise PackageError(f"the inference code is {code_bytes / 1e6:.1f} MB, over the "
                           f"platform's {CODE_LIMIT_BYTES / 1e6:.0f} MB")
    name = os.path.basename(os.path.normpath(ckpt_dir))
    ckpt_files = sorted(f for f in os.listdir(ckpt_dir) if f != checkpoint.STATE_FILE)
    ckpt_bytes = sum(os.path.getsize(os.path.join(ckpt_dir, f)) for f in ckpt_files)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(os.path.join(PROJECT_DIR, f), os.path.join("code", f))
        for f in ckpt_files:
            zf.write(os.path.join(ckpt_dir, f), os.path.join("model", name, f))
    os.replace(tmp, out)
    return code_bytes, ckpt_bytes


def _dry_run_data(ckpt: checkpoint.Checkpoint, folder: str) -> str:
    """A few demo rows for the checkpoint's schema (its vocabularies as they are)."""
    from pcvr.demo.generator import generate  # the generator is only needed to package
    try:
        generate(folder, rows=DRY_RUN_ROWS, eval_rows=0, vocab_cap=0, seq_len_scale=0.01,
                 files=1, schema=ckpt.schema_path, verbose=False)
    except (KeyError, ValueError) as exc:
        raise PackageError(f"{ckpt.schema_path}: no demo rows can be generated for this "
                           f"schema ({exc}); pass --data with a few rows of real data") from exc
    return folder


def dry_run(bundle: str, data: Optional[str]) -> int:
    """Unpacks ``bundle`` into a clean folder and runs its ``infer.main()`` on ``data`` (or
    demo rows); returns the number of predictions.

    Raises:
        PackageError: the run fails or writes a wrong ``predictions.json``.
    """
    with tempfile.TemporaryDirectory(prefix="pcvr-dry-run-") as root:
        with zipfile.ZipFile(bundle) as zf:
            zf.extractall(root)
        (name,) = os.listdir(os.path.join(root, "model"))
        model_dir = os.path.join(root, "model", name)
        if data is None:
            data = _dry_run_data(checkpoint.read(model_dir), os.path.join(root, "rows"))
        result = os.path.join(root, "result")
        env = {"PATH": os.environ.get("PATH", ""), "HOME": root, "MODEL_OUTPUT_PATH": model_dir,
               "EVAL_DATA_PATH": data, "EVAL_RESULT_PATH": result}
        call = "import sys; sys.path.insert(0, 'code'); import infer; infer.main()"
        proc = subprocess.run([sys.executable, "-I", "-c", call], cwd=root, env=env,
                              capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT_S)
        if proc.returncode != 0:
            raise PackageError(f"{bundle}: the dry run of infer.main() failed:\n"
                               f"{proc.stderr[-4000:]}")
        try:
            with open(os.path.join(result, "predictions.json"), encoding="utf-8") as fh:
                preds = json.load(fh)["predictions"]
        except (OSError, ValueError, KeyError) as exc:
            raise PackageError(f"{bundle}: the dry run wrote no valid predictions.json "
                               f"({exc})") from exc
        bad = [k for k, v in preds.items() if not (isinstance(v, float) and 0.0 <= v <= 1.0)]
        if not preds or bad:
            raise PackageError(f"{bundle}: the dry run's predictions are not probabilities "
                               f"({len(preds)} rows, {len(bad)} out of [0, 1])")
        return len(preds)


def package(opts: PackageOptions) -> Tuple[int, int, int]:
    """Builds and dry-runs the bundle of ``opts``; returns (code bytes, checkpoint bytes,
    dry-run rows).

    Raises:
        CheckpointError: no usable checkpoint at ``opts.ckpt``.
        PackageError: see ``build`` and ``dry_run``.
    """
    if not opts.ckpt:
        raise CheckpointError("package.py needs --ckpt: a global_step* checkpoint folder")
    ckpt_dir = checkpoint.resolve_model_dir(opts.ckpt)
    checkpoint.load_model(checkpoint.read(ckpt_dir))  # strict: fails here, not on upload
    code_bytes, ckpt_bytes = build(ckpt_dir, opts.out)
    try:
        rows = dry_run(opts.out, opts.data)
    except BaseException:
        os.remove(opts.out)  # never leave a bundle that failed its dry run
        raise
    return code_bytes, ckpt_bytes, rows
