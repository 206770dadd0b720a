"""The ablation runner (pcvr/ablation/): statistics, parsing, caching, bad input, and one
real cell end to end on tiny demo data."""
import json
import math
import os
import textwrap

import pytest

from pcvr.ablation import cells
from pcvr.ablation.cells import Settings, check_flags, error_line, parse_score_output
from pcvr.ablation.report import aggregate, markdown_table
from pcvr.ablation.runner import run_table
from pcvr.ablation.stats import beyond_noise, mean_std, paired_delta, t975
from pcvr.ablation.variants import Variant, parse_variant
from pcvr.demo.generator import generate

TINY = ["--d_model", "16", "--emb_dim", "8", "--num_heads", "2", "--num_queries", "2",
        "--user_ns_tokens", "6", "--item_ns_tokens", "1", "--ns_groups_json", "",
        "--hidden_mult", "2", "--seq_max_lens", "seq_a:8,seq_b:8,seq_c:8,seq_d:8",
        "--batch_size", "64", "--buffer_batches", "2", "--num_epochs", "1",
        "--use_pair_62_66"]


def test_statistics():
    assert t975(2) == pytest.approx(4.303) and t975(1000) == pytest.approx(1.96, abs=0.01)
    m, s = mean_std([1.0, 2.0, 3.0])
    assert (m, s) == (2.0, 1.0)
    assert math.isnan(mean_std([1.0])[1]) and math.isnan(mean_std([])[0])
    # paired by seed: only seeds present in both count; a constant shift has no spread
    d, hw, n = paired_delta({1: 0.70, 2: 0.72, 3: 0.71}, {1: 0.71, 2: 0.73, 4: 0.9})
    assert n == 2 and d == pytest.approx(0.01) and hw == pytest.approx(0.0, abs=1e-12)
    d, hw, n = paired_delta({1: 0.70, 2: 0.72, 3: 0.74}, {1: 0.71, 2: 0.72, 3: 0.76})
    assert n == 3 and d == pytest.approx(0.01)
    assert hw == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert beyond_noise(0.01, 0.005) == "yes" and beyond_noise(-0.01, 0.02) == "no"
    assert beyond_noise(0.01, float("nan")) == "n/a"


def test_parsing():
    out = parse_score_output(
        "some log line\nplanted effect -> weight in the model's logit (1 = fully used, 0 = "
        "ignored): base 0.73, abs_time 0.70, pair_62_66 -0.17, r2 0.55\n"
        "auc 0.774900 logloss 0.280000 rows 10000 oracle_auc 0.832500 oracle_lift 0.827\n")
    assert out["auc"] == 0.7749 and out["oracle_lift"] == 0.827 and out["rows"] == 10000
    assert out["capture"] == {"base": 0.73, "abs_time": 0.70, "pair_62_66": -0.17, "r2": 0.55}
    assert parse_score_output("auc 0.6 logloss 0.3 rows 5")["auc"] == 0.6
    with pytest.raises(ValueError):
        parse_score_output("nothing")
    assert error_line("x\nerror: missing column label_type\nhint: y", 3) == \
        "error: missing column label_type"
    assert error_line("Traceback\n  File x\nRuntimeError: boom", 1) == "RuntimeError: boom"
    assert error_line("", 9) == "exit code 9"
    v = parse_variant("+lr=--lr 3e-4 --seq_max_lens seq_a:8")
    assert v == Variant("+lr", ("--lr", "3e-4", "--seq_max_lens", "seq_a:8"))
    assert parse_variant("base").flags == () and parse_variant("x: --a").flags == ("--a",)
    assert check_flags(["--preset", "seed", "--no_such_flag"]) is not None
    assert check_flags(["--preset", "seed", "--use_pair_target_attn"]) is None


def test_aggregate_and_table_with_an_error_row():
    variants = [Variant("base"), Variant("+x", ("--x",)), Variant("bad", ("--bad",))]
    res = [{"variant": "base", "seed": s, "status": "ok", "auc": a, "oracle_auc": 0.8,
            "oracle_lift": (a - 0.5) / 0.3, "capture": {"base": 0.5}, "wall_s": 60}
           for s, a in ((1, 0.70), (2, 0.71), (3, 0.72))]
    res += [{"variant": "+x", "seed": s, "status": "ok", "auc": a, "wall_s": 30}
            for s, a in ((1, 0.72), (2, 0.735), (3, 0.741))]
    res += [{"variant": "bad", "seed": 1, "status": "error", "error": "flags: unknown --bad"}]
    rows = aggregate(variants, res, (1, 2, 3))
    assert rows[1].delta[0] == pytest.approx(0.022) and rows[1].delta[2] == 3
    assert rows[1].noise == "yes" and rows[2].n_ok == 0 and rows[2].errors
    md = markdown_table(rows)
    assert "| +x |" in md and "+0.0220" in md and "unknown --bad" in md
    assert md.count("\n|") == 4  # header, rule and one line per variant


