"""Resume: a run killed with SIGKILL and resumed ends exactly where the uninterrupted run
ends; checkpoints are pruned; bad resumes are clear errors."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from _parquet_util import TINY_MODEL_FLAGS, TINY_SCHEMA, tiny_table, write_dataset
from pcvr import checkpoint
from pcvr.errors import CheckpointError, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# EMA from the first epoch, the sparse re-initialisation between epochs and, through
# --min_train_samples (3 passes of the 160 training rows), the interactions' rate that drops
# after the first pass: every piece of state a resume must restore is in play.
BASE = TINY_MODEL_FLAGS + ["--batch_size", "8", "--valid_ratio", "0.2"]
RUN = BASE + ["--ema_decay", "0.9", "--ema_start_epoch", "1", "--save_every_n_steps", "3",
              "--dropout_rate", "0.1", "--seed", "5", "--num_epochs", "1",
              "--min_train_samples", "480", "--use_field_cross", "--interaction_lr", "3e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume") / "data"
    write_dataset(str(folder), [tiny_table(range(200))], TINY_SCHEMA, rows_per_group=20)
    return folder


def train_cmd(data, ckpt, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), *RUN, "--data_dir", str(data),
            "--ckpt_dir", str(ckpt), *extra]


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("TRAIN_")}


def final_state(ckpt_dir):
    """(model weights, training state) of the newest checkpoint."""
    ckpt = checkpoint.read(checkpoint.list_checkpoints(str(ckpt_dir))[-1])
    return checkpoint.load_weights(ckpt), checkpoint.load_train_state(ckpt)


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k != "rng":
                assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{k}]")
    elif isinstance(a, str) and os.path.isabs(a):
        assert os.path.basename(a) == os.path.basename(b), where  # folders of two runs
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(data, tmp_path):
    subprocess.run(train_cmd(data, tmp_path / "full"), check=True, env=clean_env(),
                   capture_output=True, timeout=600)
    # The same run, killed (SIGKILL) as soon as its first resumable checkpoint exists.
    proc = subprocess.Popen(train_cmd(data, tmp_path / "cut"), env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.latest_resumable(str(tmp_path / "cut")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.step_of(os.path.basename(
        checkpoint.latest_resumable(str(tmp_path / "cut"))))
    resumed = subprocess.run(train_cmd(data, tmp_path / "cut", "--resume"), env=clean_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {killed_at}" in resumed.stderr
    weights, state = final_state(tmp_path / "full")
    weights_cut, state_cut = final_state(tmp_path / "cut")
    assert state["global_step"] == state_cut["global_step"] > killed_at
    assert_same(weights, weights_cut, "model.pt")
    assert_same(state, state_cut)  # optimisers, schedulers, EMA, early stopping, history
    assert state["result"]["history"][-1]["auc"] == state_cut["result"]["history"][-1]["auc"]
    assert state["schedulers"][0]["base_lrs"][1] == pytest.approx(1e-3)  # 3e-3 / 3 passes


def test_keep_last_prunes_all_but_the_newest_and_the_best(data, tmp_path):
    result = train.main(BASE + ["--num_epochs", "2", "--save_every_n_steps", "7",
                                "--keep_last", "2", "--data_dir", str(data),
                                "--ckpt_dir", str(tmp_path / "ck")])
    names = sorted(os.listdir(tmp_path / "ck"))
    folders = [n for n in names if n.startswith("global_step")]
    steps = sorted(checkpoint.step_of(n) for n in folders)
    assert os.path.basename(result.best_checkpoint) in folders
    assert len(folders) <= 3 and steps[-1] == result.global_step
    newest_two = steps[-2:]
    assert all(s in newest_two or os.path.basename(result.best_checkpoint).startswith(
        f"global_step{s}.") for s in steps)


def test_bad_resumes_are_clear_errors(data, tmp_path):
    base = BASE + ["--num_epochs", "1", "--data_dir", str(data)]
    with pytest.raises(CheckpointError, match="no such checkpoint folder to resume from"):
        train.main(base + ["--ckpt_dir", str(tmp_path / "a"), "--resume",
                           str(tmp_path / "nothing")])
    result = train.main(base + ["--ckpt_dir", str(tmp_path / "b")])
    state = os.path.join(result.best_checkpoint, "train_state.pt")
    with pytest.raises(ConfigError, match=r"--d_model 16 -> 32"):
        train.main(base + ["--ckpt_dir", str(tmp_path / "b"), "--resume", "--d_model", "32",
                           "--num_heads", "2"])
    with open(state, "r+b") as fh:
        fh.truncate(os.path.getsize(state) // 2)
    with pytest.raises(CheckpointError, match=f"{state}: damaged or truncated"):
        train.main(base + ["--ckpt_dir", str(tmp_path / "b"), "--resume",
                           result.best_checkpoint])
    os.remove(state)
    with pytest.raises(CheckpointError, match="train_state.pt not found"):
        train.main(base + ["--ckpt_dir", str(tmp_path / "b"), "--resume",
                           result.best_checkpoint])
