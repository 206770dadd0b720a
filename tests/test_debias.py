"""The debiasing benchmarks' package (pcvr/debias): metrics on hand cases, the Coat loader on a
tiny fixture in Coat's format (the real data only when ../shared/data/coat is present), the
simulator's exposure and tests, the pointwise/IPS/DR training, the equal-budget tuning and
the benchmark's command line end to end."""
import dataclasses
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pcvr.debias import experiment as ex
from pcvr.debias.data import (COAT_ITEM_FIELDS, COAT_USER_FIELDS, DataError, EvalSet,
                              lists_from_matrix, load_coat, one_hot_fields, split_users)
from pcvr.debias.explicit import (PointwiseSettings, dr_imputation_loss, dr_model_loss,
                                  evaluate_lists, ips_weights, run_pointwise, train_pointwise)
from pcvr.debias.metrics import (mean_std, ndcg_per_user, pooled_auc, popularity_buckets,
                                 stratified_ndcg)
from pcvr.debias.models import SplitHead, TwoTower
from pcvr.debias.simulator import (RATING_SHARES, SimConfig, exposure_propensity, simulate)
from pcvr.metrics import roc_auc

REPO = Path(__file__).resolve().parents[1]
REAL_COAT = REPO.parent / "shared" / "data" / "coat"
TINY_SIM = SimConfig(n_users=60, n_items=50, logged_per_user=10, test_per_user=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def quick(**kw) -> PointwiseSettings:
    return PointwiseSettings(**{"epochs": 2, "batch_size": 64, "dim": 4, "emb_dim": 4, **kw})


# ----------------------------------------------------------------------------- metrics


def test_ndcg_at_k_hand_case():
    labels = torch.tensor([[0, 3, 1, 2]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # ranks: gains 0, 7, 1, 3
    d = [1 / math.log2(r + 2) for r in range(4)]
    assert ndcg_per_user(scores, labels, mask, k=2).item() == pytest.approx(
        (7 * d[1]) / (7 * d[0] + 3 * d[1]), rel=1e-6)
    assert ndcg_per_user(scores, labels, mask).item() == pytest.approx(
        (7 * d[1] + d[2] + 3 * d[3]) / (7 * d[0] + 3 * d[1] + d[2]), rel=1e-6)
    assert ndcg_per_user(scores, labels, mask, k=10).item() == pytest.approx(
        ndcg_per_user(scores, labels, mask).item())


def test_popularity_buckets_equal_sizes_in_popularity_order():
    counts = np.array([5, 0, 9, 2, 2, 7, 1])
    b = popularity_buckets(counts, 3)
    assert np.bincount(b).tolist() == [3, 2, 2]
    # Ascending: items 1, 6, 3 | 4, 0 | 5, 2; the tied items 3 and 4 are split by index.
    assert b.tolist() == [1, 0, 2, 0, 1, 2, 0]


def test_stratified_ndcg_gives_popularity_no_credit():
    # Each list: a popular relevant item, a popular irrelevant one, a rare relevant one and a
    # rare irrelevant one. Ranking by popularity ranks both popular items first.
    labels = torch.tensor([[1, 0, 1, 0]] * 3)
    bucket = torch.tensor([[1, 1, 0, 0]] * 3)
    by_popularity = torch.tensor([[2.0, 3.0, 0.0, 1.0]] * 3)  # irrelevant first in a bucket
    mean, per = stratified_ndcg(by_popularity, labels, bucket, 2)
    worst = 1 / math.log2(3)  # the relevant item second of two
    assert per.tolist() == pytest.approx([worst, worst]) and mean == pytest.approx(worst)
    full = ndcg_per_user(by_popularity, labels, torch.ones_like(labels, dtype=torch.bool))
    assert full.mean().item() > worst  # the plain NDCG credits part of that ranking
    _, per3 = stratified_ndcg(by_popularity, labels, bucket, 3)
    assert math.isnan(per3[2])  # an empty bucket is NaN, left out of the mean


def test_pooled_auc_and_mean_std():
    scores = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]])
    pos = np.array([[False, True, False], [True, False, True]])
    mask = np.array([[True, True, True], [True, True, False]])
    assert pooled_auc(scores, pos, mask) == roc_auc(pos[mask], scores[mask])
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)
    assert all(math.isnan(x) for x in mean_std([]))


