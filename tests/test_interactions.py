"""The explicit NS interactions (pcvr/model/interactions.py): --use_pair_target_attn and
--use_field_cross."""
import pytest
import torch

from pcvr.config import Config, from_flat_dict, to_flat_dict
from pcvr.model.interactions import FieldCross, PairTargetAttention
from pcvr.schema import FeatureSpec
from test_model import LAYOUT, make_batch, make_cfg, make_model, same_weights_prediction


@pytest.mark.parametrize("feature", [{"use_pair_target_attn": True},
                                     {"use_field_cross": True},
                                     {"use_pair_target_attn": True,
                                      "use_field_cross": True, "field_cross_dim": 4}])
def test_interactions_are_zero_at_init_and_learn(feature):
    off, on = make_cfg(use_pair_62_66=True), make_cfg(use_pair_62_66=True, **feature)
    same_weights_prediction(off, on)
    model = make_model(on).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = make_batch()
    model(batch).logits.sum().backward()
    opt.step()
    head = model.interactions
    last = head.field_cross.readout if head.field_cross is not None else head.pair_readout[-1]
    assert last.weight.abs().sum() > 0
    opt.zero_grad()
    model(batch).logits.sum().backward()
    inner = (head.field_cross.user_proj if head.field_cross is not None
             else head.pair_readout[0].weight)
    assert inner.grad is not None and inner.grad.abs().sum() > 0


def test_pair_attention_reads_the_value_of_the_matching_id():
    ids_spec, dense_spec = FeatureSpec(62, "u62", 6, 0, 3), FeatureSpec(62, "d62", 0, 0, 3)
    m = PairTargetAttention([(ids_spec, dense_spec)], target_dim=6, emb_dim=6, num_heads=1,
                            head_dim=6)
    with torch.no_grad():  # one-hot ids, identity projections, a sharp match
        m.tables[0].weight.copy_(torch.eye(7, 6))
        m.query.weight.copy_(torch.eye(6) * 100.0)
        m.query.bias.zero_()
        m.keys[0].weight.copy_(torch.eye(6))
        m.keys[0].bias.zero_()
        m.bias.fill_(-20.0)
    values = torch.tensor([[100.0, 5.0, 1e6], [100.0, 5.0, 1e6]])
    ids = torch.tensor([[2, 3, 0], [3, 2, 4]])     # element 3 has value 5 in row 0, 100 in 1
    target = torch.zeros(2, 6)
    target[:, 3] = 1.0                              # the target "is" id 3 (row 3 of the table)
    out = m(ids, values, target)

    def w(v: float) -> torch.Tensor:
        return torch.sqrt(torch.log1p(torch.tensor(v)))

    torch.testing.assert_close(out[:, 0], torch.stack([w(5.0), w(100.0)]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[:, 1], torch.ones(2), atol=1e-4, rtol=0)
    # padding never matches, and the order of a list does not matter
    out2 = m(ids[:, [1, 0, 2]], values[:, [1, 0, 2]], target)
    torch.testing.assert_close(out, out2)
    assert m(torch.zeros_like(ids), values, target).abs().max() == 0


def test_field_cross_is_every_user_item_dot_product_weighted():
    m = FieldCross(num_user=3, num_item=2, emb_dim=5, num_heads=2, dim=4, action_num=1)
    with torch.no_grad():
        m.readout.weight.normal_()
    u, i = torch.randn(6, 3, 5), torch.randn(6, 2, 5)
    zu = torch.einsum("bue,uek->buk", u, m.user_proj).view(6, 3, 2, 4)
    zi = torch.einsum("bie,iek->bik", i, m.item_proj).view(6, 2, 2, 4)
    dots = torch.stack([(zu[:, a, h] * zi[:, c, h]).sum(-1) / 2.0
                        for a in range(3) for c in range(2) for h in range(2)], dim=1)
    torch.testing.assert_close(m(u, i), dots @ m.readout.weight.T + m.readout.bias)


def test_field_cross_fields_cover_the_int_fids_and_the_dense_fields():
    from pcvr.model.interactions import dense_field_groups
    model = make_model(make_cfg(use_pair_62_66=True, use_field_cross=True))
    groups = dense_field_groups(LAYOUT.user_dense, skip_paired=True)
    assert [g[0].fid for g in groups][:5] == [61, 87, 89, 90, 91]  # then the activity fids
    assert len(groups[-1]) == 16
    fc = model.interactions.field_cross
    assert fc.user_proj.shape[0] == len(LAYOUT.user_int) + len(groups)
    assert fc.item_proj.shape[0] == len(LAYOUT.item_int) + 1   # one item dense field


def test_older_train_configs_without_the_new_keys_rebuild_the_older_model():
    flat = to_flat_dict(Config())
    for key in ("use_pair_target_attn", "pair_attn_heads", "use_field_cross",
                "field_cross_heads", "field_cross_dim", "emb_min_count"):
        flat.pop(key)
    cfg = from_flat_dict(flat)
    assert not cfg.model.use_pair_target_attn and not cfg.model.use_field_cross
    assert cfg.model.emb_min_count == 0
    flat.pop("d_model")
    with pytest.raises(Exception, match="missing key 'd_model'"):
        from_flat_dict(flat)


def test_bad_interaction_settings():
    with pytest.raises(ValueError, match="field_cross"):
        make_model(make_cfg(use_field_cross=True, field_cross_dim=0))


def test_id_admission_sends_rare_ids_to_the_shared_row_and_counts_the_first_pass_only():
    from pcvr.model.tokens import IdAdmission
    m = IdAdmission(vocab_size=10, min_count=2).train()
    ids = torch.tensor([[1, 2, 0], [1, 3, 0]])
    # id 1 is seen twice in this batch (counted before the lookup), 2 and 3 once
    assert m(ids).tolist() == [[1, 10, 0], [1, 10, 0]]
    assert m(torch.tensor([[2]])).tolist() == [[2]]          # the second sighting admits 2
    m.counting = False
    assert m(torch.tensor([[3, 3, 3]])).tolist() == [[10, 10, 10]]  # no longer counted
    m.eval()
    assert m(torch.tensor([[1, 2, 3, 0]])).tolist() == [[1, 2, 10, 0]]


def test_emb_min_count_model_counts_in_training_and_keeps_the_counts_in_its_state():
    cfg = make_cfg(use_pair_62_66=True, emb_min_count=3)
    model = make_model(cfg).train()
    batch = make_batch()
    model(batch)
    counts = {k: v for k, v in model.state_dict().items() if k.endswith("counts")}
    assert counts and sum(int(v.sum()) for v in counts.values()) > 0
    assert model.stop_counting_ids() == len(counts)
    before = {k: v.clone() for k, v in counts.items()}
    model(batch)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()
               if k.endswith("counts"))
    assert not any(k.endswith("counts") for k in make_model(make_cfg()).state_dict())


