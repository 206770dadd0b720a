"""Decoupling losses on hand-computed cases, and the MovieLens benchmark end to end on a tiny
fixture written in the ML-100K format (the real data is only used when present)."""
import dataclasses
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import movielens as ml  # noqa: E402
from pcvr.config import DecouplingConfig  # noqa: E402
from pcvr.model.decoupling import (EntityDecoupler, atom_orth_ssl_loss,  # noqa: E402
                        contrastive_uniformity_loss, ipw_sample_weight, orthogonal_component,
                        stage1_loss)

REAL_DATA = REPO.parent / "shared" / "data" / "ml-100k"


# ----------------------------------------------------------------------------- losses


def test_uniformity_loss_masks_fake_negatives():
    # Rows 0 and 2 are the same entity: a fake negative of each other at threshold 0.99.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    t = 0.5
    got = contrastive_uniformity_loss(z, t, 0.99)
    e = math.exp(-1.0 / t)  # a negative at cosine 0
    want = (2 * math.log(1 + e) + math.log(1 + 2 * e)) / 3
    assert got.item() == pytest.approx(want, rel=1e-6)
    # Unmasked (threshold above any cosine), the duplicate adds e^0 = 1 to rows 0 and 2.
    unmasked = contrastive_uniformity_loss(z, t, 1.5)
    assert unmasked.item() == pytest.approx((2 * math.log(2 + e) + math.log(1 + 2 * e)) / 3,
                                            rel=1e-6)


def test_uniformity_loss_without_negatives_is_zero():
    z = torch.tensor([[1.0, 2.0], [2.0, 4.0]], requires_grad=True)  # one direction twice
    loss = contrastive_uniformity_loss(z, 0.1, 0.99)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(z.grad == 0)


def test_uniformity_loss_pushes_negatives_apart():
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    contrastive_uniformity_loss(z, 0.1, 0.99).backward()
    with torch.no_grad():
        moved = z - 0.01 * z.grad
        cos = torch.nn.functional.cosine_similarity(moved[0], moved[1], dim=0)
    assert cos.item() < 0.6


def test_stage1_loss_is_truncated_at_the_margin():
    atom = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.8, 0.6]], requires_grad=True)
    side = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    # cosines 1, 0, -1, 0.8; margin 0.5 -> terms 0, 0.25, 2.25, 0
    loss = stage1_loss(atom, side, 0.5)
    assert loss.item() == pytest.approx((0.25 + 2.25) / 4)
    loss.backward()
    assert torch.all(atom.grad[[0, 3]] == 0)  # beyond the margin: no pull at all
    assert atom.grad[1].abs().sum() > 0


def test_orthogonal_component_is_orthogonal_and_side_is_detached():
    torch.manual_seed(0)
    atom = torch.randn(6, 5, requires_grad=True)
    side = torch.randn(6, 5, requires_grad=True)
    orth = orthogonal_component(atom, side)
    assert torch.allclose((orth * side).sum(-1), torch.zeros(6), atol=1e-5)
    parallel = atom - orth  # what was removed lies along the side
    assert torch.allclose(torch.nn.functional.cosine_similarity(parallel, side).abs(),
                          torch.ones(6), atol=1e-5)
    orth.sum().backward()
    assert side.grad is None and atom.grad is not None


def test_atom_orth_ssl_loss_hand_case_and_fake_negatives():
    side = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    atom = torch.tensor([[1.0, 1.0], [2.0, -1.0]])  # residuals (0, 1) and (0, -1): cosine -1
    t = 1.0
    assert atom_orth_ssl_loss(atom, side, t, 0.99).item() == pytest.approx(
        math.log(1 + math.exp(-2 / t)), rel=1e-6)
    # The same atom twice (same residual direction): a fake negative, no loss.
    same = torch.tensor([[1.0, 1.0], [3.0, 2.0]])
    assert atom_orth_ssl_loss(same, side, t, 0.99).item() == 0.0


def test_ipw_weights_mean_one_no_grad_and_rare_atoms_heavier():
    atom = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    side = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    w = ipw_sample_weight(atom, side)
    assert not w.requires_grad and w.grad_fn is None
    assert w.shape == (3,)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert w.sum().item() == pytest.approx(3.0, abs=1e-5)
    d = torch.tensor([0.0, 1.0, 1.0 - 1 / math.sqrt(2)])  # 1 - cos
    assert torch.allclose(w, d / d.mean(), atol=1e-4)
    assert w[1] > w[2] > w[0]  # farther from its side -> heavier


