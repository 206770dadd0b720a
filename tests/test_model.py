"""Tests of the PCVR HyFormer model (pcvr/model/: hyformer, inputs, tokens, modules) on a tiny
schema."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

import pcvr.model.modules as modules
from pcvr.batch import Batch, SeqBatch
from pcvr.config import Config, DecouplingConfig, ModelConfig
from pcvr.model.build import build_model, load_ns_groups
from pcvr.model.hyformer import PCVRHyFormer
from pcvr.model.modules import (CrossAttention, Dropout, LongerEncoder, RowBuckets, attend,
                                token_mix, valid_mask)
from pcvr.model.tokens import (DENSE_GRAD_MAX_ROWS, NSFeatureEmbedding, RankMixerNSTokenizer,
                               signed_log1p)
from pcvr.schema import FeatureLayout, FeatureSpec, SchemaError, load_schema, parse_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONLINE_SCHEMA = os.path.join(ROOT, "..", "shared", "reference", "schemas", "online_schema.json")
BIG = DENSE_GRAD_MAX_ROWS + 10  # a vocabulary whose table has sparse gradients

RAW_SCHEMA = {
    "user_int": [[1, 5, 1], [3, 30, 1], [4, 20, 1], [15, 12, 3], [48, 7, 1], [49, 3, 1],
                 [50, 4, 1], [62, 9, 3], [63, 9, 2], [64, 9, 2], [65, 9, 2], [66, 9, 4],
                 [89, 6, 2], [90, 6, 2], [91, 6, 2]],
    "item_int": [[5, 10, 1], [6, 10, 1], [7, 10, 1], [9, 0, 1], [11, 50, 3], [16, BIG, 1]],
    "user_dense": [[61, 4], [62, 3], [63, 2], [64, 2], [65, 2], [66, 4], [87, 5], [89, 2],
                   [90, 2], [91, 2]],
    "item_dense": [[200, 3]],
    "seq": {
        "seq_a": {"prefix": "a", "ts_fid": 39, "features": [[38, BIG], [39, 0], [40, 6]]},
        "seq_b": {"prefix": "b", "ts_fid": 67, "features": [[67, 0], [68, 8], [69, 40]]},
        "seq_c": {"prefix": "c", "ts_fid": 27, "features": [[27, 0], [28, 9], [29, 50]]},
        "seq_d": {"prefix": "d", "ts_fid": 26, "features": [[17, 5], [26, 0], [20, 30]]},
    },
}
SEQ_LENS = {"seq_a": 6, "seq_b": 6, "seq_c": 8, "seq_d": 8}


def make_layout(raw: Optional[dict] = None, activity: bool = True) -> FeatureLayout:
    return parse_schema(raw or RAW_SCHEMA, SEQ_LENS, activity)


LAYOUT = make_layout()


def make_cfg(**kw) -> ModelConfig:
    """Tiny config: N_ns = 1 user + 1 user dense + 1 item + 1 item dense = 4, T = 8 | 16."""
    base = dict(d_model=16, emb_dim=8, num_heads=2, num_queries=1, hidden_mult=2,
                num_hyformer_blocks=2, dropout_rate=0.0, ns_groups_json="",
                ns_tokenizer_type="rankmixer", user_ns_tokens=1, item_ns_tokens=1,
                seq_top_k=4, action_num=2)
    base.update(kw)
    return ModelConfig(**base)


def make_model(cfg: Optional[ModelConfig] = None, layout: FeatureLayout = LAYOUT,
               dcfg: Optional[DecouplingConfig] = None, ns_groups=None, seed: int = 0,
               **kw) -> PCVRHyFormer:
    torch.manual_seed(seed)
    return PCVRHyFormer(layout, cfg or make_cfg(), dcfg or DecouplingConfig(), ns_groups, **kw)


def make_batch(layout: FeatureLayout = LAYOUT, batch: int = 4, seed: int = 0,
               lens: Optional[Dict[str, Sequence[int]]] = None) -> Batch:
    """Random batch in the data pipeline's format (ids in [0, vocab], padding zeroed)."""
    g = torch.Generator().manual_seed(seed)

    def ints(specs):
        cols = [torch.randint(0, max(s.vocab_size, 0) + 1, (batch, s.length), generator=g)
                for s in specs]
        return torch.cat(cols, dim=1)

    flat = dict(user_int=ints(layout.user_int), item_int=ints(layout.item_int),
                user_dense=torch.randn(batch, layout.user_dense_dim, generator=g) * 1e3,
                item_dense=torch.randn(batch, layout.item_dense_dim, generator=g),
                hour=torch.randint(0, 24, (batch,), generator=g),
                dayofweek=torch.randint(0, 7, (batch,), generator=g),
                label=torch.randint(0, 2, (batch,), generator=g),
                timestamp=torch.zeros(batch, dtype=torch.long),
                user_id=torch.arange(batch))
    seq = {}
    for dom in layout.seq:
        n = dom.max_len
        length = (torch.tensor(lens[dom.name]) if lens and dom.name in lens
                  else torch.randint(1, n + 1, (batch,), generator=g))
        valid = valid_mask(length, n)
        ids = torch.stack([torch.randint(1, s.vocab_size + 1, (batch, n), generator=g)
                           for s in dom.side], dim=1)
        seq[dom.name] = SeqBatch(
            ids=ids * valid.unsqueeze(1), lens=length,
            time_bucket=torch.randint(1, 64, (batch, n), generator=g) * valid,
            hour=torch.randint(1, 25, (batch, n), generator=g) * valid,
            dayofweek=torch.randint(1, 8, (batch, n), generator=g) * valid)
    return Batch(**flat, seq=seq, data_stats=torch.zeros(1, dtype=torch.long))