FAKE_TRAIN = textwrap.dedent("""
    import json, os, sys
    a = sys.argv[1:]
    val = lambda k: a[len(a) - 1 - a[::-1].index(k) + 1]
    if "--use_rope" in a:
        print("Traceback (most recent call last):\\nRuntimeError: exploded"); sys.exit(1)
    ckpt = val("--ckpt_dir"); os.makedirs(os.path.join(ckpt, "g"), exist_ok=True)
    with open(os.path.join(os.environ["FAKE_LOG"]), "a") as fh:
        fh.write(" ".join(a) + "\\n")
    json.dump({"checkpoint": "g", "valid_auc": 0.6}, open(os.path.join(ckpt,
              "best_checkpoint.json"), "w"))
    open(os.path.join(ckpt, "g", "seed"), "w").write(val("--seed"))
""")
FAKE_INFER = textwrap.dedent("""
    import os, sys
    a = sys.argv[1:]
    seed = int(open(os.path.join(a[a.index("--model_dir") + 1], "seed")).read())
    print("planted effect -> weight (x): base 0.5, pair_62_66 0.25")
    print(f"auc {0.7 + seed / 1000:.6f} logloss 0.3 rows 10 oracle_auc 0.8 oracle_lift 0.6")
""")


def test_runner_caches_cells_and_reports_bad_variants_in_their_rows(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    (tmp_path / "infer.py").write_text(FAKE_INFER)
    monkeypatch.setattr(cells, "TRAIN_PY", str(tmp_path / "train.py"))
    monkeypatch.setattr(cells, "INFER_PY", str(tmp_path / "infer.py"))
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_LOG", str(log))
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.parquet").write_bytes(b"x")
    st = Settings(data_dir=str(data), eval_dir=str(data), base_flags=("--preset", "seed"),
                  seeds=(1, 2), work_dir=str(tmp_path / "work"), jobs=2)
    variants = [Variant("base"), Variant("+ok", ("--use_ns_se_gate",)),
                Variant("unknown", ("--no_such_flag",)), Variant("crash", ("--use_rope",))]
    prefix = str(tmp_path / "out" / "table")
    rows = run_table(variants, st, prefix, log=lambda *_: None)
    assert [r.n_ok for r in rows] == [2, 2, 0, 0]
    assert "no_such_flag" in rows[2].errors[0] and "exploded" in rows[3].errors[0]
    assert rows[0].capture == {"base": 0.5, "pair_62_66": 0.25}
    assert rows[0].auc[0] == pytest.approx(0.7015) and rows[1].delta[0] == pytest.approx(0.0)
    assert os.path.isfile(prefix + ".md") and os.path.isfile(prefix + ".csv")
    calls = log.read_text().splitlines()
    assert len(calls) == 4  # base and +ok, two seeds each; the unknown flag never starts
    assert all("--num_workers 1" in c and "--seed" in c for c in calls)
    # a second run takes the finished cells from the cache and retries only the failures
    rows = run_table(variants, st, prefix, log=lambda *_: None)
    assert len(log.read_text().splitlines()) == 4 and rows[1].n_ok == 2


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("abl") / "data"
    generate(str(path), rows=256, seed=5, eval_rows=64, vocab_cap=300, seq_len_scale=0.01,
             rows_per_group=128, verbose=False)
    return path


def test_one_real_cell_and_a_data_folder_without_labels(tiny_demo, tmp_path):
    import pyarrow.parquet as pq
    nolabel = tmp_path / "nolabel"
    nolabel.mkdir()
    for name in os.listdir(tiny_demo):
        if name.endswith(".parquet"):
            t = pq.read_table(tiny_demo / name)
            pq.write_table(t.drop(["label_type"]), nolabel / name)
    (nolabel / "schema.json").write_text((tiny_demo / "schema.json").read_text())
    st = Settings(data_dir=str(tiny_demo), eval_dir=str(tiny_demo / "eval"),
                  base_flags=tuple(TINY), seeds=(1,), work_dir=str(tmp_path / "w"),
                  workers=0)
    variants = [Variant("base"), Variant("nolabels", ("--data_dir", str(nolabel)))]
    rows = run_table(variants, st, str(tmp_path / "t"), log=lambda *_: None)
    assert rows[0].n_ok == 1 and 0.0 < rows[0].auc[0] < 1.0
    assert math.isfinite(rows[0].oracle_auc) and set(rows[0].capture) >= {"pair_62_66"}
    assert rows[1].n_ok == 0 and "label" in rows[1].errors[0]
    res = json.load(open(next((tmp_path / "w" / "cells").glob("base.s1.*")) / "result.json"))
    assert res["status"] == "ok" and not os.path.isdir(os.path.join(
        str(tmp_path / "w" / "cells"), "ckpt"))
