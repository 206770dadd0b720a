"""Decoupling losses on hand-computed cases, and the MovieLens protocol end to end on a tiny
fixture written in the ML-100K format (the real data is only used when present)."""
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pcvr.config import DecouplingConfig
from pcvr.debias import movielens as ml
from pcvr.debias.metrics import mean_std, ndcg_per_user, pair_bpr
from pcvr.model.decoupling import (EntityDecoupler, atom_orth_ssl_loss,
                                   contrastive_uniformity_loss, first_occurrences,
                                   ipw_sample_weight, orthogonal_component, stage1_loss)

REPO = Path(__file__).resolve().parents[1]

REAL_DATA = REPO.parent / "shared" / "data" / "ml-100k"


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_first_occurrences():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0]])
    assert first_occurrences(x).tolist() == [0, 1, 3]
    assert first_occurrences(torch.eye(3)).tolist() == [0, 1, 2]


def test_unique_entities_count_each_entity_once():
    torch.manual_seed(0)
    cfg = _cfg(decouple_fake_neg_threshold=2.0)  # no masking: duplicates would change the loss
    plain = EntityDecoupler(atom_in=4, side_in=3, out_dim=6, cfg=cfg)
    unique = EntityDecoupler(atom_in=4, side_in=3, out_dim=6, cfg=cfg, unique_entities=True)
    unique.load_state_dict(plain.state_dict())
    atom_x, side_x = torch.randn(5, 4), torch.randn(5, 3)
    rows = torch.tensor([0, 1, 0, 0, 2, 3, 1])  # entity 0 three times, 1 twice
    once = torch.tensor([0, 1, 2, 3])
    want = plain(atom_x[once], side_x[once]).losses
    got = unique(atom_x[rows], side_x[rows])
    skewed = plain(atom_x[rows], side_x[rows]).losses
    for k in want:
        assert got.losses[k].item() == pytest.approx(want[k].item(), rel=1e-5)
    assert any(abs(skewed[k].item() - want[k].item()) > 1e-4 for k in want)
    assert got.atom.shape == (7, 6)  # every row is still represented
    # loss_rows first, then the distinct ones among them
    head = unique(atom_x[rows], side_x[rows], loss_rows=3)  # rows 0, 1, 0 -> entities 0, 1
    pair = plain(atom_x[:2], side_x[:2]).losses
    for k in pair:
        assert head.losses[k].item() == pytest.approx(pair[k].item(), rel=1e-5)


# ----------------------------------------------------------------------------- MovieLens


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


QUICK = ml.TrainSettings(epochs=1, batch_size=64, lr=5e-3, weight_decay=0.1, emb_dim=8, dim=8,
                         max_steps_per_epoch=5)


def _cfg_user(**kw) -> DecouplingConfig:
    return _cfg(decouple_user=True, decouple_dim=8, **kw)


def test_movielens_rows_end_to_end_on_fixture(tmp_path):
    data = ml.load_movielens(str(write_fixture(tmp_path / "ml")))
    split = ml.make_split(data)
    results = {}
    for row in ml.ROWS:
        cfg = _cfg_user(**dict(row.overrides))
        results[row.key] = [ml.run_one(data, split, split.test, row.variant, cfg, QUICK, s)
                            for s in (0, 1)]
    for runs in results.values():
        assert runs[0] != runs[1]  # the seed matters
        for r in runs:
            assert 0.0 < r["ndcg"] <= 1.0 and 0.0 < r["ndcg_tail"] <= 1.0 and r["bpr"] > 0
            assert 0.0 < r["ndcg_pop"] <= 1.0
            buckets = [r[f"ndcg_pop{b}"] for b in range(ml.POPULARITY_BUCKETS)]
            assert r["ndcg_pop"] == pytest.approx(np.nanmean(buckets))
    table = ml.markdown_table(results).splitlines()
    assert len(table) == len(ml.ROWS) + 2 and "NDCG pop-stratified" in table[0]
    assert len(ml.bucket_table(results).splitlines()) == len(ml.ROWS) + 2
    line = ml.summary_line(results)
    assert re.fullmatch(r"ndcg_decoupled \d\.\d{4} ndcg_best_baseline \d\.\d{4} spread "
                        r"\d\.\d{4}", line)
    dec = mean_std([r["ndcg"] for r in results["decoupled"]])
    best = max(mean_std([r["ndcg"] for r in results[k]]) for k in ml.BASELINES)
    assert line == (f"ndcg_decoupled {dec[0]:.4f} ndcg_best_baseline {best[0]:.4f} "
                    f"spread {max(dec[1], best[1]):.4f}")
    assert ml.summary_line(results, "ndcg_pop").startswith("ndcg_pop_decoupled ")


def test_movielens_run_is_deterministic_and_ipw_changes_it(tmp_path):
    data = ml.load_movielens(str(write_fixture(tmp_path / "ml")))
    split = ml.make_split(data)
    plain = ml.run_one(data, split, split.valid, "decoupled", _cfg_user(), QUICK, 3)
    assert plain == ml.run_one(data, split, split.valid, "decoupled", _cfg_user(), QUICK, 3)
    ipw = ml.run_one(data, split, split.valid, "decoupled", _cfg_user(decouple_ipw=True), QUICK,
                     3)
    assert ipw != plain