# ----------------------------------------------------------------------------- Coat data


def write_coat(root: Path, n_users: int = 30, n_items: int = 40, seed: int = 0) -> Path:
    """A tiny data set in Coat's file layout."""
    rng = np.random.default_rng(seed)
    (root / "user_item_features").mkdir(parents=True)
    train = np.zeros((n_users, n_items), dtype=np.int64)
    test = np.zeros_like(train)
    for u in range(n_users):
        items = rng.permutation(n_items)
        train[u, items[:6]] = rng.integers(1, 6, 6)
        test[u, items[6:11]] = rng.integers(1, 6, 5)
    prop = rng.uniform(0.01, 0.5, size=train.shape)

    def onehot(n, groups):
        m = np.zeros((n, groups[-1][2]), dtype=np.int64)
        for _, lo, hi in groups:
            m[np.arange(n), rng.integers(lo, hi, n)] = 1
        return m
    np.savetxt(root / "train.ascii", train, fmt="%d")
    np.savetxt(root / "test.ascii", test, fmt="%d")
    np.savetxt(root / "propensities.ascii", prop)
    np.savetxt(root / "user_item_features" / "user_features.ascii",
               onehot(n_users, COAT_USER_FIELDS), fmt="%d")
    np.savetxt(root / "user_item_features" / "item_features.ascii",
               onehot(n_items, COAT_ITEM_FIELDS), fmt="%d")
    return root


def test_load_coat_fixture(tmp_path):
    root = write_coat(tmp_path / "coat")
    data = load_coat(str(root))
    train = np.loadtxt(root / "train.ascii")
    prop = np.loadtxt(root / "propensities.ascii")
    assert len(data.train_user) == 30 * 6
    assert (data.train_rating == train[data.train_user, data.train_item]).all()
    assert (data.train_propensity == prop[data.train_user, data.train_item]).all()
    assert [f.name for f in data.users.side] == [g[0] for g in COAT_USER_FIELDS]
    assert [f.vocab for f in data.items.side] == [3, 17, 14, 3]
    valid, test = data.evals["valid"], data.evals["test"]
    assert len(valid.users) == 6 and len(test.users) == 24
    assert not set(valid.users) & set(test.users)
    test_m = np.loadtxt(root / "test.ascii")
    for ev in (valid, test):
        assert ev.valid.all() and ev.items.shape[1] == 5
        assert (ev.labels == test_m[ev.users[:, None], ev.items] - 1).all()


@pytest.mark.parametrize("broken, message", [
    ("missing", "test.ascii: missing"),
    ("shape", "propensities.ascii: shape"),
    ("rating", "ratings must be integers 0..5"),
    ("onehot", "more than one column set"),
    ("propensity", "no positive propensity"),
])
def test_coat_errors_are_clear(tmp_path, broken, message):
    root = write_coat(tmp_path / "coat")
    if broken == "missing":
        (root / "test.ascii").unlink()
    elif broken == "shape":
        np.savetxt(root / "propensities.ascii", np.ones((3, 3)))
    elif broken == "rating":
        t = np.loadtxt(root / "train.ascii")
        t[0, 0] = 7
        np.savetxt(root / "train.ascii", t, fmt="%d")
    elif broken == "onehot":
        f = root / "user_item_features" / "item_features.ascii"
        m = np.loadtxt(f)
        m[0, 2:4] = 1
        np.savetxt(f, m, fmt="%d")
    else:
        t, p = np.loadtxt(root / "train.ascii"), np.loadtxt(root / "propensities.ascii")
        p[t > 0] = 0.0
        np.savetxt(root / "propensities.ascii", p)
    with pytest.raises(DataError, match=re.escape(message)):
        load_coat(str(root))


def test_one_hot_fields_and_lists():
    onehot = np.array([[1, 0, 0, 1], [0, 1, 0, 0]])
    f1, f2 = one_hot_fields(onehot, (("a", 0, 2), ("b", 2, 4)), "x")
    assert f1.ids[:, 0].tolist() == [1, 2] and f1.vocab == 3
    assert f2.ids[:, 0].tolist() == [2, 0]  # no column set: padding
    ratings = np.array([[0, 3, 0, 5], [0, 0, 0, 0], [1, 0, 2, 4]])
    ev = lists_from_matrix(ratings)
    assert ev.users.tolist() == [0, 2] and ev.items.tolist() == [[1, 3, 0], [0, 2, 3]]
    assert ev.valid.tolist() == [[True, True, False], [True, True, True]]
    assert ev.labels.tolist() == [[2, 4, 0], [0, 1, 3]]
    a, b = split_users(ev, 0.5, 0)
    assert sorted(a.users.tolist() + b.users.tolist()) == [0, 2] and len(a.users) == 1


