"""Every failure path a user meets: --help of every entry point, single-class labels, damaged
checkpoints, file modes, checkpoint writes, damaged row groups, repairs in validation, and how
the command lines report the project's errors. Each fault is made the way a user meets it (a
truncated file on disk, a garbled page), not mocked."""
import glob
import json
import logging
import os
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import infer
import train
from _parquet_util import TINY_MODEL_FLAGS, TINY_SCHEMA, tiny_table, write_dataset
from pcvr import atomic, checkpoint
from pcvr.errors import CheckpointError, ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRAIN = TINY_MODEL_FLAGS + ["--batch_size", "8", "--num_epochs", "1", "--valid_ratio",
                                 "0.25"]
ENV_PATHS = ("TRAIN_DATA_PATH", "TRAIN_CKPT_PATH", "TRAIN_LOG_PATH", "TRAIN_TF_EVENTS_PATH")


@pytest.fixture(autouse=True)
def no_platform_env(monkeypatch):
    for name in ENV_PATHS:
        monkeypatch.delenv(name, raising=False)


def with_labels(table: pa.Table, label_type: int) -> pa.Table:
    i = table.schema.get_field_index("label_type")
    return table.set_column(i, "label_type", pa.array([label_type] * table.num_rows, pa.int32()))


@pytest.fixture
def data(tmp_path):
    """40 training rows and 8 validation rows (the tail row group), both classes in each."""
    folder = tmp_path / "data"
    write_dataset(str(folder), [tiny_table(range(48))], TINY_SCHEMA, rows_per_group=8)
    return folder


def run_train(data_dir, ckpt_dir, *extra):
    return train.main(TINY_TRAIN + ["--data_dir", str(data_dir), "--ckpt_dir", str(ckpt_dir),
                                    *extra])


# ----------------------------------------------------------------------------- --help
def entry_points():
    """Every script a user runs: the top-level ones, the benchmarks and the helper scripts."""
    top = [p for p in glob.glob(os.path.join(ROOT, "*.py"))
           if "__main__" in open(p, encoding="utf-8").read()]
    more = glob.glob(os.path.join(ROOT, "benchmarks", "*.py")) + \
        glob.glob(os.path.join(ROOT, "scripts", "*.py"))
    return sorted(top + [p for p in more if "__main__" in open(p, encoding="utf-8").read()])


def test_every_entry_point_prints_its_help():
    scripts = entry_points()
    assert {"train.py", "infer.py", "demo_data.py"} <= {os.path.basename(p) for p in scripts}

    def help_of(path):
        return path, subprocess.run([sys.executable, path, "--help"], capture_output=True,
                                    text=True, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        for path, proc in pool.map(help_of, scripts):
            assert proc.returncode == 0 and "usage:" in proc.stdout, (path, proc.stderr[-2000:])


# ----------------------------------------------------------------------------- labels
def test_a_training_split_without_positives_is_an_error(tmp_path):
    write_dataset(str(tmp_path / "d"), [with_labels(tiny_table(range(48)), 1)], TINY_SCHEMA,
                  rows_per_group=8)
    with pytest.raises(DataError, match="training split has only negative labels"):
        run_train(tmp_path / "d", tmp_path / "ck")


def test_a_single_class_validation_split_warns_and_records_the_last_checkpoint(
        tmp_path, caplog):
    table = tiny_table(range(48))
    write_dataset(str(tmp_path / "d"), [table.slice(0, 40), with_labels(table.slice(40), 1)],
                  TINY_SCHEMA, rows_per_group=8)
    with caplog.at_level(logging.INFO):
        # the last ceil(0.16 * 48) = 8 rows validate: the all-positive group
        result = run_train(tmp_path / "d", tmp_path / "ck", "--num_epochs", "2",
                           "--valid_ratio", "0.16")
    assert "labels: train 14 positive / 26 negative, valid 0 positive / 8 negative" \
        in caplog.text
    assert "validation split has a single class" in caplog.text
    assert "recording the last checkpoint" in caplog.text
    best = json.load(open(tmp_path / "ck" / "best_checkpoint.json"))
    assert best == {"checkpoint": os.path.basename(result.best_checkpoint), "valid_auc": None}
    assert best["checkpoint"].startswith("global_step10.epoch2")


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture
def trained(data, tmp_path):
    result = run_train(data, tmp_path / "ck")
    return tmp_path / "ck", result.best_checkpoint


def test_a_truncated_model_pt_names_the_file(trained):
    _, best = trained
    path = os.path.join(best, "model.pt")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=f"{path}: damaged or truncated.*train again"):
        checkpoint.load_model(checkpoint.read(best))