def _cfg(**kw) -> DecouplingConfig:
    return dataclasses.replace(DecouplingConfig(), **kw)


def test_entity_decoupler_shapes_weights_and_loss_rows():
    torch.manual_seed(0)
    cfg = _cfg()
    dec = EntityDecoupler(atom_in=6, side_in=4, out_dim=8, cfg=cfg)
    atom_x, side_x = torch.randn(10, 6), torch.randn(10, 4)
    out = dec(atom_x, side_x)
    assert out.atom.shape == (10, 8) and out.side.shape == (10, 8)
    assert set(out.losses) == {"side_ssl", "stage1", "atom_orth_ssl"}
    assert out.sample_weight is None
    a, s = out.atom, out.side
    t, thr = cfg.decouple_temperature, cfg.decouple_fake_neg_threshold
    raw = {"side_ssl": contrastive_uniformity_loss(s, t, thr),
           "stage1": stage1_loss(a, s, cfg.decouple_stage1_margin),
           "atom_orth_ssl": atom_orth_ssl_loss(a, s, t, thr)}
    weights = {"side_ssl": cfg.decouple_side_weight, "stage1": cfg.decouple_stage1_weight,
               "atom_orth_ssl": cfg.decouple_atom_weight}
    for k in raw:  # each loss comes back multiplied by its config weight
        assert out.losses[k].item() == pytest.approx(weights[k] * raw[k].item(), rel=1e-6)

    dec.cfg = _cfg(decouple_side_weight=0.0, decouple_stage1_weight=2.0, decouple_ipw=True)
    out2 = dec(atom_x, side_x)
    assert out2.losses["side_ssl"].item() == 0.0
    assert out2.losses["stage1"].item() == pytest.approx(2.0 * raw["stage1"].item(), rel=1e-6)
    assert out2.sample_weight.shape == (10,)
    assert out2.sample_weight.mean().item() == pytest.approx(1.0, abs=1e-6)

    head = dec(atom_x, side_x, loss_rows=4)
    first = dec(atom_x[:4], side_x[:4])
    assert head.atom.shape == (10, 8)
    for k in raw:
        assert head.losses[k].item() == pytest.approx(first.losses[k].item(), rel=1e-6)


# ----------------------------------------------------------------------------- benchmark