@pytest.mark.skipif(not REAL_COAT.is_dir(), reason="../shared/data/coat not present")
def test_real_coat_loads():
    data = load_coat(str(REAL_COAT))
    assert (data.n_users, data.n_items, len(data.train_user)) == (290, 300, 6960)
    assert len(data.evals["valid"].users) == 58 and len(data.evals["test"].users) == 232
    assert data.evals["test"].valid.all() and data.evals["test"].items.shape[1] == 16
    assert (data.train_propensity > 0).all()
    assert all((f.ids > 0).all() for f in data.users.side + data.items.side)


# ----------------------------------------------------------------------------- simulator


def test_exposure_propensity_hits_the_target_and_caps_at_one():
    activity = np.array([0.5, 1.0, 1.5])
    weight = np.arange(1, 21, dtype=np.float64) ** -2.0
    p = exposure_propensity(activity, weight, 6.0)
    assert p.sum(1).mean() == pytest.approx(6.0, rel=1e-6)
    assert p.max() == 1.0 and (p > 0).all()
    free = p < 1.0  # below the cap, p is proportional to activity x weight
    ratio = p / (activity[:, None] * weight[None, :])
    assert np.allclose(ratio[free], ratio[free][0])


def test_simulator_is_deterministic_and_keeps_true_propensities():
    data, world = simulate(TINY_SIM)
    again, _ = simulate(TINY_SIM)
    assert (data.train_item == again.train_item).all()
    assert (data.evals["test"].items == again.evals["test"].items).all()
    assert (data.train_propensity == world.propensity[data.train_user, data.train_item]).all()
    assert (data.train_rating == world.rating[data.train_user, data.train_item]).all()
    assert world.propensity.sum(1).mean() == pytest.approx(TINY_SIM.logged_per_user, rel=1e-6)
    shares = np.bincount(world.rating.ravel(), minlength=6)[1:] / world.rating.size
    assert shares == pytest.approx(RATING_SHARES, abs=0.01)
    for name in ("valid", "test", "test_logged"):
        ev = data.evals[name]
        assert not world.logged[ev.users[:, None], ev.items].any()  # never a logged pair
        assert all(len(set(r)) == TINY_SIM.test_per_user for r in ev.items.tolist())
        assert (ev.labels == world.rating[ev.users[:, None], ev.items] - 1).all()
    assert not set(data.evals["valid"].users) & set(data.evals["test"].users)
    assert set(data.evals["test"].users) == set(data.evals["test_logged"].users)


def test_simulator_skew_drives_exposure_not_relevance():
    big = dataclasses.replace(TINY_SIM, n_users=300, n_items=100)
    flat, flat_world = simulate(dataclasses.replace(big, popularity_skew=0.0))
    skewed, world = simulate(dataclasses.replace(big, popularity_skew=1.5))
    assert (world.relevance == flat_world.relevance).all()  # one world, two exposures
    # Without skew an item's propensity only depends on the user's activity.
    assert np.allclose(flat_world.propensity, flat_world.propensity[:, :1])
    # The logged pairs follow their propensity (a Bernoulli draw per pair).
    assert world.logged.mean() == pytest.approx(world.propensity.mean(), rel=0.1)
    counts = np.bincount(skewed.train_item, minlength=100)
    assert counts.max() > 5 * np.bincount(flat.train_item, minlength=100).max() / 2
    # The logged-style test over-shows popular items; the uniform test does not.
    popularity = world.propensity.mean(0)
    logged = popularity[skewed.evals["test_logged"].items].mean()
    uniform = popularity[skewed.evals["test"].items].mean()
    assert logged > 2 * uniform
    # Popularity carries no relevance: items' mean relevance is uncorrelated with exposure.
    assert abs(np.corrcoef(popularity, world.relevance.mean(0))[0, 1]) < 0.3


# ----------------------------------------------------------------------------- training


