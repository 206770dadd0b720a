"""Submission packaging: what infer.py imports and the checkpoint, dry-run from the zip."""
import os
import zipfile

import pytest

import package
import train
from pcvr.demo.generator import generate
from pcvr.errors import CheckpointError
from pcvr.packaging import CODE_LIMIT_BYTES, PackageError, inference_files

TINY = ["--d_model", "16", "--emb_dim", "8", "--num_heads", "2", "--num_queries", "2",
        "--user_ns_tokens", "6", "--item_ns_tokens", "1", "--ns_groups_json", "",
        "--hidden_mult", "2", "--seq_max_lens", "seq_a:8,seq_b:8,seq_c:12,seq_d:16",
        "--batch_size", "64", "--num_workers", "0", "--num_epochs", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint root (with a training state: --save_every_n_steps) and its best folder."""
    root = tmp_path_factory.mktemp("package")
    generate(str(root / "data"), rows=256, seed=4, eval_rows=0, vocab_cap=300,
             seq_len_scale=0.01, rows_per_group=64, verbose=False)
    result = train.main(TINY + ["--data_dir", str(root / "data"), "--ckpt_dir",
                                str(root / "ck"), "--save_every_n_steps", "2"])
    return root / "ck", result


def test_the_bundle_holds_the_inference_code_and_dry_runs(trained, tmp_path, capsys):
    root, result = trained
    package.main(["--ckpt", str(root), "--out", str(tmp_path / "sub.zip")])
    printed = capsys.readouterr().out
    assert "dry run of infer.main() from the unpacked bundle: 64 predictions" in printed
    names = zipfile.ZipFile(tmp_path / "sub.zip").namelist()
    best = os.path.basename(result.best_checkpoint)
    assert "code/infer.py" in names and f"model/{best}/model.pt" in names
    assert f"model/{best}/train_state.pt" not in names  # for resuming, not for inference
    code = {n[len("code/"):] for n in names if n.startswith("code/")}
    assert code == set(inference_files())
    assert not any(n.startswith(("pcvr/training/", "pcvr/demo/generator")) for n in code)
    assert sum(os.path.getsize(f) for f in inference_files()) < CODE_LIMIT_BYTES


def test_a_bundle_that_fails_its_dry_run_is_not_kept(trained, tmp_path):
    with pytest.raises(CheckpointError):
        package.main(["--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "x.zip")])
    _, result = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PackageError, match="dry run of infer.main\\(\\) failed"):
        package.main(["--ckpt", result.best_checkpoint, "--out", str(tmp_path / "y.zip"),
                      "--data", str(empty)])
    assert not (tmp_path / "y.zip").exists()