def write_fixture(root: Path, n_users: int = 20, n_items: int = 50, per_user: int = 22,
                  seed: int = 0) -> Path:
    """A tiny dataset in the ML-100K file format (u.data, u.user, u.item)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for u in range(1, n_users + 1):
        for n, i in enumerate(rng.choice(n_items, per_user, replace=False) + 1):
            lines.append(f"{u}\t{i}\t{rng.integers(1, 6)}\t{880000000 + 1000 * n + u}")
    (root / "u.data").write_text("\n".join(lines) + "\n")
    occupations = ["writer", "student", "other"]
    (root / "u.user").write_text("".join(
        f"{u}|{15 + 3 * u}|{'MF'[u % 2]}|{occupations[u % 3]}|{'T8H1N' if u == 1 else 10000 + u}\n"
        for u in range(1, n_users + 1)))
    rows = []
    for i in range(1, n_items + 1):
        flags = ["0"] * 19
        flags[i % 19] = "1"
        flags[(3 * i) % 19] = "1"
        rows.append(f"{i}|Movie {i} Part {i % 3} ({1990 + i % 5})|01-Jan-1995||http://x/{i}|"
                    + "|".join(flags))
    (root / "u.item").write_text("\n".join(rows) + "\n")
    return root


def test_benchmark_end_to_end_on_fixture(tmp_path, capsys):
    data_dir = write_fixture(tmp_path / "ml")
    results = ml.main(["--data_dir", str(data_dir), "--quick", "--seeds", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"ndcg_decoupled \d\.\d{4} ndcg_best_baseline \d\.\d{4} spread \d\.\d{4}",
                        lines[-1])
    assert {r.key for r in ml.ROWS} == set(results)
    assert sum(line.startswith("| ") for line in lines) == len(ml.ROWS) + 1  # header + rows
    for runs in results.values():
        assert len(runs) == 2
        for r in runs:
            assert 0.0 < r["ndcg"] <= 1.0 and 0.0 < r["ndcg_tail"] <= 1.0 and r["bpr"] > 0
    dec = ml.mean_std([r["ndcg"] for r in results["decoupled"]])
    assert lines[-1].startswith(f"ndcg_decoupled {dec[0]:.4f} ")


def test_benchmark_is_deterministic_and_honours_rows(tmp_path):
    data_dir = str(write_fixture(tmp_path / "ml"))
    argv = ["--data_dir", data_dir, "--quick", "--seeds", "1", "--rows", "decoupled",
            "--decouple_ipw"]
    first, second = ml.main(argv), ml.main(argv)
    assert list(first) == ["decoupled"]
    assert first == second


def test_split_and_candidates(tmp_path):
    data = ml.load_movielens(str(write_fixture(tmp_path / "ml")))
    split = ml.make_split(data)
    assert data.user_side[0, 3] == 10  # a non-digit zip code is its own bucket
    rated = {(u, i) for u, i in zip(data.user.tolist(), data.item.tolist())}
    train = set(zip(split.train_user.tolist(), split.train_item.tolist()))
    for ev, k in ((split.valid, ml.VALID_K), (split.test, ml.TEST_K)):
        assert ev.items.shape == (data.n_users, 2 * k)
        assert (ev.labels[:, :k] > 0).all() and (ev.labels[:, k:] == 0).all()
        for u, items in zip(ev.users.tolist(), ev.items.tolist()):
            assert all((u, i) in rated and (u, i) not in train for i in items[:k])
            assert all((u, i) not in rated for i in items[k:])
    assert len(split.train_user) == len(data.user) - data.n_users * (ml.TEST_K + ml.VALID_K)
    assert split.long_tail.sum() == int(0.8 * data.n_items)


def test_ndcg_and_pair_bpr_hand_cases():
    labels = torch.tensor([[2, 1, 0]])
    everything = torch.ones(1, 3, dtype=torch.bool)
    assert ml.ndcg_per_user(torch.tensor([[3.0, 2.0, 1.0]]), labels, everything).item() == 1.0
    # Order 0, 2, 1 (gains 3, 0, 1): DCG = 3 + 1/log2(4) over IDCG = 3 + 1/log2(3)
    got = ml.ndcg_per_user(torch.tensor([[3.0, 1.0, 2.0]]), labels, everything).item()
    assert got == pytest.approx((3 + 0.5) / (3 + 1 / math.log2(3)), rel=1e-6)
    # Restricted to items 1 and 2 (ranked 2, 1): gains 0, 1 -> 1/log2(3)
    mask = torch.tensor([[False, True, True]])
    assert ml.ndcg_per_user(torch.tensor([[3.0, 1.0, 2.0]]), labels, mask).item() == \
        pytest.approx(1 / math.log2(3), rel=1e-6)
    assert torch.isnan(ml.ndcg_per_user(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long),
                                        everything)).all()
    scores = torch.tensor([[1.0, 0.0, 0.0]])
    want = (2 * -math.log(1 / (1 + math.exp(-1))) + math.log(2)) / 3  # pairs 0>1, 0>2, 1>2
    assert ml.pair_bpr(scores, labels).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("broken, message", [
    ("missing", "u.data: missing"),
    ("rating", "ratings must be integers 1..5"),
    ("unknown_item", "not listed in u.item"),
    ("text", "is not an integer"),
])
def test_data_errors_are_clear(tmp_path, broken, message):
    root = write_fixture(tmp_path / "ml")
    data = root / "u.data"
    if broken == "missing":
        data.unlink()
    else:
        bad = {"rating": "1\t1\t6\t1", "unknown_item": "1\t999\t3\t1",
               "text": "1\tabc\t3\t1"}[broken]
        data.write_text(data.read_text() + bad + "\n")
    with pytest.raises(ml.MovieLensError, match=re.escape(message)):
        ml.load_movielens(str(root))
    with pytest.raises(SystemExit, match=re.escape(message)):
        ml.main(["--data_dir", str(root), "--quick", "--seeds", "1"])


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(SystemExit, match="is not a directory"):
        ml.main(["--data_dir", str(tmp_path / "nope"), "--quick"])


@pytest.mark.skipif(not (REAL_DATA / "u.data").is_file(), reason="ML-100K not present")
def test_real_movielens_loads_and_splits():
    data = ml.load_movielens(str(REAL_DATA))
    assert (data.n_users, data.n_items, len(data.user)) == (943, 1682, 100000)
    split = ml.make_split(data)
    assert len(split.test.users) == 943 and split.test.items.shape[1] == 2 * ml.TEST_K
    assert len(split.train_user) == 100000 - 943 * (ml.TEST_K + ml.VALID_K)