def test_ips_weights_and_dr_losses():
    w = ips_weights(np.array([0.5, 0.1, 0.001]), clip=0.01)
    raw = np.array([2.0, 10.0, 100.0])
    assert w.numpy() == pytest.approx(raw / raw.mean(), rel=1e-6)
    f, r = torch.tensor([3.0, 1.0]), torch.tensor([4.0, 1.0])
    wt, f_all, g_all = torch.tensor([2.0, 0.5]), torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # Perfect imputation on the logged pairs: DR is the direct method on the uniform pairs.
    assert dr_model_loss(f, r, wt, r, f_all, g_all).item() == pytest.approx(1.0)
    assert dr_imputation_loss(f, r, wt, r).item() == 0.0
    # Imputation g = f: the correction is the IPS-weighted error.
    assert dr_model_loss(f, r, wt, f, f_all, g_all).item() == pytest.approx(1.0 + 2.0 * 1 / 2)
    assert dr_imputation_loss(f, r, wt, f).item() == pytest.approx(2.0 * 1 / 2)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="distance weights need the decoupled model"):
        PointwiseSettings(model="mf", weighting="distance")
    with pytest.raises(ValueError, match="weighting"):
        PointwiseSettings(weighting="snips")
    with pytest.raises(ValueError, match="model"):
        PointwiseSettings(model="gbdt")
    with pytest.raises(ValueError, match="head"):
        PointwiseSettings(head="attention")


def test_split_head_keeps_side_and_atom_apart():
    torch.manual_seed(0)
    head = SplitHead(3)
    x = torch.randn(4, 6, requires_grad=True)
    y = head(x)
    assert y.shape == (4, 6)
    y[:, :3].sum().backward()  # the side half of the output
    assert (x.grad[:, 3:] == 0).all() and (x.grad[:, :3] != 0).any()
    data, _ = simulate(TINY_SIM)
    for variant in ("mlp_concat_head", "decoupled"):
        model = TwoTower(data.users, data.items, variant, 4, 4, ex.base_decoupling(), 0.1,
                         head="split")
        assert isinstance(model.items.head, SplitHead) and isinstance(model.users.head,
                                                                      SplitHead)
    plain = TwoTower(data.users, data.items, "mlp_concat", 4, 4, ex.base_decoupling(), 0.1,
                     head="split")
    assert isinstance(plain.items.head, torch.nn.Identity)  # baselines have no head


def test_every_row_trains_deterministically_and_weights_matter():
    data, _ = simulate(TINY_SIM)
    cfg = ex.base_decoupling()
    results = {}
    for row in ex.SIM_ROWS:
        s = quick(model=row.model, weighting=row.weighting)
        results[row.key] = run_pointwise(data, s, cfg, 0)
        for ev in ("test", "test_logged"):
            m = results[row.key][ev]
            assert 0 < m["ndcg5"] <= 1 and 0 < m["ndcg"] <= 1 and 0 <= m["auc"] <= 1
    assert results["decoupled"] == run_pointwise(data, quick(model="decoupled"), cfg, 0)
    assert results["decoupled"] != run_pointwise(data, quick(model="decoupled"), cfg, 1)
    assert results["mf"] != results["mf_ips"] != results["mf_dr"]
    assert results["decoupled"] != results["decoupled_distance"]
    for ssl in ("unique", "uniform"):
        other = run_pointwise(data, quick(model="decoupled", ssl_entities=ssl), cfg, 0)
        assert other != results["decoupled"]


def test_a_model_learns_the_planted_relevance():
    # Relevance from the side factors only and little noise: a two-tower on the sides must
    # rank the uniform test far better than chance (whose NDCG@5 is about 0.45 here).
    world_cfg = dataclasses.replace(TINY_SIM, n_users=150, side_share=1.0, noise=0.1,
                                    popularity_skew=0.0)
    data, world = simulate(world_cfg)
    model = train_pointwise(data, quick(model="mlp_concat", epochs=30, dim=8, emb_dim=8,
                                        lr=1e-2, weight_decay=0.0),
                            ex.base_decoupling(), 0)
    ev = data.evals["test"]
    got = evaluate_lists(model.score_matrix(), ev)
    rng = torch.Generator().manual_seed(0)
    chance = evaluate_lists(torch.rand(world.rating.shape, generator=rng), ev)
    oracle = evaluate_lists(torch.from_numpy(world.relevance).float(), ev)
    assert got["ndcg5"] > chance["ndcg5"] + 0.15 and got["auc"] > 0.75
    assert oracle["ndcg5"] > got["ndcg5"] - 0.02