def same_weights_prediction(off: ModelConfig, on: ModelConfig) -> None:
    """The model with ``on`` (an identity-at-init feature) predicts like the one with ``off``."""
    base, extended = make_model(off).eval(), make_model(on, seed=1).eval()
    missing, unexpected = extended.load_state_dict(base.state_dict(), strict=False)
    assert missing and not unexpected
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(extended.predict(batch), base.predict(batch), rtol=0,
                                   atol=1e-6)


# ----------------------------------------------------------------------------- shapes

def test_forward_output_and_token_accounting():
    model = make_model(make_cfg(use_pair_62_66=True, use_abs_time_emb=True)).train()
    out = model(make_batch())
    assert out.logits.shape == (4, 2) and out.aux_losses == {} and out.sample_weight is None
    assert model.ns.num_tokens == 4 and model.num_tokens == 4 * 1 + 4
    assert model.ns.item_span == (2, 3)
    out.logits.sum().backward()
    assert model.predict(make_batch()).shape == (4, 2)


def test_predict_matches_forward_in_eval_mode():
    model = make_model(make_cfg(dropout_rate=0.3)).eval()
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, model.predict(batch))


@pytest.mark.parametrize("encoder", ["transformer", "swiglu", "longer"])
@pytest.mark.parametrize("mixer", ["full", "ffn_only", "none"])
def test_encoders_and_mixers(encoder, mixer):
    model = make_model(make_cfg(seq_encoder_type=encoder, rank_mixer_mode=mixer,
                                use_rope=True, seq_causal=True))
    logits = model(make_batch()).logits
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("extra, n_ns", [
    ({}, 4),
    ({"use_dense_cross_token": True, "rank_mixer_mode": "ffn_only"}, 5),
    ({"use_dense_cross_token": True, "dense_cross_item_source": "item_dense",
      "dense_cross_item_fids": "200", "rank_mixer_mode": "none"}, 5),
    ({"use_dense_cross_token": True, "dense_cross_item_source": "item_ns",
      "rank_mixer_mode": "none"}, 5),
    ({"user_ns_tokens": 3, "item_ns_tokens": 2, "rank_mixer_mode": "none"}, 7),
    ({"use_ns_se_gate": True, "use_abs_time_emb": True}, 4),
])
def test_ns_token_count(extra, n_ns):
    model = make_model(make_cfg(**extra))
    assert model.ns.num_tokens == n_ns and model.num_tokens == 4 + n_ns
    assert model(make_batch()).logits.shape == (4, 2)


def test_no_dense_tokens_without_dense_features():
    raw = {k: v for k, v in RAW_SCHEMA.items() if k != "item_dense"}
    raw["user_dense"] = []
    layout = make_layout(raw, activity=False)
    model = make_model(make_cfg(rank_mixer_mode="none"), layout=layout)
    assert model.ns.num_tokens == 2 and model.ns.user_dense_token is None
    assert model(make_batch(layout)).logits.shape == (4, 2)


def test_group_tokenizer_one_token_per_group():
    groups = {"_comment": "ignored", "user_ns_groups": {
        "a": [1, 3, 4], "b": [15, 48, 49, 50], "c": [62, 63, 64, 65, 66, 89, 90, 91]},
        "item_ns_groups": {"x": [16, 11], "y": [5, 6, 7, 9]}}
    cfg = make_cfg(ns_tokenizer_type="group", rank_mixer_mode="ffn_only")
    model = make_model(cfg, ns_groups=groups)
    assert model.ns.user_tokenizer.num_tokens == 3 and model.ns.item_tokenizer.num_tokens == 2
    assert model.ns.user_tokenizer.heads.widths == [3 * 8, 4 * 8, 8 * 8]
    emb = model.ns.user_tokenizer.embedding(make_batch().user_int)
    assert emb.shape == (4, 15, 8) and model.ns.user_tokenizer(emb).shape == (4, 3, 16)


