"""Golden output: the platform path (TRAIN_* variables -> train.py, then infer.py's ``main()``)
gives the predictions recorded before the package redesign, for the same data and seed.

``tests/golden/tiny_predictions.json`` was written by the pre-redesign code (commit a9ab9f7)
with exactly the flags below, and ``tests/golden/format1_checkpoint/`` is the checkpoint it
predicted with (format 1, before ``checkpoint.json``): loading it must still give the same
predictions. Float32 training; the tolerance covers the last bits that a
different thread count or CPU changes (two thread counts differ by 4e-6 here).
"""
import json
import os

import numpy as np
import pytest

import infer
import train
from pcvr.demo.generator import generate

HERE = os.path.dirname(os.path.abspath(__file__))
FLAGS = ["--d_model", "16", "--emb_dim", "8", "--num_heads", "2", "--num_queries", "2",
         "--user_ns_tokens", "6", "--item_ns_tokens", "1", "--ns_groups_json", "",
         "--hidden_mult", "2", "--seq_max_lens", "seq_a:8,seq_b:8,seq_c:12,seq_d:16",
         "--batch_size", "64", "--num_workers", "0", "--buffer_batches", "2",
         "--use_abs_time_emb", "--time_zone_offset_hours", "8", "--use_pair_62_66",
         "--num_epochs", "2", "--seed", "7", "--ema_decay", "0.9", "--ema_start_epoch", "1",
         # the recording validated on the last of 4 row groups (then max(1, int(0.1 * 4)) row
         # groups); the split by rows takes the same 200 rows at 0.25 (README fix 8)
         "--valid_ratio", "0.25"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("golden") / "data"
    generate(str(path), rows=800, seed=3, eval_rows=200, vocab_cap=500, seq_len_scale=0.01,
             rows_per_group=200)
    return path


def _recorded():
    return json.load(open(os.path.join(HERE, "golden", "tiny_predictions.json")))["predictions"]


def test_platform_train_then_infer_matches_the_recorded_predictions(data, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("TRAIN_DATA_PATH", str(data))
    monkeypatch.setenv("TRAIN_CKPT_PATH", str(tmp_path / "ckpt"))
    monkeypatch.setenv("TRAIN_LOG_PATH", str(tmp_path / "logs"))
    monkeypatch.setenv("TRAIN_TF_EVENTS_PATH", str(tmp_path / "tb"))
    train.main(FLAGS)
    best = json.load(open(tmp_path / "ckpt" / "best_checkpoint.json"))["checkpoint"]
    monkeypatch.setenv("MODEL_OUTPUT_PATH", str(tmp_path / "ckpt" / best))
    monkeypatch.setenv("EVAL_DATA_PATH", str(data / "eval"))
    monkeypatch.setenv("EVAL_RESULT_PATH", str(tmp_path / "res"))
    infer.main()
    got = json.load(open(tmp_path / "res" / "predictions.json"))["predictions"]
    want = _recorded()
    assert best == "global_step20.epoch2.layer=2.head=2.hidden=16"
    assert list(got) == list(want)
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=0,
                               atol=1e-4)
    assert np.std(list(got.values())) > 1e-3  # not a constant prediction


def test_a_format1_checkpoint_still_loads_and_predicts_the_same(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_OUTPUT_PATH", os.path.join(HERE, "golden", "format1_checkpoint"))
    monkeypatch.setenv("EVAL_DATA_PATH", str(data / "eval"))
    monkeypatch.setenv("EVAL_RESULT_PATH", str(tmp_path / "res"))
    infer.main()
    got = json.load(open(tmp_path / "res" / "predictions.json"))["predictions"]
    want = _recorded()
    assert list(got) == list(want)
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=0,
                               atol=1e-6)