def test_evaluate_lists_hand_case():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    ev = EvalSet(np.array([1, 0]), np.array([[3, 2, 1], [0, 1, 2]]),
                 np.array([[4, 0, 3], [1, 0, 0]]), np.array([[True, True, True],
                                                             [True, True, False]]))
    m = evaluate_lists(scores, ev)
    # List 0 (user 1): scores 0, 1, 2 for items 3, 2, 1, so the order is items 1, 2, 3 with
    # gains 7, 0, 15. List 1 (user 0, two valid items): order item 1 (gain 0), item 0 (1).
    l0 = (7 + 15 / 2) / (15 + 7 / math.log2(3))
    l1 = 1 / math.log2(3)
    assert m["ndcg5"] == pytest.approx((l0 + l1) / 2) and m["ndcg"] == pytest.approx(m["ndcg5"])
    # Positives (label >= 3): items 3 and 1 of list 0; the padded candidate is left out.
    assert m["auc"] == roc_auc(np.array([1, 0, 1, 0, 0]), np.array([0.0, 1.0, 2.0, 0.0, 1.0]))


# ----------------------------------------------------------------------------- experiment


def test_draw_trial_shares_knobs_across_rows():
    rows = {r.key: r for r in ex.SIM_ROWS}
    assert ex.draw_trial(rows["mf"], 0) == ex.default_params(rows["mf"])
    a, b = ex.draw_trial(rows["control"], 3), ex.draw_trial(rows["decoupled_ips"], 3)
    for k in ex.SHARED_SPACE:
        assert getattr(a.settings, k) == getattr(b.settings, k)
    assert a.settings.head in ex.HEAD_SPACE["head"] and b.settings.head in ex.HEAD_SPACE["head"]
    assert {ex.draw_trial(rows["control"], t).settings.head for t in range(1, 20)} == {
        "mlp", "split"}
    assert {ex.draw_trial(rows["mf"], t).settings.head for t in range(20)} == {"mlp"}
    assert a.decoupling == () and dict(b.decoupling).keys() == {
        k for k in ex.DECOUPLING_SPACE if k != "ssl_entities"}
    assert b.settings.propensity_clip in ex.IPS_SPACE["propensity_clip"]
    assert b.settings.ssl_entities in ex.DECOUPLING_SPACE["ssl_entities"]
    assert ex.draw_trial(rows["decoupled"], 3) == ex.draw_trial(rows["decoupled"], 3)
    assert {ex.draw_trial(rows["control"], t).settings.lr for t in range(1, 30)} == set(
        ex.SHARED_SPACE["lr"])
    assert ex.cap_epochs(b, 1).settings.epochs == 1 and ex.cap_epochs(b, 0) == b


def test_tune_picks_the_best_trial_and_params_round_trip(tmp_path):
    data, _ = simulate(TINY_SIM)
    rows = [r for r in ex.SIM_ROWS if r.key in ("mf", "decoupled")]
    best, records = ex.tune(data, rows, trials=3, seeds=[0], max_epochs=1)
    for row in rows:
        mine = [r for r in records if r["row"] == row.key]
        top = max(mine, key=lambda r: r["ndcg5"])
        assert best[row.key] == ex.cap_epochs(ex.draw_trial(row, top["trial"]), 1)
    path = tmp_path / "p.json"
    ex.save_params(str(path), {"sim": best}, {"trials_per_row": 3}, {"sim": records})
    assert ex.load_params(str(path)) == {"sim": best}
    # Extending the search reuses the trials whose params are drawn again, and only those.
    _, recs = ex.load_tuning(str(path))[:2]
    forged = dict(recs["sim"][0], settings=dict(recs["sim"][0]["settings"], lr=0.123))
    _, more = ex.tune(data, rows[:1], trials=4, seeds=[0], max_epochs=1,
                      previous=[forged] + recs["sim"][1:])
    assert more[1:3] == recs["sim"][1:3]  # reused as they were
    assert more[0] == recs["sim"][0]  # the forged one was trained again (deterministically)
    assert [r["trial"] for r in more] == [0, 1, 2, 3]