def test_rankmixer_tokenizer_chunks_and_randomized_split():
    emb = NSFeatureEmbedding(LAYOUT.user_int, 8, 0)
    singletons = [[i] for i in range(15)]
    default = RankMixerNSTokenizer(emb, singletons, 4, 16)
    assert default.heads.widths == [30] * 4 and default.pad == 0  # 15 * 8 = 120 -> 4 x 30
    odd = RankMixerNSTokenizer(emb, singletons, 7, 16)
    assert odd.heads.widths == [18] * 7 and odd.pad == 6
    rand = RankMixerNSTokenizer(emb, singletons, 4, 16, randomized_seed=42)
    assert rand.heads.widths == [4 * 8, 4 * 8, 4 * 8, 3 * 8]
    assert sorted(rand.order.tolist()) == list(range(15))  # whole fids, each exactly once
    again = RankMixerNSTokenizer(emb, singletons, 4, 16, randomized_seed=42)
    assert torch.equal(rand.order, again.order)
    x = emb(make_batch().user_int)
    assert rand(x).shape == (4, 4, 16) and odd(x).shape == (4, 7, 16)


def test_token_mix_is_a_permutation_and_an_involution():
    x = torch.randn(3, 8, 16)
    mixed = token_mix(x)
    assert not torch.equal(mixed, x)
    assert torch.equal(mixed.flatten(1).sort().values, x.flatten(1).sort().values)
    assert torch.equal(token_mix(mixed), x)
    assert torch.equal(mixed[:, 1, :2], x[:, 0, 2:4])  # token 1 <- sub-chunk 1 of token 0


# ----------------------------------------------------------------------------- identity at init

@pytest.mark.parametrize("feature", [
    {"use_ns_se_gate": True},
    {"use_combined_autoint": True},
    {"use_combined_autoint": True, "combined_autoint_position": "post_mixer"},
    {"use_target_attention": True},
    {"head_cross_layers": 2, "head_cross_init_scale": 0.0},
])
def test_identity_at_init_modules(feature):
    same_weights_prediction(make_cfg(), make_cfg(**feature))


# ----------------------------------------------------------------------------- pooling

def test_masked_mean_pooling_ignores_padding_ids():
    specs = [FeatureSpec(15, "u15", 12, 0, 4), FeatureSpec(1, "u1", 5, 4, 1)]
    emb = NSFeatureEmbedding(specs, 8, 0)
    table = emb.tables["15"].weight
    ids = torch.tensor([[3, 5, 0, 0, 2], [0, 0, 0, 0, 0], [7, 0, 0, 0, 4]])
    out = emb(ids)
    torch.testing.assert_close(out[0, 0], (table[3] + table[5]) / 2)
    torch.testing.assert_close(out[2, 0], table[7])
    assert torch.equal(out[1], torch.zeros(2, 8))  # all padding -> zeros
    torch.testing.assert_close(out[0, 1], emb.tables["1"].weight[2])


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_pair_pooling(pooling):
    ints = [FeatureSpec(62, "u62", 9, 0, 3)]
    dense = FeatureSpec(62, "d62", 0, 0, 3)
    emb = NSFeatureEmbedding(ints, 8, 0, {62: dense}, pooling)
    table = emb.tables["62"].weight
    ids = torch.tensor([[1, 2, 0], [4, 5, 0], [6, 0, 0]])
    values = torch.tensor([[3.0, 8.0, 100.0], [0.0, -2.0, 9.0], [0.0, 5.0, 5.0]])
    out = emb(ids, values)[:, 0]
    w = torch.sqrt(torch.log1p(torch.tensor([3.0, 8.0])))
    expected = w[0] * table[1] + w[1] * table[2]
    torch.testing.assert_close(out[0], expected / w.sum() if pooling == "mean" else expected)
    # Weights that sum to 0 (non-positive values, or value only at padding) -> masked mean.
    torch.testing.assert_close(out[1], (table[4] + table[5]) / 2)
    torch.testing.assert_close(out[2], table[6])


def test_dense_inputs_are_log_compressed():
    x = torch.tensor([-1e7, -1.0, 0.0, 2.0, 1e7])
    torch.testing.assert_close(signed_log1p(x), torch.sign(x) * torch.log1p(x.abs()))
    model = make_model(make_cfg(use_pair_62_66=True))
    batch = make_batch()
    batch.user_dense = batch.user_dense * 1e5
    assert torch.isfinite(model(batch).logits).all()