def test_a_train_config_that_is_not_json_names_the_file(trained):
    _, best = trained
    path = os.path.join(best, "train_config.json")
    with open(path, "w") as fh:
        fh.write('{"d_model": 16,')
    with pytest.raises(CheckpointError, match=f"{path}: damaged, not valid JSON"):
        checkpoint.read(best)


def test_model_output_path_at_the_root_takes_the_best_checkpoint(trained, data, tmp_path,
                                                                 caplog):
    root, best = trained
    with caplog.at_level(logging.INFO):
        infer.main(["--model_dir", str(root), "--data_dir", str(data), "--result_dir",
                    str(tmp_path / "res")])
    assert f"using {os.path.basename(best)}, named by best_checkpoint.json" in caplog.text
    os.remove(root / "best_checkpoint.json")
    with pytest.raises(CheckpointError, match="not a checkpoint folder") as err:
        checkpoint.resolve_model_dir(str(root))
    assert os.path.basename(best) in str(err.value)


def test_written_files_follow_the_umask(data, tmp_path):
    old = os.umask(0o027)
    try:
        result = run_train(data, tmp_path / "ck")
        infer.main(["--model_dir", result.best_checkpoint, "--data_dir", str(data),
                    "--result_dir", str(tmp_path / "res")])
    finally:
        os.umask(old)

    def mode(p: str) -> int:
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(result.best_checkpoint) == 0o750
    assert {mode(p) for p in glob.glob(os.path.join(result.best_checkpoint, "*"))} == {0o640}
    assert mode(tmp_path / "ck" / "best_checkpoint.json") == 0o640
    assert mode(tmp_path / "res" / "predictions.json") == 0o640


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_checkpoint_keeps_one_readable(tmp_path, monkeypatch, exchange):
    if not exchange:  # the move-aside fallback of systems without renameat2
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = tmp_path / "global_step1"
    with atomic.atomic_dir(str(final)) as tmp:
        open(os.path.join(tmp, "model.pt"), "w").write("0")
    seen_missing, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            if not (final / "model.pt").exists():
                seen_missing.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    for k in range(1, 30):
        with atomic.atomic_dir(str(final)) as tmp:
            open(os.path.join(tmp, "model.pt"), "w").write(str(k))
    stop.set()
    thread.join()
    assert (final / "model.pt").read_text() == "29"
    assert sorted(os.listdir(tmp_path)) == ["global_step1"]  # no debris
    if exchange:
        assert not seen_missing  # swapped in one step: never absent