def test_tune_into_merges_and_resumes(tmp_path):
    data, _ = simulate(TINY_SIM)
    rows = [r for r in ex.SIM_ROWS if r.key in ("mf", "mf_ips")]
    path = str(tmp_path / "p.json")
    ex.tune_into(path, [("sim", data, rows)], 2, [0], max_epochs=1, note={"x": 1})
    params, trials, budget = ex.load_tuning(path)
    assert set(params["sim"]) == {"mf", "mf_ips"} and len(trials["sim"]) == 4
    assert budget == {"trials_per_row": 2, "seeds_per_trial": [0],
                      "metric": "validation NDCG@5", "x": 1}
    # One row extended to 3 trials: its 2 old trials reused, the other row left as it was.
    ex.tune_into(path, [("sim", data, rows)], 3, [0], only=["mf"], resume=True, max_epochs=1)
    params2, trials2, _ = ex.load_tuning(path)
    assert params2["sim"]["mf_ips"] == params["sim"]["mf_ips"]
    mf = [t for t in trials2["sim"] if t["row"] == "mf"]
    assert [t["trial"] for t in mf] == [0, 1, 2]
    assert mf[:2] == [t for t in trials["sim"] if t["row"] == "mf"]
    with pytest.raises(ValueError, match="needs its seeds"):
        ex.tune_into(path, [("sim", data, rows)], 3, [1], resume=True, max_epochs=1)


def fake_results(means: dict, std: float = 0.01) -> dict:
    return {k: [{"test": {"ndcg5": m + d, "ndcg": m, "auc": 0.7}} for d in (-std, 0.0, std)]
            for k, m in means.items()}


def test_summary_line_and_verdict():
    res = fake_results({"concat_mlp": 0.60, "mlp_concat": 0.62, "control": 0.61,
                        "decoupled": 0.66, "mf": 0.70})
    # mf is not a baseline of the line: the best of the two-towers and the control is 0.62.
    assert ex.summary_line("coat", res) == \
        "coat_ndcg_decoupled 0.6600 best_baseline 0.6200 spread 0.0100"
    assert "mlp_concat +0.0400 (> 2 std = 0.0200)" in ex.verdict(res, "test")
    res["decoupled"][0]["test"]["ndcg5"] = 0.55  # a wild seed: the gap is no longer clear
    assert "(<= 2 std" in ex.verdict(res, "test")
    table = ex.markdown_table(res, ex.COAT_ROWS, [("test", "uniform")]).splitlines()
    assert len(table) == 2 + 5 and table[0].count("|") == 1 + 1 + 3
    sweep = ex.sweep_table({0.0: res, 1.0: res}, [0.0, 1.0],
                           [r for r in ex.COAT_ROWS if r.key in res], "test")
    assert sweep.splitlines()[0] == "| model | alpha 0 | alpha 1 |"


def test_plot_sweep(tmp_path):
    res = fake_results({r.key: 0.5 for r in ex.SIM_ROWS})
    note = ex.plot_sweep(str(tmp_path / "p.png"), [0.0, 1.0], {0.0: res, 1.0: res}, ex.SIM_ROWS)
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib" in note and not (tmp_path / "p.png").exists()
    else:
        assert note is None and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_cli_end_to_end(tmp_path):
    coat = write_coat(tmp_path / "coat")
    params, report = tmp_path / "params.json", tmp_path / "report.md"
    cmd = [sys.executable, str(REPO / "benchmarks" / "debias.py"), "--coat_dir", str(coat),
           "--quick", "--tune", "--trials", "2", "--tune_seeds", "0", "--max_epochs", "1",
           "--seeds", "1",
           "--params", str(params), "--sim_users", "60", "--sim_items", "100",
           "--skews", "0", "--main_skew", "1", "--report", str(report)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    for name, line in zip(("coat", "sim"), lines[-2:]):
        assert re.fullmatch(rf"{name}_ndcg_decoupled \d\.\d{{4}} best_baseline \d\.\d{{4}} "
                            rf"spread \d\.\d{{4}}", line)
    assert set(ex.load_params(str(params))) == {"coat", "sim"}
    assert "| alpha 0 | alpha 1 |" in report.read_text()
    assert report.read_text().rstrip().endswith(lines[-1] + "\n```")