# ----------------------------------------------------------------------------- sequences

@pytest.mark.parametrize("cfg", [
    make_cfg(),
    make_cfg(seq_encoder_type="longer", seq_causal=True, use_rope=True),
    make_cfg(seq_encoder_type="swiglu", use_target_attention=True),
    make_cfg(use_target_attention=True, use_abs_time_emb=True, use_pair_62_66=True),
])
def test_empty_sequences_give_finite_outputs_and_grads(cfg):
    model = make_model(cfg).train()
    batch = make_batch(lens={d: [0, 0, 3, 0] for d in SEQ_LENS})
    out = model(batch)
    assert torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
            assert torch.isfinite(g).all(), name


def test_padding_time_ids_contribute_zero():
    model = make_model(make_cfg(use_abs_time_emb=True)).train()
    batch = make_batch(lens={d: [2, 6, 1, 0] for d in SEQ_LENS})
    opt = torch.optim.Adagrad(model.sparse_parameters(), lr=0.5)
    model(batch).logits.sum().backward()
    opt.step()
    for name, seq in zip(model.seq.tokenizers, model.seq(batch)):
        padded = 0
        split = seq.buckets.split(batch.seq[name].ids, seq_dim=2)
        for x, n, ids in zip(seq.tokens, seq.lens, split):
            plain = model.seq.tokenizers[name](ids)
            pad = ~valid_mask(n, x.shape[1])
            padded += int(pad.sum())
            assert torch.equal(x[pad], plain[pad])
        assert padded > 0
    for table in (model.seq.time_bucket_emb, model.seq.hour_emb, model.seq.dow_emb):
        assert torch.equal(table.weight[0], torch.zeros(16))


def test_longer_encoder_keeps_the_most_recent_real_tokens():
    """Regression of model_spec §11.1.1: lengths (2, 6), top_k 4, L 6."""
    torch.manual_seed(0)
    enc = LongerEncoder(8, 2, 2, 0.0, top_k=4, causal=False, reduce=True)
    x, lens = torch.randn(2, 6, 8), torch.tensor([2, 6])
    out, new_lens = enc(x, lens)
    assert out.shape == (2, 4, 8) and new_lens.tolist() == [2, 4]
    assert valid_mask(new_lens, 4).tolist() == [[True, True, False, False], [True] * 4]
    # With the residual branches silenced, the kept tokens are the inputs at positions 0..3:
    # row 0's real tokens (positions 0, 1) are kept and marked valid.
    for linear in (enc.attn.out_proj, enc.ffn[-1]):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    silent, _ = enc(x, lens)
    torch.testing.assert_close(silent, x[:, :4])


def test_longer_encoder_ignores_padding_and_feeds_cross_attention_real_tokens():
    torch.manual_seed(0)
    enc = LongerEncoder(8, 2, 2, 0.0, top_k=4, causal=False, reduce=True)
    later = LongerEncoder(8, 2, 2, 0.0, top_k=4, causal=False, reduce=False)
    cross = CrossAttention(8, 2, 0.0)
    x, lens, q = torch.randn(2, 6, 8), torch.tensor([2, 6]), torch.randn(2, 1, 8)
    noisy = x.clone()
    noisy[0, 2:] = 100 * torch.randn(4, 8)  # garbage in row 0's padding
    out, n = enc(x, lens)
    out_noisy, _ = enc(noisy, lens)
    torch.testing.assert_close(out_noisy[0, :2], out[0, :2])
    torch.testing.assert_close(out_noisy[1], out[1])
    torch.testing.assert_close(cross(q, out_noisy, n), cross(q, out, n))
    # The second (self-attention) block keeps the same guarantee.
    out2, n2 = later(out, n)
    out2_noisy, _ = later(out_noisy, n)
    torch.testing.assert_close(out2_noisy[0, :2], out2[0, :2])


def test_longer_encoder_branch_does_not_depend_on_the_batch_length():
    """A row's output is the same whether its batch is trimmed below top_k or not."""
    torch.manual_seed(0)
    first = LongerEncoder(8, 2, 2, 0.0, top_k=4, causal=False, reduce=True)
    x, lens = torch.randn(2, 6, 8), torch.tensor([3, 2])
    full, _ = first(x, lens)                 # L 6 > top_k
    trimmed, n = first(x[:, :3], lens)       # the same rows trimmed to their longest, L 3
    assert trimmed.shape == (2, 3, 8) and n.tolist() == [3, 2]
    for row, length in enumerate(lens.tolist()):
        torch.testing.assert_close(trimmed[row, :length], full[row, :length])


