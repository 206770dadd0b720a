"""The model's input stage: a ``Batch`` -> NS tokens and per-domain sequence tokens.

* ``NSTokens`` (model_spec §3, §9): user and item NS tokenizers, the user / item dense tokens,
  the request hour and day of week, the endogenous-decoupling branches, the dense cross token
  and the SE gate -> ``[B, N_ns, D]``, in the order
  ``[user NS][user dense][item NS][item dense][dense cross]``.
* ``SequenceTokens`` (model_spec §4): per-domain sequence tokenizers plus the shared per-event
  time embeddings (time bucket, hour, day of week) -> one ``BucketedSeq`` per domain, built
  per length bucket (``modules.RowBuckets``).

Both read the batch only through ``pcvr.batch.Batch``'s fields.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcvr.batch import HISTORY_FIELDS, SEQ_FIELDS, Batch, SeqBatch
from pcvr.config import DecouplingConfig, ModelConfig, parse_int_list
from pcvr.model.decoupling import DecoupledOutput, EntityDecoupler
from pcvr.model.modules import BucketedSeq, NSTokenSEGate, RowBuckets
from pcvr.model.outputs import AuxLoss
from pcvr.model.tokens import (DenseCrossToken, DenseToken, GroupNSTokenizer, NSFeatureEmbedding,
                               PairModeUserDenseToken, RankMixerNSTokenizer, SequenceTokenizer,
                               has_table)
from pcvr.schema import NUM_TIME_BUCKETS, PAIR_FIDS, FeatureLayout, FeatureSpec

# Most length buckets per domain and batch (the cost model of RowBuckets picks how many).
MAX_SEQ_BUCKETS = 8
DENSE_CROSS_SOURCES = ("user_dense", "item_dense", "item_ns")
# The item tokenizer's randomized split uses this offset on the seed (model_spec §9.4).
ITEM_SPLIT_SEED_OFFSET = 100003
NSGroups = Mapping[str, Any]


# ----------------------------------------------------------------------------- NS groups

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


def _ns_tokenizer(cfg: ModelConfig, embedding: NSFeatureEmbedding, groups: List[List[int]],
                  num_tokens: int, seed_offset: int) -> nn.Module:
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


def _pair_dense(layout: FeatureLayout) -> Dict[int, FeatureSpec]:
    """Pair fid -> its user dense spec; every fid of ``PAIR_FIDS`` must be paired."""
    pairs = {i.fid: dense for i, dense in layout.pairs}
    missing = [fid for fid in PAIR_FIDS if fid not in pairs]
    if missing:
        raise KeyError(f"use_pair_62_66: fid(s) {missing} are not declared in both user_int "
                       f"and user_dense of the schema (with the same dim)")
    return pairs


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
        self.register_buffer("atom_index",
                             torch.tensor([embedding.index_of(f) for f in atom_fids]),
                             persistent=False)
        self.register_buffer("side_index",
                             torch.tensor([embedding.index_of(f) for f in side_fids]),
                             persistent=False)
        self.decoupler = EntityDecoupler(len(atom_fids) * e, len(side_fids) * e,
                                         dcfg.decouple_dim, dcfg)
        self.proj = nn.Linear(2 * dcfg.decouple_dim, d_model)

    def forward(self, emb: torch.Tensor) -> Tuple[torch.Tensor, DecoupledOutput]:
        out = self.decoupler(emb.index_select(1, self.atom_index).flatten(1),
                             emb.index_select(1, self.side_index).flatten(1))
        return self.proj(torch.cat([out.atom, out.side], dim=-1)).unsqueeze(1), out


# ----------------------------------------------------------------------------- NS tokens

class NSTokens(nn.Module):
    """A batch's non-sequence features -> NS tokens (model_spec §3, §9).

    Args:
        layout: the feature layout.
        cfg: architecture flags.
        dcfg: endogenous-decoupling settings (read when ``dcfg.use_endogenous_decoupling``).
        ns_groups: parsed ns_groups.json (``user_ns_groups`` / ``item_ns_groups``: name ->
            fids), or None / empty for one group per feature.
        user_time_missing_as_padding: the request hour/day ids are shifted by one with
            0 = missing: the user hour/day tables get 25/8 rows with padding row 0.

    Attributes:
        num_tokens: ``N_ns``.
        item_span: ``(start, end)`` of the item NS tokens in the output.

    Shape: ``Batch`` -> (``[B, N_ns, D]``, aux losses, sample weight ``[B]`` or None).
    """

    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, dcfg: DecouplingConfig,
                 ns_groups: Optional[NSGroups], user_time_missing_as_padding: bool):
        super().__init__()
        d, e, skip = cfg.d_model, cfg.emb_dim, cfg.emb_skip_threshold
        groups = ns_groups or {}
        pair_dense = _pair_dense(layout) if cfg.use_pair_62_66 else None
        self.user_tokenizer = _ns_tokenizer(
            cfg, NSFeatureEmbedding(layout.user_int, e, skip, pair_dense, cfg.pair_pooling,
                                    cfg.emb_min_count),
            resolve_groups(groups.get("user_ns_groups"), layout.user_int, "user"),
            cfg.user_ns_tokens, 0)
        self.item_tokenizer = _ns_tokenizer(
            cfg, NSFeatureEmbedding(layout.item_int, e, skip, min_count=cfg.emb_min_count),
            resolve_groups(groups.get("item_ns_groups"), layout.item_int, "item"),
            cfg.item_ns_tokens, ITEM_SPLIT_SEED_OFFSET)
        n_user, n_item = self.user_tokenizer.num_tokens, self.item_tokenizer.num_tokens

        self.user_dense_token: Optional[nn.Module] = None
        if cfg.use_pair_62_66:
            self.user_dense_token = PairModeUserDenseToken(layout.user_dense, d)
        elif layout.user_dense:
            self.user_dense_token = DenseToken(layout.user_dense, d)
        self.item_dense_token = DenseToken(layout.item_dense, d) if layout.item_dense else None

        # Request hour / day of week (§9.1), added to every user NS token.
        self.use_abs_time = cfg.use_abs_time_emb
        self.add_user_time_to_dense = cfg.use_abs_time_emb and cfg.add_user_time_to_dense_tok
        if self.use_abs_time:
            pad = 0 if user_time_missing_as_padding else None
            shift = 1 if user_time_missing_as_padding else 0
            self.user_hour_emb = nn.Embedding(24 + shift, d, padding_idx=pad)
            self.user_dow_emb = nn.Embedding(7 + shift, d, padding_idx=pad)

        self.item_decoupling: Optional[DecouplingBranch] = None
        self.user_decoupling: Optional[DecouplingBranch] = None
        self.decouple_loss_weight = dcfg.decouple_loss_weight
        if dcfg.use_endogenous_decoupling:
            self.item_decoupling = DecouplingBranch(
                self.item_tokenizer.embedding, parse_int_list(dcfg.decouple_item_atom_fids),
                parse_int_list(dcfg.decouple_item_side_fids), skip, d, dcfg, "item")
            if dcfg.decouple_user:
                self.user_decoupling = DecouplingBranch(
                    self.user_tokenizer.embedding, parse_int_list(dcfg.decouple_user_atom_fids),
                    parse_int_list(dcfg.decouple_user_side_fids), skip, d, dcfg, "user")

        self.dense_cross_token = (_dense_cross(cfg, layout, n_item)
                                  if cfg.use_dense_cross_token else None)
        self.dense_cross_source = cfg.dense_cross_item_source
        item_start = n_user + int(self.user_dense_token is not None)
        self.item_span = (item_start, item_start + n_item)
        self.num_tokens = (self.item_span[1] + int(self.item_dense_token is not None)
                           + int(self.dense_cross_token is not None))
        self.se_gate = NSTokenSEGate(self.num_tokens, d) if cfg.use_ns_se_gate else None

    def time_tables(self) -> List[nn.Embedding]:
        """The request hour and day-of-week tables (empty without absolute time)."""
        return [self.user_hour_emb, self.user_dow_emb] if self.use_abs_time else []

    def _decouple(self, branch: Optional[DecouplingBranch], emb: torch.Tensor,
                  tokens: torch.Tensor, side: str, aux: Dict[str, AuxLoss]
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Adds the branch's addend to ``tokens`` and its losses to ``aux``; returns the
        tokens and the branch's sample weight."""
        if branch is None:
            return tokens, None
        add, out = branch(emb)
        aux.update({f"{side}/{k}": AuxLoss(v, self.decouple_loss_weight)
                    for k, v in out.losses.items()})
        return tokens + add, out.sample_weight

    def embed(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """The user and item fids' pooled ``E``-vectors, ``[B, n_user_fids, E]`` and
        ``[B, n_item_fids, E]`` (schema order)."""
        return (self.user_tokenizer.embedding(batch.user_int, batch.user_dense),
                self.item_tokenizer.embedding(batch.item_int))

    def forward(self, batch: Batch,
                emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                ) -> Tuple[torch.Tensor, Dict[str, AuxLoss], Optional[torch.Tensor]]:
        """``emb``: ``embed(batch)`` when the caller needs it too (computed here otherwise)."""
        user_emb, item_emb = emb if emb is not None else self.embed(batch)
        user, item = self.user_tokenizer(user_emb), self.item_tokenizer(item_emb)
        aux: Dict[str, AuxLoss] = {}
        item, sample_weight = self._decouple(self.item_decoupling, item_emb, item, "item", aux)
        user, _ = self._decouple(self.user_decoupling, user_emb, user, "user", aux)

        user_time = None
        if self.use_abs_time:
            user_time = self.user_hour_emb(batch.hour) + self.user_dow_emb(batch.dayofweek)
            user = user + user_time.unsqueeze(1)
        tokens = [user]
        if self.user_dense_token is not None:
            dense = self.user_dense_token(batch.user_dense)
            if self.add_user_time_to_dense:
                dense = dense + user_time
            tokens.append(dense.unsqueeze(1))
        tokens.append(item)
        if self.item_dense_token is not None:
            tokens.append(self.item_dense_token(batch.item_dense).unsqueeze(1))
        if self.dense_cross_token is not None:
            source = self.dense_cross_source
            item_in = (item.mean(dim=1) if source == "item_ns" else
                       batch.user_dense if source == "user_dense" else batch.item_dense)
            tokens.append(self.dense_cross_token(batch.user_dense, item_in).unsqueeze(1))
        ns = torch.cat(tokens, dim=1)
        if self.se_gate is not None:
            ns = self.se_gate(ns)
        return ns, aux, sample_weight


# ----------------------------------------------------------------------------- sequences

class SequenceTokens(nn.Module):
    """A batch's histories -> per-domain tokens with per-event time embeddings (§4).

    Args:
        layout: the feature layout.
        cfg: architecture flags.

    Attributes:
        max_seq_buckets: the most length buckets per domain (``modules.RowBuckets``; 1 =
            only trim every domain to its longest row). Outputs do not depend on it.

    Shape: ``Batch`` -> ``S x BucketedSeq`` (domain order of the layout).
    """

    def __init__(self, layout: FeatureLayout, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.tokenizers = nn.ModuleDict({
            dom.name: SequenceTokenizer(dom, cfg.emb_dim, d, cfg.emb_skip_threshold,
                                        cfg.seq_id_threshold, 2 * cfg.dropout_rate,
                                        cfg.emb_min_count)
            for dom in layout.seq})
        self.time_bucket_emb = (nn.Embedding(NUM_TIME_BUCKETS, d, padding_idx=0)
                                if cfg.use_time_buckets else None)
        self.use_abs_time = cfg.use_abs_time_emb
        if self.use_abs_time:
            self.hour_emb = nn.Embedding(25, d, padding_idx=0)
            self.dow_emb = nn.Embedding(8, d, padding_idx=0)
        self.max_seq_buckets = MAX_SEQ_BUCKETS
        self.max_lens = {dom.name: dom.max_len for dom in layout.seq}

    def _time_tables(self) -> List[Tuple[nn.Embedding, str]]:
        """(table, SeqBatch field) of the per-event time embeddings."""
        out = [(self.time_bucket_emb, "time_bucket")] if self.time_bucket_emb is not None else []
        if self.use_abs_time:
            out += [(self.hour_emb, "hour"), (self.dow_emb, "dayofweek")]
        return out

    def pad_batch(self, batch: Batch, multiple: int) -> Batch:
        """``batch`` with every domain's history length ``L_d`` padded up to a multiple of
        ``multiple``, at most the domain's ``max_len`` (``multiple >= max_len`` pads to
        ``max_len``: one shape). Padding ids are 0, which every reader masks, so outputs
        are unchanged; a compiled model then sees a few shapes instead of one per batch."""
        seq = {}
        for name, s in batch.seq.items():
            length, cap = s.ids.shape[-1], self.max_lens[name]
            target = min(cap, -(-length // multiple) * multiple) if multiple > 0 else length
            if target <= length:
                seq[name] = s
                continue
            seq[name] = SeqBatch(
                *(F.pad(getattr(s, f), (0, target - length)) if f in HISTORY_FIELDS
                  else getattr(s, f) for f in SEQ_FIELDS))
        return dataclasses.replace(batch, seq=seq)

    def forward(self, batch: Batch) -> List[BucketedSeq]:
        seqs = []
        for name, tokenizer in self.tokenizers.items():
            s = batch.seq[name]
            buckets = RowBuckets(s.lens, s.ids.shape[2], self.max_seq_buckets)
            tokens = [tokenizer(ids) for ids in buckets.split(s.ids, seq_dim=2)]
            # Per-event time embeddings; padding ids are 0 (zero rows), so padding adds nothing.
            for table, field in self._time_tables():
                tokens = [x + table(ids) for x, ids
                          in zip(tokens, buckets.split(getattr(s, field), seq_dim=1))]
            seqs.append(BucketedSeq(buckets, tokens, buckets.split(s.lens)))
        return seqs
