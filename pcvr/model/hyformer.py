"""PCVR HyFormer: the model of model_spec.md, built from ``FeatureLayout`` + ``ModelConfig``.

Data flow of one forward pass (model_spec §8)::

    ns    = NS tokens: user ints, user dense, item ints, item dense, dense cross  [B, N_ns, D]
    seqs  = per-domain sequence tokens (+ time-bucket and hour/day embeddings)   S x [B, L, D]
    q     = MultiSeqQueryGenerator(ns, pooled seqs)                              [B, S, Nq, D]
    q, ns, seqs = HyFormerBlock x num_hyformer_blocks
    h     = LN(Lin(flatten(q)))  (+ HeadCrossNet, + target attention)            [B, D]
    logits = classifier(h)                                                       [B, action_num]

Differences from the reference, all deliberate (details in the docstrings of the parts):

* sequences are newest first, so the ``longer`` encoder keeps positions ``0 .. top_k-1``
  (its reference top-k misalignment bug cannot occur) and target attention's "last" token is
  position 0, the most recent event;
* dense inputs pass a parameter-free ``signed_log1p`` (raw values reach 1e7);
* no attention-probability dropout inside SDPA: the attention output is dropped instead;
* the time-bucket table has 64 rows (pipeline_spec §1.5), sequence projections skip the
  all-zero columns of table-less features, and ``forward`` does no host-device sync (input
  ranges are the data pipeline's job);
* tables of at most ``DENSE_GRAD_MAX_ROWS`` rows have dense gradients, larger ones sparse
  (the same Adagrad update, much cheaper; ``feature_tokens``);
* the reinit threshold is explicit: ``vocab_size > threshold``, so 0 re-initialises every
  feature table (model_spec §11.1.2).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from pcvr.config import DecouplingConfig, ModelConfig, parse_int_list
from pcvr.model.decoupling import DecoupledOutput, EntityDecoupler
from pcvr.model.tokens import (DenseCrossToken, DenseToken, GroupNSTokenizer,
                            NSFeatureEmbedding, PairModeUserDenseToken, RankMixerNSTokenizer,
                            SequenceTokenizer, has_table, init_table_)
from pcvr.model.modules import (BucketedSeq, CrossAttention, Dropout, GatedTokenAutoInt, HeadCrossNet,
                     LongerEncoder, MultiSeqQueryGenerator, NSAutoIntLayer, NSSelfAttention,
                     NSTokenSEGate, RankMixerBlock, RotaryEmbedding, RowBuckets, SwiGLUEncoder,
                     TargetAwareAttentionHead, TransformerEncoder, masked_mean, valid_mask)
from pcvr.schema import NUM_TIME_BUCKETS, PAIR_FIDS, FeatureLayout, FeatureSpec

log = logging.getLogger(__name__)

ROPE_MAX_LEN = 2048
# Most length buckets per domain and batch (the cost model of RowBuckets picks how many).
MAX_SEQ_BUCKETS = 8
DENSE_CROSS_SOURCES = ("user_dense", "item_dense", "item_ns")
AUTOINT_POSITIONS = ("pre_mixer", "post_mixer")
NSGroups = Mapping[str, Any]


class ModelOutput(NamedTuple):
    """What ``PCVRHyFormer.forward`` returns.

    logits: ``[B, action_num]``.
    aux_losses: decoupling losses (``'item/side_ssl'``, ``'user/stage1'``, ...), already
        weighted within the decoupler; empty unless ``use_endogenous_decoupling``.
    sample_weight: ``[B]`` detached IPW weights of the item decoupler (mean 1), or None.
    """
    logits: torch.Tensor
    aux_losses: Dict[str, torch.Tensor]
    sample_weight: Optional[torch.Tensor]


# ----------------------------------------------------------------------------- NS groups

def load_ns_groups(path: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """Reads an ns_groups.json; ``''`` or a missing file -> ``(None, None)`` (singleton groups).

    Returns:
        (parsed dict or None, the absolute path read or None).
    """
    if not path:
        return None, None
    if not os.path.isfile(path):
        log.warning("ns_groups_json %s not found: one NS group per feature", path)
        return None, None
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh), os.path.abspath(path)


def resolve_groups(groups: Optional[Mapping[str, Sequence[int]]], specs: Sequence[FeatureSpec],
                   side: str) -> List[List[int]]:
    """Group name -> fids (dict order = token order) into lists of positions in ``specs``.

    Keys beginning with ``_`` are comments. None or empty -> one singleton group per feature.

    Raises:
        KeyError: a grouped fid is not in the schema's ``side`` features.
        ValueError: a fid is grouped twice, or schema fids are left out of every group.
    """
    named = {k: v for k, v in (groups or {}).items() if not str(k).startswith("_")}
    if not named:
        return [[i] for i in range(len(specs))]
    index = {s.fid: i for i, s in enumerate(specs)}
    out, seen = [], set()
    for name, fids in named.items():
        group = []
        for fid in fids:
            if fid not in index:
                raise KeyError(f"ns_groups: {side} group {name!r} lists fid {fid}, which is not "
                               f"a {side} int feature of the schema {sorted(index)}")
            if fid in seen:
                raise ValueError(f"ns_groups: {side} fid {fid} appears in more than one group")
            seen.add(fid)
            group.append(index[fid])
        if not group:
            raise ValueError(f"ns_groups: {side} group {name!r} is empty")
        out.append(group)
    missing = [s.fid for s in specs if s.fid not in seen]
    if missing:
        raise ValueError(f"ns_groups: {side} fids {missing} of the schema are in no group; "
                         f"every {side} int fid must be grouped")
    return out


def _token_count_hint(d_model: int, n_seq_tokens: int, num_domains: int, num_ns: int,
                      user_tokens: Optional[int]) -> str:
    """Which settings would make ``T`` divide ``d_model`` (for the full-mixer error)."""
    divisors = [t for t in range(1, d_model + 1) if d_model % t == 0]
    ns_ok = [t - n_seq_tokens for t in divisors if t > n_seq_tokens]
    q_ok = [(t - num_ns) // num_domains for t in divisors
            if t > num_ns and (t - num_ns) % num_domains == 0]
    hint = f"valid T: {[t for t in divisors if t > num_domains]}; N_ns must be one of {ns_ok}"
    if user_tokens is not None:
        users = [user_tokens + n - num_ns for n in ns_ok if user_tokens + n - num_ns > 0]
        hint += f" (e.g. user_ns_tokens in {users})"
    hint += f"; or num_queries in {q_ok}" if q_ok else "; no num_queries fits this N_ns"
    return hint + "; or rank_mixer_mode 'ffn_only' / 'none'"


def _pair_dense(layout: FeatureLayout) -> Dict[int, FeatureSpec]:
    """Pair fid -> its user dense spec; every fid of ``PAIR_FIDS`` must be paired."""
    pairs = {i.fid: dense for i, dense in layout.pairs}
    missing = [fid for fid in PAIR_FIDS if fid not in pairs]
    if missing:
        raise KeyError(f"use_pair_62_66: fid(s) {missing} are not declared in both user_int "
                       f"and user_dense of the schema (with the same dim)")
    return pairs


# ----------------------------------------------------------------------------- decoupling

class DecouplingBranch(nn.Module):
    """Endogenous decoupling of one entity (item or user), added to its NS tokens.

    Atom input = concat of the entity tokenizer's ``E``-vectors of the atom fids, side input =
    the same for the side fids; ``EntityDecoupler`` gives ``atom``, ``side`` ``[B, Dd]`` and
    its losses; ``Lin([atom, side]) -> D`` is added to every NS token of the entity, so the
    token count is unchanged.

    Shape: ``[B, n_fids, E]`` -> (``[B, 1, D]`` addend, ``DecoupledOutput``).
    """

    def __init__(self, embedding: NSFeatureEmbedding, atom_fids: Sequence[int],
                 side_fids: Sequence[int], skip_threshold: int, d_model: int,
                 dcfg: DecouplingConfig, side: str):
        super().__init__()
        specs = {s.fid: s for s in embedding.specs}
        for kind, fids in (("atom", atom_fids), ("side", side_fids)):
            if not fids:
                raise ValueError(f"decoupling: no {side} {kind} fids configured")
            for fid in fids:
                if fid not in specs:
                    raise KeyError(f"decoupling: {side} {kind} fid {fid} is not a {side} int "
                                   f"feature of the schema {sorted(specs)}")
                if not has_table(specs[fid].vocab_size, skip_threshold):
                    raise ValueError(f"decoupling: {side} {kind} fid {fid} has no embedding "
                                     f"table (vocab {specs[fid].vocab_size}, emb_skip_threshold "
                                     f"{skip_threshold})")
        e = embedding.emb_dim
        self.register_buffer("atom_index", torch.tensor([embedding.index_of(f) for f in atom_fids]),
                             persistent=False)
        self.register_buffer("side_index", torch.tensor([embedding.index_of(f) for f in side_fids]),
                             persistent=False)
        self.decoupler = EntityDecoupler(len(atom_fids) * e, len(side_fids) * e,
                                         dcfg.decouple_dim, dcfg)
        self.proj = nn.Linear(2 * dcfg.decouple_dim, d_model)

    def forward(self, emb: torch.Tensor) -> Tuple[torch.Tensor, DecoupledOutput]:
        out = self.decoupler(emb.index_select(1, self.atom_index).flatten(1),
                             emb.index_select(1, self.side_index).flatten(1))
        return self.proj(torch.cat([out.atom, out.side], dim=-1)).unsqueeze(1), out


# ----------------------------------------------------------------------------- backbone block

class HyFormerBlock(nn.Module):
    """One HyFormer block (model_spec §6.6).

    1. per domain: sequence encoder; 2. per domain: query cross-attention over the encoded
    sequence; 3. optional NS feature cross (``ns_feature_cross``); 4. concat
    ``[queries (domain order), NS]`` -> ``[B, T, D]``; 5. optional combined AutoInt
    (pre-mixer), RankMixer, optional combined AutoInt (post-mixer); 6. split back.

    Steps 1-2 run per length bucket of each domain (``BucketedSeq``); the queries' results
    are merged back into batch order.

    Args:
        cfg: architecture flags.
        seq_max_lens: ``L`` of each domain (schema order), which sets, for the ``longer``
            encoder, which domains reduce to ``top_k`` tokens in this block.
        num_ns: ``N_ns``.
        rope: shared rotary embedding or None.
        first: the first block (the ``longer`` encoder reduces ``L > top_k`` domains here).

    Shape: q ``[B, S, Nq, D]``, ns ``[B, N_ns, D]``, seqs ``S x BucketedSeq`` -> the same three
        (bucket lengths shrink to ``top_k`` with the ``longer`` encoder).
    """

    def __init__(self, cfg: ModelConfig, seq_max_lens: Sequence[int], num_ns: int,
                 rope: Optional[RotaryEmbedding], first: bool):
        super().__init__()
        d, h, p = cfg.d_model, cfg.num_heads, cfg.dropout_rate
        num_domains = len(seq_max_lens)
        self.encoders = nn.ModuleList(self._encoder(cfg, rope, first and n > cfg.seq_top_k)
                                      for n in seq_max_lens)
        self.cross_attns = nn.ModuleList(CrossAttention(d, h, p, rope)
                                         for _ in range(num_domains))
        self.ns_feature_cross: Optional[nn.Module] = None
        if cfg.use_ns_self_attn and cfg.ns_self_attn_impl == "mha":
            self.ns_feature_cross = NSSelfAttention(d, h, p)
        elif cfg.use_ns_self_attn:
            heads = cfg.ns_autoint_heads or h
            self.ns_feature_cross = nn.Sequential(*(
                NSAutoIntLayer(d, heads, p, cfg.ns_autoint_gate_init, cfg.ns_autoint_activation)
                for _ in range(cfg.ns_autoint_layers)))
        self.combined_autoint: Optional[GatedTokenAutoInt] = None
        if cfg.use_combined_autoint:
            self.combined_autoint = GatedTokenAutoInt(
                d, cfg.combined_autoint_heads or h, cfg.combined_autoint_layers,
                p if cfg.combined_autoint_dropout < 0 else cfg.combined_autoint_dropout,
                cfg.combined_autoint_gate_init)
        self.autoint_pre_mixer = cfg.combined_autoint_position == "pre_mixer"
        self.num_seq_tokens = num_domains * cfg.num_queries
        self.mixer = RankMixerBlock(self.num_seq_tokens + num_ns, d, cfg.hidden_mult, p,
                                    cfg.rank_mixer_mode)

    @staticmethod
    def _encoder(cfg: ModelConfig, rope: Optional[RotaryEmbedding], reduce: bool) -> nn.Module:
        d, h, m, p = cfg.d_model, cfg.num_heads, cfg.hidden_mult, cfg.dropout_rate
        if cfg.seq_encoder_type == "transformer":
            return TransformerEncoder(d, h, m, p, rope)
        if cfg.seq_encoder_type == "swiglu":
            return SwiGLUEncoder(d, m, p)
        if cfg.seq_encoder_type == "longer":
            return LongerEncoder(d, h, m, p, cfg.seq_top_k, cfg.seq_causal, reduce, rope)
        raise ValueError(f"seq_encoder_type must be transformer, swiglu or longer, got "
                         f"{cfg.seq_encoder_type!r}")

    def forward(self, q: torch.Tensor, ns: torch.Tensor, seqs: List[BucketedSeq]
                ) -> Tuple[torch.Tensor, torch.Tensor, List[BucketedSeq]]:
        queries, encoded_seqs = [], []
        for i, (enc, attn, seq) in enumerate(zip(self.encoders, self.cross_attns, seqs)):
            encoded = [enc(s, n) for s, n in zip(seq.tokens, seq.lens)]
            seq = seq._replace(tokens=[s for s, _ in encoded], lens=[n for _, n in encoded])
            queries.append(seq.per_row(lambda s, n, qb: attn(qb, s, n), q[:, i]))
            encoded_seqs.append(seq)
        q = torch.stack(queries, dim=1)
        if self.ns_feature_cross is not None:
            ns = self.ns_feature_cross(ns)
        x = torch.cat([q.flatten(1, 2), ns], dim=1)
        if self.combined_autoint is not None and self.autoint_pre_mixer:
            x = self.combined_autoint(x)
        x = self.mixer(x)
        if self.combined_autoint is not None and not self.autoint_pre_mixer:
            x = self.combined_autoint(x)
        q, ns = x.split([self.num_seq_tokens, x.shape[1] - self.num_seq_tokens], dim=1)
        return q.unflatten(1, (len(seqs), -1)), ns, encoded_seqs


# ----------------------------------------------------------------------------- the model

class PCVRHyFormer(nn.Module):
    """The PCVR HyFormer ranking model (model_spec.md).

    Args:
        layout: the flattened feature layout of the batches (``schema.FeatureLayout``).
        cfg: architecture flags.
        dcfg: endogenous-decoupling settings (read when ``cfg.use_endogenous_decoupling``).
        ns_groups: parsed ns_groups.json (``user_ns_groups`` / ``item_ns_groups``: name ->
            fids), or None / empty for one group per feature.
        user_time_missing_as_padding: the data's request hour/day ids are shifted by one
            with 0 = missing (``DataConfig.user_abs_time_missing_as_padding``): the user
            hour/day tables get 25/8 rows with padding row 0 instead of 24/7.

    Attributes:
        num_ns_tokens: ``N_ns``.
        num_tokens: ``T = num_queries * S + N_ns``.
        max_seq_buckets: the most length buckets per domain (``modules.RowBuckets``; 1 =
            only trim every domain to its longest row). Outputs do not depend on it.

    Inputs (``forward``/``predict``): the batch dict of the data pipeline (pipeline_spec
    §1.8): ``user_int_feats [B, *]``, ``item_int_feats [B, *]``, ``user_dense_feats``,
    ``item_dense_feats``, ``hour``/``dayofweek [B]`` and per domain ``d [B, F_d, L_d]``,
    ``d_len [B]``, ``d_time_bucket``/``d_hour``/``d_dayofweek [B, L_d]``; other keys ignored.
    """

    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, dcfg: DecouplingConfig,
                 ns_groups: Optional[NSGroups] = None, *,
                 user_time_missing_as_padding: bool = False):
        super().__init__()
        d, e = cfg.d_model, cfg.emb_dim
        if min(d, e, cfg.num_heads, cfg.num_queries, cfg.num_hyformer_blocks,
               cfg.hidden_mult, cfg.action_num) < 1:
            raise ValueError("d_model, emb_dim, num_heads, num_queries, num_hyformer_blocks, "
                             "hidden_mult and action_num must all be >= 1")
        if d % cfg.num_heads:
            raise ValueError(f"d_model {d} is not divisible by num_heads {cfg.num_heads}")
        if not layout.seq:
            raise ValueError("the schema has no sequence domain; HyFormer needs at least one")
        self._check_crosses(cfg)
        self.cfg = cfg
        num_domains = len(layout.seq)
        skip = cfg.emb_skip_threshold

        # NS tokenizers (user / item), §3, §9.3, §9.4.
        groups = ns_groups or {}
        user_groups = resolve_groups(groups.get("user_ns_groups"), layout.user_int, "user")
        item_groups = resolve_groups(groups.get("item_ns_groups"), layout.item_int, "item")
        pair_dense = _pair_dense(layout) if cfg.use_pair_62_66 else None
        self.user_tokenizer = self._ns_tokenizer(
            cfg, NSFeatureEmbedding(layout.user_int, e, skip, pair_dense, cfg.pair_pooling),
            user_groups, cfg.user_ns_tokens, 0)
        self.item_tokenizer = self._ns_tokenizer(
            cfg, NSFeatureEmbedding(layout.item_int, e, skip), item_groups, cfg.item_ns_tokens,
            100003)
        n_user, n_item = self.user_tokenizer.num_tokens, self.item_tokenizer.num_tokens

        # Dense tokens, §3.4, §9.2, §9.11.
        self.user_dense_token: Optional[nn.Module] = None
        if cfg.use_pair_62_66:
            self.user_dense_token = PairModeUserDenseToken(layout.user_dense, d)
        elif layout.user_dense:
            self.user_dense_token = DenseToken(layout.user_dense, d)
        self.item_dense_token = DenseToken(layout.item_dense, d) if layout.item_dense else None

        # Request hour / day of week, §9.1 (the sequence tables are below).
        self.use_abs_time = cfg.use_abs_time_emb
        self.add_user_time_to_dense = cfg.use_abs_time_emb and cfg.add_user_time_to_dense_tok
        if self.use_abs_time:
            pad = 0 if user_time_missing_as_padding else None
            shift = 1 if user_time_missing_as_padding else 0
            self.user_hour_emb = nn.Embedding(24 + shift, d, padding_idx=pad)
            self.user_dow_emb = nn.Embedding(7 + shift, d, padding_idx=pad)

        # Endogenous decoupling: added to the NS tokens of the item (and user).
        self.item_decoupling: Optional[DecouplingBranch] = None
        self.user_decoupling: Optional[DecouplingBranch] = None
        if cfg.use_endogenous_decoupling:
            self.item_decoupling = DecouplingBranch(
                self.item_tokenizer.embedding, parse_int_list(dcfg.decouple_item_atom_fids),
                parse_int_list(dcfg.decouple_item_side_fids), skip, d, dcfg, "item")
            if dcfg.decouple_user:
                self.user_decoupling = DecouplingBranch(
                    self.user_tokenizer.embedding, parse_int_list(dcfg.decouple_user_atom_fids),
                    parse_int_list(dcfg.decouple_user_side_fids), skip, d, dcfg, "user")

        # Dense cross token, §9.5.
        self.dense_cross_token = (self._dense_cross(cfg, layout, n_item)
                                  if cfg.use_dense_cross_token else None)

        # Token accounting: [user NS][user dense][item NS][item dense][dense cross].
        self.item_ns_start = n_user + int(self.user_dense_token is not None)
        self.item_ns_end = self.item_ns_start + n_item
        self.num_ns_tokens = (self.item_ns_end + int(self.item_dense_token is not None)
                              + int(self.dense_cross_token is not None))
        self.num_tokens = cfg.num_queries * num_domains + self.num_ns_tokens
        if cfg.rank_mixer_mode == "full" and d % self.num_tokens:
            user_k = n_user if cfg.ns_tokenizer_type == "rankmixer" else None
            raise ValueError(
                f"rank_mixer_mode 'full' needs d_model % T == 0, but d_model = {d} and "
                f"T = num_queries * S + N_ns = {cfg.num_queries} * {num_domains} + "
                f"{self.num_ns_tokens} = {self.num_tokens}; "
                + _token_count_hint(d, cfg.num_queries * num_domains, num_domains,
                                    self.num_ns_tokens, user_k))
        self.se_gate = NSTokenSEGate(self.num_ns_tokens, d) if cfg.use_ns_se_gate else None

        # Sequence tokens, §4: per-domain tokenizers + shared time tables.
        self.seq_tokenizers = nn.ModuleDict({
            dom.name: SequenceTokenizer(dom, e, d, skip, cfg.seq_id_threshold,
                                        2 * cfg.dropout_rate) for dom in layout.seq})
        self.time_bucket_emb = (nn.Embedding(NUM_TIME_BUCKETS, d, padding_idx=0)
                                if cfg.use_time_buckets else None)
        if self.use_abs_time:
            self.seq_hour_emb = nn.Embedding(25, d, padding_idx=0)
            self.seq_dow_emb = nn.Embedding(8, d, padding_idx=0)
        for table in self._time_tables():  # xavier like the feature tables, padding row 0
            nn.init.xavier_normal_(table.weight)
            if table.padding_idx is not None:
                with torch.no_grad():
                    table.weight[table.padding_idx].zero_()

        # Backbone, §5-§6.
        self.query_generator = MultiSeqQueryGenerator(num_domains, cfg.num_queries,
                                                      self.num_ns_tokens, d, cfg.hidden_mult)
        self.input_dropout = Dropout(cfg.dropout_rate)
        rope = None
        if cfg.use_rope:
            longest = max(dom.max_len for dom in layout.seq)
            if longest > ROPE_MAX_LEN:
                raise ValueError(f"use_rope supports sequences up to {ROPE_MAX_LEN}, got "
                                 f"{longest}")
            rope = RotaryEmbedding(d // cfg.num_heads, cfg.rope_base, ROPE_MAX_LEN)
        seq_max_lens = [dom.max_len for dom in layout.seq]
        self.blocks = nn.ModuleList(HyFormerBlock(cfg, seq_max_lens, self.num_ns_tokens, rope,
                                                  first=i == 0)
                                    for i in range(cfg.num_hyformer_blocks))
        self.max_seq_buckets = MAX_SEQ_BUCKETS  # length buckets per domain (modules.RowBuckets)

        # Head, §7, §9.9, §9.10.
        self.output_proj = nn.Sequential(nn.Linear(cfg.num_queries * num_domains * d, d),
                                         nn.LayerNorm(d))
        self.head_cross = (HeadCrossNet(d, cfg.head_cross_layers, cfg.head_cross_init_scale)
                           if cfg.head_cross_layers > 0 else None)
        self.target_attention = None
        if cfg.use_target_attention:
            if n_item == 0:
                raise ValueError("use_target_attention needs at least one item NS token")
            self.target_attention = TargetAwareAttentionHead(d, num_domains, cfg.hidden_mult)
        self.classifier = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.SiLU(),
                                        Dropout(cfg.dropout_rate),
                                        nn.Linear(d, cfg.action_num))

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_crosses(cfg: ModelConfig) -> None:
        """Validations of §9.7-§9.10 that do not depend on the schema."""
        if cfg.ns_self_attn_impl not in ("mha", "autoint"):
            raise ValueError(f"ns_self_attn_impl must be 'mha' or 'autoint', got "
                             f"{cfg.ns_self_attn_impl!r}")
        if cfg.ns_self_attn_impl == "autoint":
            heads = cfg.ns_autoint_heads or cfg.num_heads
            if cfg.ns_autoint_layers < 1 or heads < 1 or cfg.d_model % heads:
                raise ValueError(f"ns AutoInt needs ns_autoint_layers >= 1 and heads >= 1 "
                                 f"dividing d_model {cfg.d_model}; got layers "
                                 f"{cfg.ns_autoint_layers}, heads {heads}")
            if cfg.ns_autoint_activation not in NSAutoIntLayer.ACTIVATIONS:
                raise ValueError(f"ns_autoint_activation must be one of "
                                 f"{sorted(NSAutoIntLayer.ACTIVATIONS)}, got "
                                 f"{cfg.ns_autoint_activation!r}")
        if cfg.combined_autoint_position not in AUTOINT_POSITIONS:
            raise ValueError(f"combined_autoint_position must be one of {AUTOINT_POSITIONS}, "
                             f"got {cfg.combined_autoint_position!r}")
        if cfg.use_combined_autoint:
            heads = cfg.combined_autoint_heads or cfg.num_heads
            if cfg.combined_autoint_layers < 1 or heads < 1 or cfg.d_model % heads:
                raise ValueError(f"combined AutoInt needs combined_autoint_layers >= 1 and "
                                 f"heads >= 1 dividing d_model {cfg.d_model}; got layers "
                                 f"{cfg.combined_autoint_layers}, heads {heads}")
        if cfg.head_cross_layers < 0:
            raise ValueError(f"head_cross_layers must be >= 0, got {cfg.head_cross_layers}")
        if cfg.dense_cross_item_source not in DENSE_CROSS_SOURCES:
            raise ValueError(f"dense_cross_item_source must be one of {DENSE_CROSS_SOURCES}, "
                             f"got {cfg.dense_cross_item_source!r}")
        if cfg.dense_cross_dim < 0:
            raise ValueError(f"dense_cross_dim must be >= 0, got {cfg.dense_cross_dim}")

    @staticmethod
    def _ns_tokenizer(cfg: ModelConfig, embedding: NSFeatureEmbedding,
                      groups: List[List[int]], num_tokens: int, seed_offset: int) -> nn.Module:
        if cfg.ns_tokenizer_type == "group":
            if cfg.randomized_split:
                raise ValueError("randomized_split needs ns_tokenizer_type 'rankmixer'")
            return GroupNSTokenizer(embedding, groups, cfg.d_model)
        if cfg.ns_tokenizer_type != "rankmixer":
            raise ValueError(f"ns_tokenizer_type must be 'group' or 'rankmixer', got "
                             f"{cfg.ns_tokenizer_type!r}")
        if num_tokens < 0:
            raise ValueError(f"NS token counts must be >= 0 (0 = number of groups), got "
                             f"{num_tokens}")
        seed = cfg.randomized_split_seed + seed_offset if cfg.randomized_split else None
        return RankMixerNSTokenizer(embedding, groups, num_tokens, cfg.d_model, seed)

    @staticmethod
    def _dense_cross(cfg: ModelConfig, layout: FeatureLayout, n_item: int) -> DenseCrossToken:
        def specs(fids_text: str, group: Sequence[FeatureSpec], name: str) -> List[FeatureSpec]:
            fids = parse_int_list(fids_text)
            if not fids:
                raise ValueError(f"use_dense_cross_token: {name} is empty")
            if len(set(fids)) != len(fids):
                raise ValueError(f"use_dense_cross_token: {name} has duplicates: {fids}")
            return [FeatureLayout.find(group, f, name) for f in fids]

        user = specs(cfg.dense_cross_user_fids, layout.user_dense, "dense_cross_user_fids")
        source = cfg.dense_cross_item_source
        if source == "item_ns":
            if n_item == 0:
                raise ValueError("dense_cross_item_source 'item_ns' needs item NS tokens")
            item = None
        else:
            group = layout.user_dense if source == "user_dense" else layout.item_dense
            item = specs(cfg.dense_cross_item_fids, group, f"dense_cross_item_fids ({source})")
        return DenseCrossToken(user, item, cfg.d_model, cfg.dense_cross_dim or cfg.d_model)

    def _seq_time_tables(self, domain: str) -> List[Tuple[nn.Embedding, str]]:
        """(table, batch key) of the per-event time embeddings added to ``domain``'s tokens."""
        out = []
        if self.time_bucket_emb is not None:
            out.append((self.time_bucket_emb, f"{domain}_time_bucket"))
        if self.use_abs_time:
            out += [(self.seq_hour_emb, f"{domain}_hour"),
                    (self.seq_dow_emb, f"{domain}_dayofweek")]
        return out

    def _time_tables(self) -> List[nn.Embedding]:
        names = ("time_bucket_emb", "user_hour_emb", "user_dow_emb", "seq_hour_emb",
                 "seq_dow_emb")
        return [getattr(self, n) for n in names if getattr(self, n, None) is not None]

    # ------------------------------------------------------------------ forward
    def _ns_tokens(self, batch: Mapping[str, torch.Tensor]
                   ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """-> NS tokens ``[B, N_ns, D]``, aux losses, sample weight (§3, §9)."""
        user_dense = batch["user_dense_feats"]
        user_emb = self.user_tokenizer.embedding(batch["user_int_feats"], user_dense)
        item_emb = self.item_tokenizer.embedding(batch["item_int_feats"])
        user, item = self.user_tokenizer(user_emb), self.item_tokenizer(item_emb)
        aux: Dict[str, torch.Tensor] = {}
        sample_weight = None
        if self.item_decoupling is not None:
            add, out = self.item_decoupling(item_emb)
            item = item + add
            aux.update({f"item/{k}": v for k, v in out.losses.items()})
            sample_weight = out.sample_weight
        if self.user_decoupling is not None:
            add, out = self.user_decoupling(user_emb)
            user = user + add
            aux.update({f"user/{k}": v for k, v in out.losses.items()})

        user_time = None
        if self.use_abs_time:  # request hour/day: added to every user NS token
            user_time = self.user_hour_emb(batch["hour"]) + self.user_dow_emb(batch["dayofweek"])
            user = user + user_time.unsqueeze(1)
        tokens = [user]
        if self.user_dense_token is not None:
            dense = self.user_dense_token(user_dense)
            if self.add_user_time_to_dense:
                dense = dense + user_time
            tokens.append(dense.unsqueeze(1))
        tokens.append(item)
        if self.item_dense_token is not None:
            tokens.append(self.item_dense_token(batch["item_dense_feats"]).unsqueeze(1))
        if self.dense_cross_token is not None:
            source = self.cfg.dense_cross_item_source
            item_in = (item.mean(dim=1) if source == "item_ns" else
                       batch["user_dense_feats" if source == "user_dense" else "item_dense_feats"])
            tokens.append(self.dense_cross_token(user_dense, item_in).unsqueeze(1))
        ns = torch.cat(tokens, dim=1)
        if self.se_gate is not None:
            ns = self.se_gate(ns)
        return ns, aux, sample_weight

    def _sequence_tokens(self, batch: Mapping[str, torch.Tensor]) -> List[BucketedSeq]:
        """-> per-domain tokens (§4), built per length bucket: ``S x BucketedSeq``."""
        seqs = []
        for name, tokenizer in self.seq_tokenizers.items():
            lens = batch[f"{name}_len"]
            buckets = RowBuckets(lens, batch[name].shape[2], self.max_seq_buckets)
            tokens = [tokenizer(ids) for ids in buckets.split(batch[name], seq_dim=2)]
            # Per-event time embeddings; padding ids are 0 (zero rows), so padding adds nothing.
            for table, key in self._seq_time_tables(name):
                tokens = [x + table(ids) for x, ids
                          in zip(tokens, buckets.split(batch[key], seq_dim=1))]
            seqs.append(BucketedSeq(buckets, tokens, buckets.split(lens)))
        return seqs

    def _forward_impl(self, batch: Mapping[str, torch.Tensor], input_dropout: bool) -> ModelOutput:
        ns, aux, sample_weight = self._ns_tokens(batch)
        seqs = self._sequence_tokens(batch)
        pooled = torch.stack([seq.per_row(lambda s, n: masked_mean(s, valid_mask(n, s.shape[1])))
                              for seq in seqs], dim=1)
        q = self.query_generator(ns, pooled)  # [B, S, Nq, D], from the undropped tokens
        if input_dropout:
            q, ns = self.input_dropout(q), self.input_dropout(ns)
            seqs = [seq._replace(tokens=[self.input_dropout(s) for s in seq.tokens])
                    for seq in seqs]
        for block in self.blocks:
            q, ns, seqs = block(q, ns, seqs)
        h = self.output_proj(q.flatten(1))
        if self.head_cross is not None:
            h = self.head_cross(h)
        if self.target_attention is not None:
            target = ns[:, self.item_ns_start:self.item_ns_end].mean(dim=1)
            h = self.target_attention(h, target, seqs)
        return ModelOutput(self.classifier(h), aux, sample_weight)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> ModelOutput:
        """Training forward (input emb-dropout on in train mode) -> ``ModelOutput``."""
        return self._forward_impl(batch, input_dropout=True)

    @torch.no_grad()
    def predict(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, action_num]`` without the input emb-dropout (callers use eval mode).

        Inference only: runs under ``no_grad`` (recording a graph made float32 inference of a
        256-row batch ~1.1-2.5x slower and kept every activation alive).
        """
        return self._forward_impl(batch, input_dropout=False).logits

    # ------------------------------------------------------------------ parameter groups
    def feature_tables(self) -> List[nn.Embedding]:
        """The NS and sequence feature tables (time tables excluded)."""
        owners = [self.user_tokenizer.embedding, self.item_tokenizer.embedding,
                  *self.seq_tokenizers.values()]
        return [t for owner in owners for t in owner.tables.values()]

    def sparse_parameters(self) -> List[nn.Parameter]:
        """Every embedding table weight (feature and time tables): the Adagrad group."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding)]

    def dense_parameters(self) -> List[nn.Parameter]:
        """Every other parameter: the AdamW group."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    @torch.no_grad()
    def reinit_high_cardinality_params(self, threshold: int) -> List[nn.Parameter]:
        """Re-initialises every feature table with ``vocab_size > threshold`` (so 0 = all).

        Uses the construction init (xavier normal, padding row 0 zeroed); time-bucket and
        hour/day tables are never touched. Returns the re-initialised weights so that the
        caller can drop their optimiser state.
        """
        out = []
        for table in self.feature_tables():
            if table.num_embeddings - 1 > threshold:
                init_table_(table)
                out.append(table.weight)
        return out


def build_model(layout: FeatureLayout, cfg: ModelConfig, dcfg: DecouplingConfig,
                ns_groups: Union[str, NSGroups, None] = None, *,
                user_time_missing_as_padding: bool = False) -> PCVRHyFormer:
    """Builds ``PCVRHyFormer``; ``ns_groups`` is an ns_groups.json path, a parsed dict or None.

    A path that is ``''`` or missing gives one NS group per feature (``load_ns_groups``).
    """
    if isinstance(ns_groups, str):
        ns_groups, _ = load_ns_groups(ns_groups)
    return PCVRHyFormer(layout, cfg, dcfg, ns_groups,
                        user_time_missing_as_padding=user_time_missing_as_padding)