def test_cross_attention_of_empty_sequence_is_residual_only():
    cross = CrossAttention(8, 2, 0.0)
    q = torch.randn(2, 3, 8)
    out = cross(q, torch.randn(2, 5, 8), torch.tensor([0, 5]))
    assert torch.equal(out[0], q[0] + cross.attn.out_proj.bias)
    assert not torch.allclose(out[1], q[1])


# ----------------------------------------------------------------------------- speed paths

def test_dropout_drops_each_element_independently_with_probability_p():
    torch.manual_seed(0)
    drop = Dropout(0.3).train()
    x = torch.ones(400, 500, requires_grad=True)
    y = drop(x)
    kept = y != 0
    n = kept.numel()
    assert abs((~kept).float().mean().item() - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    rows = kept[:, :2].float().T  # no correlation between neighbouring positions
    assert abs(torch.corrcoef(rows)[0, 1].item()) < 0.02
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.float() / 0.7)
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)


def test_attention_runs_in_float32_on_cpu():
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.bfloat16) for _ in range(3))
    mask = valid_mask(torch.tensor([5, 2]), 5)[:, None, None, :]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.bfloat16())


def test_row_buckets_partition_the_rows_and_cover_their_lengths(monkeypatch):
    lens = torch.tensor([0, 7, 3, 512, 40, 41, 200, 3, 90, 511, 1, 64])
    for quantum in (1, 8):
        monkeypatch.setattr(modules, "ROW_QUANTUM", quantum)
        plan = RowBuckets(lens, 512, max_buckets=4)
        assert 1 < len(plan.bounds) <= 4
        assert sorted(plan.order.tolist()) == list(range(12))
        rows = [plan.order[a:b] for a, b, _ in plan.bounds]
        assert [a for a, _, _ in plan.bounds] == [0] + [b for _, b, _ in plan.bounds[:-1]]
        for r, (_, _, length) in zip(rows, plan.bounds):
            assert length >= lens[r].clamp_min(1).max() and (length % 32 == 0 or length == 512)
        x = torch.randn(12, 3, 512)
        parts = plan.split(x, seq_dim=2)
        assert [p.shape[2] for p in parts] == [length for _, _, length in plan.bounds]
        assert torch.equal(plan.merge([p[:, :, 0] for p in parts]), x[:, :, 0])
    one = RowBuckets(lens, 512, max_buckets=1)
    assert one.order is None and one.bounds == [(0, 12, 512)]
    assert RowBuckets(lens.clamp_max(50), 512, max_buckets=1).bounds == [(0, 12, 64)]
    # Lengths off the CPU are never read: one bucket, batch order, full length (no sync).
    off_host = RowBuckets(torch.empty(12, dtype=torch.long, device="meta"), 512, 8)
    assert off_host.order is None and off_host.bounds == [(0, 12, 512)]