def test_a_killed_write_leaves_the_previous_checkpoint_and_its_debris_is_removed(
        data, tmp_path, monkeypatch, caplog):
    result = run_train(data, tmp_path / "ck")
    before = open(os.path.join(result.best_checkpoint, "model.pt"), "rb").read()
    real_save = checkpoint.torch.save

    def dying_save(obj, path, *a, **k):  # the process dies half-way through the next write
        real_save(obj, path, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(result.best_checkpoint, {}, checkpoint.read(result.best_checkpoint).cfg,
                        {}, {}, checkpoint.CheckpointMeta())
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert open(os.path.join(result.best_checkpoint, "model.pt"), "rb").read() == before
    debris = tmp_path / "ck" / ".tmp-global_step5-killed"
    debris.mkdir()
    with caplog.at_level(logging.INFO):
        run_train(data, tmp_path / "ck")
    assert "removed 1 unfinished checkpoint write(s) of an interrupted run: .tmp-global_step5" \
        in caplog.text
    assert not debris.exists()


def test_the_same_step_is_saved_once(data, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        run_train(data, tmp_path / "ck", "--eval_every_n_steps", "5", "--num_epochs", "2")
    saves = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved")]
    steps = [m.split("global_step")[1].split(".")[0] for m in saves]
    assert len(steps) == len(set(steps)) and "5" in steps and "10" in steps


# ----------------------------------------------------------------------------- data
def garble(path: str, row_group: int, column: str) -> None:
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(row_group).column(meta.schema.names.index(column))
    with open(path, "r+b") as fh:  # garble the page header of one column chunk
        fh.seek(col.data_page_offset)
        fh.write(b"\xff" * 24)


def test_check_data_reports_every_damaged_row_group_at_once(tmp_path):
    paths = write_dataset(str(tmp_path / "d"), [tiny_table(range(48)), tiny_table(range(48, 96))],
                          TINY_SCHEMA, rows_per_group=8)
    garble(paths[0], 1, "item_int_feats_5")
    garble(paths[1], 4, "user_int_feats_1")
    with pytest.raises(DataError) as err:
        run_train(tmp_path / "d", tmp_path / "ck", "--check_data", "only", "--num_workers", "2")
    msg = str(err.value)
    assert "2 of 12 row groups do not decode" in msg
    assert f"{paths[0]} | 1 | item_int_feats_5 |" in msg
    assert f"{paths[1]} | 4 | user_int_feats_1 |" in msg
    assert not (tmp_path / "ck" / "best_checkpoint.json").exists()


def test_check_data_passes_clean_data_then_trains(data, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        result = run_train(data, tmp_path / "ck", "--check_data", "first")
    assert "check_data: all 6 row groups of 1 file(s) decode" in caplog.text
    assert result.best_checkpoint is not None


def test_repairs_in_the_validation_split_are_logged(tmp_path, caplog):
    table = tiny_table(range(48))
    dense = [[float("nan"), 1.0] if u >= 40 else [1.0, 1.0] for u in range(48)]
    table = table.set_column(table.schema.get_field_index("user_dense_feats_61"),
                             "user_dense_feats_61", pa.array(dense, pa.list_(pa.float32())))
    write_dataset(str(tmp_path / "d"), [table], TINY_SCHEMA, rows_per_group=8)
    with caplog.at_level(logging.INFO):
        run_train(tmp_path / "d", tmp_path / "ck")
    assert "validation data repairs: nonfinite: user_dense_feats_61=8" in caplog.text


# ----------------------------------------------------------------------------- reporting
def run_script(*args):
    env = {k: v for k, v in os.environ.items() if k not in ENV_PATHS}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


def test_command_lines_print_the_message_and_a_hint_not_a_traceback(tmp_path):
    proc = run_script("train.py", "--data_dir", str(tmp_path / "nope"))
    assert proc.returncode == DataError.exit_code
    assert "error: " in proc.stderr and "no such parquet file or folder" in proc.stderr
    assert "hint: " in proc.stderr and "Traceback" not in proc.stderr
    debug = run_script("train.py", "--data_dir", str(tmp_path / "nope"), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    proc = run_script("infer.py", "--model_dir", str(tmp_path), "--data_dir", str(tmp_path),
                      "--result_dir", str(tmp_path / "out"))
    assert proc.returncode == CheckpointError.exit_code and "Traceback" not in proc.stderr
    write_dataset(str(tmp_path / "d"), [tiny_table(range(16))], TINY_SCHEMA)
    proc = run_script("train.py", *TINY_TRAIN, "--data_dir", str(tmp_path / "d"),
                      "--ckpt_dir", str(tmp_path / "ck"), "--valid_ratio", "1.5")
    assert proc.returncode == ConfigError.exit_code, proc.stderr
    assert "valid_ratio must be in [0, 1), got 1.5" in proc.stderr