class _FortyRows(list):
    """A training loader stand-in of one 4-row batch that reports 40 rows (the number
    --min_train_samples reads)."""
    num_rows = 40


def _trainer_on_forty_rows(model, samples: int, *flags: str):
    from pcvr.config import parse_config
    from pcvr.training.trainer import Trainer
    cfg = parse_config(["--num_epochs", "1", "--min_train_samples", str(samples), *flags],
                       environ={})
    return Trainer(model, cfg, _FortyRows([make_batch()]), None, torch.device("cpu"))


def test_min_train_samples_raises_the_epochs_of_small_data_only():
    model = make_model(make_cfg())
    for samples, epochs in ((0, 1), (30, 1), (100, 3), (400, 10)):
        trainer = _trainer_on_forty_rows(model, samples, "--lr_schedule", "cosine")
        assert trainer.tc.num_epochs == epochs


def test_min_train_samples_slows_the_interactions_after_the_first_pass_only():
    model = make_model(make_cfg(use_field_cross=True))
    for samples, later in ((0, 3e-3), (40, 3e-3), (160, 7.5e-4), (4000, 1e-4)):
        trainer = _trainer_on_forty_rows(model, samples, "--lr", "1e-4",
                                         "--interaction_lr", "3e-3", "--lr_schedule", "cosine")
        # the first pass is the one-pass run: full rate, flag unchanged in train_config.json
        assert trainer.tc.interaction_lr == pytest.approx(3e-3)
        assert trainer.dense_opt.param_groups[1]["lr"] == pytest.approx(3e-3)
        trainer.train()  # one batch a pass, no validation: every pass runs
        assert trainer.position.epoch == trainer.tc.num_epochs
        assert trainer.schedulers[0].base_lrs == pytest.approx([1e-4, later])
        # the cosine factor of the current step still applies on top
        factor = trainer.schedulers[0].lr_lambdas[1](trainer.schedulers[0].last_epoch)
        assert trainer.dense_opt.param_groups[1]["lr"] == pytest.approx(later * factor)


def test_swa_is_the_equal_weight_average_of_every_kth_step():
    from pcvr.training.swa import ModelSWA
    net = torch.nn.Linear(1, 1, bias=False)
    swa = ModelSWA(net, every=2)
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):
        with torch.no_grad():
            net.weight.fill_(v)
        swa.update(net)
    assert swa.updates == 3 and float(swa.module.weight) == pytest.approx(3.0)  # (1+3+5)/3


def test_swa_takes_the_averaging_slot_from_its_step_on():
    from pcvr.config import parse_config
    from pcvr.training.trainer import Trainer

    class Loader(list):
        num_rows = 40

    model = make_model(make_cfg())
    cfg = parse_config(["--num_epochs", "1", "--batch_size", "4", "--swa_start_frac", "0.5",
                        "--swa_every_n_steps", "1"], environ={})
    trainer = Trainer(model, cfg, Loader(), None, torch.device("cpu"))
    assert trainer.swa_start == 5
    batch = make_batch()
    for step in range(7):
        trainer.train_step(batch)
        trainer.global_step += 1
        assert (trainer.ema is not None) == (step + 1 >= 5)
    assert trainer.ema.updates == 3


def test_history_fields_are_mean_embeddings_of_the_kept_events():
    from pcvr.model.interactions import HISTORY_ROWS, HistoryFields
    fields = HistoryFields(LAYOUT, dim=4)
    n_side = sum(1 for d in LAYOUT.seq for s in d.side if s.vocab_size > 0)
    assert fields.num_fields == n_side
    batch = make_batch(lens={"seq_a": [2, 0, 6, 1]})
    out = fields(batch)
    assert out.shape == (4, n_side, 4)
    dom = LAYOUT.seq[0]
    table = fields.tables[f"{dom.name}_{dom.side[0].fid}"]
    ids = batch.seq[dom.name].ids[0, dom.side[0].offset, :2].long()
    if table.num_embeddings == HISTORY_ROWS:
        ids = (ids - 1) % (HISTORY_ROWS - 1) + 1
    torch.testing.assert_close(out[0, 0], table.weight[ids].mean(0))
    assert out[1, 0].abs().max() == 0            # an empty history gives zeros
    model = make_model(make_cfg(use_pair_62_66=True, use_field_cross=True,
                                use_history_fields=True, history_field_dim=4))
    model(make_batch()).logits.sum().backward()
    with pytest.raises(Exception, match="use_field_cross"):
        make_model(make_cfg(use_history_fields=True))