@pytest.mark.parametrize("cfg", [
    make_cfg(),
    make_cfg(use_target_attention=True, use_abs_time_emb=True, use_pair_62_66=True),
    make_cfg(seq_encoder_type="longer", seq_causal=True, use_rope=True),
    make_cfg(seq_encoder_type="longer", use_target_attention=True),
    make_cfg(seq_encoder_type="swiglu", use_ns_self_attn=True, use_combined_autoint=True),
])
def test_length_buckets_do_not_change_outputs_or_gradients(cfg, monkeypatch):
    """Buckets (forced to be many and tight) vs one untrimmed bucket: the same function."""
    g = torch.Generator().manual_seed(3)
    lens = {d: [n] + torch.randint(0, n + 1, (15,), generator=g).tolist()  # row 0 is full
            for d, n in SEQ_LENS.items()}
    batch = make_batch(batch=16, lens=lens)
    model = make_model(cfg)
    results = []
    for buckets, row_quantum, len_quantum, overhead in ((1, 8, 32, 2e5), (8, 1, 1, 0.0)):
        for name, value in (("ROW_QUANTUM", row_quantum), ("LEN_QUANTUM", len_quantum),
                            ("BUCKET_OVERHEAD", overhead)):
            monkeypatch.setattr(modules, name, value)
        model.seq.max_seq_buckets = buckets
        model.zero_grad()
        model.train()(batch).logits.sum().backward()
        grads = {n: p.grad.to_dense().clone() for n, p in model.named_parameters()
                 if p.grad is not None}
        results.append((model.eval().predict(batch), grads))
    plan = RowBuckets(batch.seq["seq_c"].lens, 8, 8)
    assert len(plan.bounds) > 2  # the second run really used several buckets
    (pred_one, grads_one), (pred_many, grads_many) = results
    torch.testing.assert_close(pred_many, pred_one, rtol=1e-5, atol=1e-6)
    assert grads_many.keys() == grads_one.keys()
    for name in grads_one:
        torch.testing.assert_close(grads_many[name], grads_one[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_predict_records_no_graph():
    model = make_model().eval()
    out = model.predict(make_batch())
    assert not out.requires_grad and out.grad_fn is None


# ----------------------------------------------------------------------------- training

def test_sparse_step_changes_only_rows_seen_in_the_batch():
    model = make_model(make_cfg(use_pair_62_66=True)).train()
    tables = dict(model.named_modules())
    big = [tables["ns.item_tokenizer.embedding.tables.16"],
           tables["seq.tokenizers.seq_a.tables.38"]]
    assert all(t.sparse for t in big) and not tables["seq.tokenizers.seq_a.tables.40"].sparse
    before = {id(t): t.weight.detach().clone() for t in model.feature_tables()}
    batch = make_batch()
    batch.user_dense = batch.user_dense.abs() + 1  # no zero pair weight
    opt = torch.optim.Adagrad(model.sparse_parameters(), lr=0.1)
    F.binary_cross_entropy_with_logits(model(batch).logits[:, 0],
                                       batch.label.float()).backward()
    assert all(t.weight.grad.is_sparse for t in big)
    opt.step()
    owners = {id(t): (emb, fid) for emb in (model.ns.user_tokenizer.embedding,
                                            model.ns.item_tokenizer.embedding)
              for fid, t in ((int(k), v) for k, v in emb.tables.items())}
    for table in model.feature_tables():
        changed = (table.weight.detach() != before[id(table)]).any(dim=1)
        if id(table) in owners:
            emb, fid = owners[id(table)]
            spec = next(s for s in emb.specs if s.fid == fid)
            group = batch.user_int if emb is model.ns.user_tokenizer.embedding else batch.item_int
            ids = group[:, spec.offset:spec.offset + spec.length]
        else:
            name = next(n for n, m in model.seq.tokenizers.items() if table in m.tables.values())
            index = next(i for i, k, _ in model.seq.tokenizers[name].features
                         if model.seq.tokenizers[name].tables[k] is table)
            ids = batch.seq[name].ids[:, index]
        seen = torch.zeros(table.num_embeddings, dtype=torch.bool)
        seen[ids.flatten()] = True
        seen[0] = False
        assert torch.equal(changed, seen)


def test_parameter_groups_partition_the_model():
    model = make_model(make_cfg(use_abs_time_emb=True))
    sparse, dense = model.sparse_parameters(), model.dense_parameters()
    ids = [id(p) for p in sparse + dense]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert len(sparse) == len(model.feature_tables()) + 5  # + bucket, seq/user hour and dow
    assert all(p.dim() == 2 for p in sparse)


def test_reinit_only_touches_tables_above_threshold():
    model = make_model(make_cfg(use_abs_time_emb=True))
    with torch.no_grad():
        for p in model.sparse_parameters():
            p.fill_(0.5)
    params = model.reinit_high_cardinality_params(30)
    reinit = {id(p) for p in params}
    for table in model.feature_tables():
        vocab = table.num_embeddings - 1
        assert (id(table.weight) in reinit) == (vocab > 30)
        if vocab > 30:
            assert torch.equal(table.weight[0], torch.zeros(8))
            assert not torch.all(table.weight[1:] == 0.5)
        else:
            assert torch.all(table.weight == 0.5)
    for table in model.time_tables():
        assert torch.all(table.weight == 0.5)
    assert len(model.reinit_high_cardinality_params(0)) == len(model.feature_tables())


@pytest.mark.parametrize("to_dense", [False, True])
def test_request_time_is_added_to_user_tokens_only(to_dense):
    model = make_model(make_cfg(use_abs_time_emb=True, add_user_time_to_dense_tok=to_dense))
    batch = make_batch()
    other = dataclasses.replace(batch, hour=(batch.hour + 5) % 24)
    with torch.no_grad():
        changed = (model.ns(batch)[0] != model.ns(other)[0]).any(-1).any(0)
    # Tokens: [user NS][user dense][item NS][item dense].
    assert changed.tolist() == [True, to_dense, False, False]


def test_user_time_missing_as_padding_tables():
    model = make_model(make_cfg(use_abs_time_emb=True), user_time_missing_as_padding=True)
    assert model.ns.user_hour_emb.num_embeddings == 25 and model.ns.user_dow_emb.padding_idx == 0
    batch = make_batch()
    batch.hour, batch.dayofweek = torch.tensor([0, 1, 24, 5]), torch.tensor([0, 1, 7, 3])
    assert torch.isfinite(model(batch).logits).all()


# ----------------------------------------------------------------------------- decoupling

def test_endogenous_decoupling_adds_losses_not_tokens():
    dcfg = DecouplingConfig(use_endogenous_decoupling=True, decouple_user=True,
                            decouple_ipw=True, decouple_user_atom_fids="3,4",
                            decouple_user_side_fids="1,48,49,50", decouple_dim=8,
                            decouple_loss_weight=0.3)
    plain = make_model(make_cfg())
    model = make_model(make_cfg(), dcfg=dcfg)
    assert model.num_tokens == plain.num_tokens
    out = model(make_batch())
    assert {k.split("/")[0] for k in out.aux_losses} == {"item", "user"}
    assert {"item/side_ssl", "item/stage1", "item/atom_orth_ssl"} <= set(out.aux_losses)
    assert out.sample_weight.shape == (4,)
    torch.testing.assert_close(out.sample_weight.mean(), torch.tensor(1.0))
    assert {a.weight for a in out.aux_losses.values()} == {0.3}  # each loss carries its weight
    (out.logits.sum() + sum(a.weight * a.value for a in out.aux_losses.values())).backward()


@pytest.mark.parametrize("dcfg, error", [
    (DecouplingConfig(use_endogenous_decoupling=True, decouple_item_atom_fids="999"), KeyError),
    (DecouplingConfig(use_endogenous_decoupling=True, decouple_item_side_fids="9"),
     ValueError),  # vocab 0: no table
])
def test_decoupling_fid_errors(dcfg, error):
    with pytest.raises(error, match="decoupling"):
        make_model(make_cfg(), dcfg=dcfg)


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("extra, error, match", [
    ({"user_ns_tokens": 2}, ValueError, r"T = .*user_ns_tokens in \[1"),
    ({"num_heads": 3}, ValueError, "num_heads"),
    ({"ns_tokenizer_type": "group", "randomized_split": True}, ValueError, "randomized_split"),
    ({"randomized_split": True, "user_ns_tokens": 99, "rank_mixer_mode": "none"}, ValueError,
     "99 tokens"),
    ({"use_dense_cross_token": True, "dense_cross_user_fids": "61,999",
      "rank_mixer_mode": "none"}, KeyError, "999"),
    ({"use_dense_cross_token": True, "dense_cross_user_fids": "",
      "rank_mixer_mode": "none"}, ValueError, "empty"),
    ({"use_dense_cross_token": True, "dense_cross_user_fids": "61,61",
      "rank_mixer_mode": "none"}, ValueError, "duplicates"),
    ({"dense_cross_item_source": "bogus"}, ValueError, "dense_cross_item_source"),
    ({"dense_cross_dim": -1}, ValueError, "dense_cross_dim"),
    ({"ns_self_attn_impl": "autoint", "ns_autoint_layers": 0}, ValueError, "AutoInt"),
    ({"ns_self_attn_impl": "autoint", "ns_autoint_heads": 3}, ValueError, "AutoInt"),
    ({"ns_self_attn_impl": "autoint", "ns_autoint_activation": "tanh"}, ValueError,
     "activation"),
    ({"ns_self_attn_impl": "bogus"}, ValueError, "ns_self_attn_impl"),
    ({"use_combined_autoint": True, "combined_autoint_heads": 5}, ValueError, "combined"),
    ({"combined_autoint_position": "middle"}, ValueError, "combined_autoint_position"),
    ({"head_cross_layers": -1}, ValueError, "head_cross_layers"),
    ({"seq_encoder_type": "longer", "seq_top_k": 0}, ValueError, "seq_top_k"),
])
def test_bad_configurations(extra, error, match):
    with pytest.raises(error, match=match):
        make_model(make_cfg(**extra))


def test_pair_mode_errors():
    raw = json.loads(json.dumps(RAW_SCHEMA))
    raw["user_dense"] = [e for e in raw["user_dense"] if e[0] != 64]
    with pytest.raises(KeyError, match="64"):
        make_model(make_cfg(use_pair_62_66=True), layout=make_layout(raw))
    raw = json.loads(json.dumps(RAW_SCHEMA))
    raw["user_dense"] = [e for e in raw["user_dense"] if e[0] != 87]
    with pytest.raises(KeyError, match="87"):
        make_model(make_cfg(use_pair_62_66=True), layout=make_layout(raw))
    with pytest.raises(ValueError, match="no embedding table"):
        make_model(make_cfg(use_pair_62_66=True, emb_skip_threshold=8))


def test_activity_fids_are_all_or_none_in_pair_mode():
    raw = json.loads(json.dumps(RAW_SCHEMA))
    raw["user_dense"].append([900, 1])
    # A schema's own fid 900 is a plain dense feature, never a partial activity set.
    layout = make_layout(raw, activity=False)
    assert not layout.activity and [s.kind for s in layout.user_dense if s.fid == 900] == ["plain"]
    heads = make_model(make_cfg(use_pair_62_66=True), layout=layout).ns.user_dense_token.heads
    assert len(heads) == 5  # 61, 87, 89-91, no activity head
    heads = make_model(make_cfg(use_pair_62_66=True)).ns.user_dense_token.heads
    assert len(heads) == 6 and heads[-1].cols.numel() == 16  # 61, 87, 89-91 + activity


def test_ns_group_errors():
    good = {"user_ns_groups": {"a": [s.fid for s in LAYOUT.user_int]}}
    assert make_model(make_cfg(ns_tokenizer_type="group", rank_mixer_mode="none"),
                      ns_groups=good).ns.user_tokenizer.num_tokens == 1
    with pytest.raises(KeyError, match="fid 777"):
        make_model(ns_groups={"user_ns_groups": {"a": [777]}})
    with pytest.raises(ValueError, match="in no group"):
        make_model(ns_groups={"user_ns_groups": {"a": [1, 3]}})
    with pytest.raises(ValueError, match="more than one group"):
        make_model(ns_groups={"user_ns_groups": {"a": [1, 3], "b": [3]}})


def test_repo_ns_groups_cover_the_online_schema():
    if not os.path.isfile(ONLINE_SCHEMA):
        pytest.skip("reference online schema not available")
    path = os.path.join(ROOT, "ns_groups.json")
    layout, _ = load_schema(ONLINE_SCHEMA, {}, True)
    groups = load_ns_groups(path)
    users = [k for k in groups["user_ns_groups"] if not k.startswith("_")]
    items = [k for k in groups["item_ns_groups"] if not k.startswith("_")]
    assert len(users) == 7 and len(items) == 4
    assert sorted(f for g in groups["user_ns_groups"].values() for f in g) == sorted(
        s.fid for s in layout.user_int)
    assert sorted(f for g in groups["item_ns_groups"].values() for f in g) == sorted(
        s.fid for s in layout.item_int)
    assert load_ns_groups("") == {}
    assert load_ns_groups(os.path.join(ROOT, "no_such_file.json")) == {}


def test_build_model_resolves_a_groups_path(tmp_path):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"item_ns_groups": {"i1": [16, 11, 5], "i2": [6, 7, 9]}}))
    cfg = make_cfg(ns_tokenizer_type="group", rank_mixer_mode="none")
    model = build_model(Config(model=dataclasses.replace(cfg, ns_groups_json=str(path))), LAYOUT)
    assert model.ns.item_tokenizer.num_tokens == 2 and model.ns.user_tokenizer.num_tokens == 15
    assert build_model(Config(model=cfg), LAYOUT).ns.num_tokens == 15 + 1 + 6 + 1
    assert build_model(Config(model=cfg), LAYOUT, {"item_ns_groups": {"i": [16, 11, 5, 6, 7, 9]}}
                       ).ns.item_tokenizer.num_tokens == 1