def test_movielens_cli_on_fixture(tmp_path):
    data_dir = write_fixture(tmp_path / "ml")
    cmd = [sys.executable, str(REPO / "benchmarks" / "movielens.py"), "--data_dir",
           str(data_dir), "--quick", "--seeds", "1", "--rows", "concat_mlp,decoupled"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
    lines = out.strip().splitlines()
    assert re.fullmatch(r"ndcg_decoupled \d\.\d{4} ndcg_best_baseline \d\.\d{4} spread "
                        r"0\.0000", lines[-1])
    assert lines[-2].startswith("ndcg_pop_decoupled ")


def test_split_and_candidates(tmp_path):
    data = ml.load_movielens(str(write_fixture(tmp_path / "ml")))
    split = ml.make_split(data)
    assert data.user_side[0, 3] == 10  # a non-digit zip code is its own bucket
    rated = {(u, i) for u, i in zip(data.user.tolist(), data.item.tolist())}
    train = set(zip(split.train_user.tolist(), split.train_item.tolist()))
    for ev, k in ((split.valid, ml.VALID_K), (split.test, ml.TEST_K)):
        assert ev.items.shape == (data.n_users, 2 * k) and ev.valid.all()
        assert (ev.labels[:, :k] > 0).all() and (ev.labels[:, k:] == 0).all()
        for u, items in zip(ev.users.tolist(), ev.items.tolist()):
            assert all((u, i) in rated and (u, i) not in train for i in items[:k])
            assert all((u, i) not in rated for i in items[k:])
    assert len(split.train_user) == len(data.user) - data.n_users * (ml.TEST_K + ml.VALID_K)
    assert split.long_tail.sum() == int(0.8 * data.n_items)
    counts = np.bincount(split.train_item, minlength=data.n_items)
    assert np.bincount(split.popularity).tolist() == [10] * 5  # 50 items, equal buckets
    # Buckets follow train popularity: every item of a bucket is at most as popular as any
    # item of the next one.
    for b in range(ml.POPULARITY_BUCKETS - 1):
        assert counts[split.popularity == b].max() <= counts[split.popularity == b + 1].min()
    # The long tail is the least popular 80 %: the first four buckets exactly.
    assert (split.long_tail == (split.popularity < 4)).all()


def test_entity_tables_of_movielens(tmp_path):
    data = ml.load_movielens(str(write_fixture(tmp_path / "ml")))
    users, items = data.user_table(), data.item_table()
    assert users.n == data.n_users and items.n == data.n_items
    assert [f.name for f in users.side] == ["gender", "age", "occupation", "zip"]
    for f, v in zip(users.side, data.user_side_vocab):
        assert f.ids.min() >= 1 and f.ids.max() < f.vocab == v + 1  # 0 stays padding
    assert [f.name for f in items.atom] == ["id", "title"]
    assert (items.atom[0].ids[:, 0] == np.arange(1, data.n_items + 1)).all()


def test_ndcg_and_pair_bpr_hand_cases():
    labels = torch.tensor([[2, 1, 0]])
    everything = torch.ones(1, 3, dtype=torch.bool)
    assert ndcg_per_user(torch.tensor([[3.0, 2.0, 1.0]]), labels, everything).item() == 1.0
    # Order 0, 2, 1 (gains 3, 0, 1): DCG = 3 + 1/log2(4) over IDCG = 3 + 1/log2(3)
    got = ndcg_per_user(torch.tensor([[3.0, 1.0, 2.0]]), labels, everything).item()
    assert got == pytest.approx((3 + 0.5) / (3 + 1 / math.log2(3)), rel=1e-6)
    # Restricted to items 1 and 2 (ranked 2, 1): gains 0, 1 -> 1/log2(3)
    mask = torch.tensor([[False, True, True]])
    assert ndcg_per_user(torch.tensor([[3.0, 1.0, 2.0]]), labels, mask).item() == \
        pytest.approx(1 / math.log2(3), rel=1e-6)
    assert torch.isnan(ndcg_per_user(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long),
                                     everything)).all()
    scores = torch.tensor([[1.0, 0.0, 0.0]])
    want = (2 * -math.log(1 / (1 + math.exp(-1))) + math.log(2)) / 3  # pairs 0>1, 0>2, 1>2
    assert pair_bpr(scores, labels).item() == pytest.approx(want, rel=1e-6)


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


def test_missing_folder_is_clear(tmp_path):
    with pytest.raises(ml.MovieLensError, match="is not a directory"):
        ml.load_movielens(str(tmp_path / "nope"))


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data/ml-100k not present")
def test_real_movielens_loads_and_splits():
    data = ml.load_movielens(str(REAL_DATA))
    assert (data.n_users, data.n_items, len(data.user)) == (943, 1682, 100000)
    split = ml.make_split(data)
    assert len(split.test.users) == 943 and split.test.items.shape[1] == 2 * ml.TEST_K
    assert len(split.train_user) == 100000 - 943 * (ml.TEST_K + ml.VALID_K)
    assert np.bincount(split.popularity).tolist() == [337, 336, 337, 336, 336]