def test_time_bucket_table_has_a_row_per_bucket_id():
    import pcvr.schema as schema
    assert make_model().seq.time_bucket_emb.num_embeddings == schema.NUM_TIME_BUCKETS == 64


def test_feature_kinds_are_set_once_by_the_schema():
    kinds = {(s.fid, s.kind) for s in LAYOUT.user_int + LAYOUT.user_dense}
    assert {(62, "paired"), (66, "paired"), (61, "dense_head"), (87, "dense_head"),
            (900, "activity"), (1, "plain")} <= kinds
    assert [(i.fid, d.fid) for i, d in LAYOUT.pairs] == [(f, f) for f in (62, 63, 64, 65, 66)]
    raw = json.loads(json.dumps(RAW_SCHEMA))
    raw["user_dense"] = [[62, 4] if e[0] == 62 else e for e in raw["user_dense"]]
    with pytest.raises(SchemaError, match="fid 62: user_int dim 3 != user_dense dim 4"):
        make_layout(raw)
    raw["user_dense"] = [e for e in RAW_SCHEMA["user_dense"] if e[0] != 63]
    layout = make_layout(raw)  # 63 is then a plain id list, which the data reads as any other
    assert [i.fid for i, _ in layout.pairs] == [62, 64, 65, 66]
    with pytest.raises(KeyError, match=r"use_pair_62_66: fid\(s\) \[63\]"):
        make_model(make_cfg(use_pair_62_66=True), layout=layout)
