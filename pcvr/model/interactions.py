"""Explicit user x item interactions, read out as an additive logit path.

The backbone sees the user and item NS tokens side by side, and a product between a user
feature and an item feature (user segment x item category, user taste x item vector, the
engagement value a user's list pairs with the target's type) has to be built by its MLPs
from tokens in which each feature is mixed with a dozen others; one pass over the data does
that poorly (README "Demo quality": such effects were captured at 0.17-0.37). These modules
build the products explicitly from the per-feature embeddings and add their read-out to the
logits (a wide-and-deep style side path, zero at initialisation, so a model starts as the
backbone alone):

* ``FieldCross`` (``--use_field_cross``): every user field (each user int fid's pooled
  ``E``-vector, each user dense field) and every item field is projected per head to
  ``field_cross_dim``; the dot product of every (user field, item field) pair is a feature
  and a linear layer weighs them (field-weighted factorisation machine): a learned
  bilinear form between any user and any item feature. With ``--use_pair_62_66`` a paired
  list's field is ``sum_p w_p e(id_p)`` (the pair pooling), so its product with the target's
  type field is ``sum_p w_p <e(id_p), e(type)>``: the value of the matching element, once the
  embeddings make ``<e(id), e(type)>`` a match indicator.
* ``HistoryFields`` (``--use_history_fields``, with the field cross): each side feature of
  each history domain becomes one more user field, the mean of its embeddings over the
  row's kept events (own tables of width ``history_field_dim``; ids above
  ``HISTORY_ROWS`` rows hashed into them). Its product with the target's category field is
  ``mean_l <e(c_l), e(c)>``: the share of the history in the target's category, once the
  embeddings make the product a match indicator (a target-aware read of the history that
  the query-based sequence path learns slowly).
* ``PairTargetAttention`` (``--use_pair_target_attn``): per paired list and head, each
  element's id is matched against the target item, ``g_p = sigmoid(<q(item), k(id_p)> /
  sqrt(d) + b)``, and the list gives ``sum_p g_p w_p`` and ``sum_p g_p`` (a soft lookup by
  the target; the query reads the item fields' embeddings).
* ``InteractionHead``: the modules on, their logit addends summed.

The embeddings are those of the NS tokenizers (``NSTokens``), looked up again here, so the
tables learn from both paths.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcvr.batch import Batch
from pcvr.config import ModelConfig
from pcvr.model.tokens import (DENSE_GRAD_MAX_ROWS, column_index, init_table_, make_table,
                               signed_log1p)
from pcvr.schema import ACTIVITY, PAIRED, FeatureLayout, FeatureSpec


class DenseFields(nn.Module):
    """Dense feature groups -> one ``E``-vector each: ``Lin(signed_log1p(x))``.

    Args:
        groups: the dense features of each field (the activity fids form one field).
        emb_dim: ``E``.

    Shape: dense ``[B, dense_dim]`` -> ``[B, len(groups), E]``.
    """

    def __init__(self, groups: Sequence[Sequence[FeatureSpec]], emb_dim: int):
        super().__init__()
        for k, g in enumerate(groups):
            self.register_buffer(f"cols{k}", column_index(g), persistent=False)
        self.proj = nn.ModuleList(nn.Linear(sum(s.length for s in g), emb_dim) for g in groups)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return torch.stack([p(signed_log1p(dense.index_select(1, getattr(self, f"cols{k}"))))
                            for k, p in enumerate(self.proj)], dim=1)


def dense_field_groups(specs: Sequence[FeatureSpec], skip_paired: bool
                       ) -> List[List[FeatureSpec]]:
    """One field per dense fid, the activity fids together; paired fids left out when they
    weight the int pooling instead."""
    groups = [[s] for s in specs if s.kind != ACTIVITY and not (skip_paired and s.kind == PAIRED)]
    activity = [s for s in specs if s.kind == ACTIVITY]
    return groups + ([activity] if activity else [])


# Rows of a history-field table; larger vocabularies are hashed into this many.
HISTORY_ROWS = 16384


class HistoryFields(nn.Module):
    """Each side feature of each history domain -> the mean of its embeddings over the kept
    events (``F.embedding_bag`` mean over the non-padding ids; an empty history gives 0).

    Ids of a vocabulary above ``HISTORY_ROWS`` rows are folded into them
    (``(id - 1) % (HISTORY_ROWS - 1) + 1``), so a table never has more than
    ``HISTORY_ROWS`` rows.

    Args:
        layout: the feature layout (its sequence domains).
        dim: embedding width.

    Shape: ``Batch`` -> ``[B, n_fields, dim]`` (domains in layout order, features in schema
        order).
    """

    def __init__(self, layout: FeatureLayout, dim: int):
        super().__init__()
        if dim < 1:
            raise ValueError(f"history_field_dim must be >= 1, got {dim}")
        self.fields: List[Tuple[str, int, int]] = []  # (domain, F-axis index, vocab)
        tables = {}
        for dom in layout.seq:
            for spec in dom.side:
                if spec.vocab_size <= 0:
                    continue
                rows = min(spec.vocab_size + 1, HISTORY_ROWS)
                table = nn.Embedding(rows, dim, padding_idx=0,
                                     sparse=rows > DENSE_GRAD_MAX_ROWS)
                init_table_(table)
                tables[f"{dom.name}_{spec.fid}"] = table
                self.fields.append((dom.name, spec.offset, rows))
        if not tables:
            raise ValueError("use_history_fields: the schema's histories have no id feature")
        self.tables = nn.ModuleDict(tables)

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    def forward(self, batch: Batch) -> torch.Tensor:
        out = []
        for (name, index, rows), table in zip(self.fields, self.tables.values()):
            x = batch.seq[name].ids[:, index].long()
            if rows == HISTORY_ROWS:  # folded vocabulary (ids stay > 0, padding stays 0)
                x = torch.where(x > 0, (x - 1) % (HISTORY_ROWS - 1) + 1, x)
            out.append(F.embedding_bag(x, table.weight, mode="mean", padding_idx=0,
                                       sparse=table.sparse))
        return torch.stack(out, dim=1)


class FieldCross(nn.Module):
    """Field-weighted user x item dot products.

    Args:
        num_user: user fields (int fids + dense fields).
        num_item: item fields.
        emb_dim: ``E``.
        num_heads: projections per field (``H``).
        dim: width of each projection (``k``).
        action_num: logits.

    Shape: user ``[B, U, E]``, item ``[B, I, E]`` -> ``[B, action_num]``.
    """

    def __init__(self, num_user: int, num_item: int, emb_dim: int, num_heads: int, dim: int,
                 action_num: int, num_history: int = 0, history_dim: int = 0):
        super().__init__()
        if num_user < 1 or num_item < 1:
            raise ValueError("use_field_cross needs user and item fields")
        if num_heads < 1 or dim < 1:
            raise ValueError(f"field_cross_heads and field_cross_dim must be >= 1, got "
                             f"{num_heads}, {dim}")
        self.num_heads, self.dim = num_heads, dim
        self.user_proj = nn.Parameter(torch.randn(num_user, emb_dim, num_heads * dim)
                                      * emb_dim ** -0.5)
        self.item_proj = nn.Parameter(torch.randn(num_item, emb_dim, num_heads * dim)
                                      * emb_dim ** -0.5)
        # history fields (their own width) are user fields too
        self.history_proj = (nn.Parameter(torch.randn(num_history, history_dim,
                                                      num_heads * dim) * history_dim ** -0.5)
                             if num_history else None)
        self.readout = nn.Linear((num_user + num_history) * num_item * num_heads, action_num)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    def forward(self, user: torch.Tensor, item: torch.Tensor,
                history: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, h, k = user.shape[0], self.num_heads, self.dim
        zu = torch.einsum("bue,uek->buk", user, self.user_proj)
        if self.history_proj is not None:
            zh = torch.einsum("bue,uek->buk", history.to(zu.dtype), self.history_proj)
            zu = torch.cat([zu, zh], dim=1)
        zu = zu.view(b, -1, h, k)
        zi = torch.einsum("bie,iek->bik", item, self.item_proj).view(b, -1, h, k)
        dots = torch.einsum("buhk,bihk->buih", zu, zi) / math.sqrt(k)
        return self.readout(dots.flatten(1))


class PairTargetAttention(nn.Module):
    """Target-aware read-out of the paired (id, value) lists.

    Args:
        pairs: (user int spec, user dense spec) of every paired fid (``FeatureLayout.pairs``).
        target_dim: width of the target vector (the item fields' embeddings, flattened).
        emb_dim: width of the list-id tables (own tables, ``vocab_size + 1`` rows, padding 0).
        num_heads: match heads per list.
        head_dim: width of a head's query and key.

    Shape: user_int ``[B, *]``, user_dense ``[B, *]``, target ``[B, target_dim]`` ->
        ``[B, 2 * num_heads * len(pairs)]``.
    """

    def __init__(self, pairs: Sequence[Tuple[FeatureSpec, FeatureSpec]], target_dim: int,
                 emb_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        if not pairs:
            raise ValueError("use_pair_target_attn needs paired fids (62-66 in both user_int "
                             "and user_dense)")
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"pair_attn_heads and the head width must be >= 1, got "
                             f"{num_heads}, {head_dim}")
        self.slices: List[Tuple[int, int, int]] = [(i.offset, d.offset, i.length)
                                                   for i, d in pairs]
        self.num_heads, self.head_dim = num_heads, head_dim
        self.tables = nn.ModuleList(make_table(i.vocab_size, emb_dim) for i, _ in pairs)
        width = num_heads * head_dim
        self.query = nn.Linear(target_dim, len(pairs) * width)
        self.keys = nn.ModuleList(nn.Linear(emb_dim, width) for _ in pairs)
        self.bias = nn.Parameter(torch.full((len(pairs), num_heads), -2.0))
        self.num_features = 2 * num_heads * len(pairs)

    def forward(self, user_int: torch.Tensor, user_dense: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        b, h, d = target.shape[0], self.num_heads, self.head_dim
        queries = self.query(target).view(b, len(self.slices), h, d)
        out = []
        for k, ((i_off, d_off, n), table, key) in enumerate(
                zip(self.slices, self.tables, self.keys)):
            ids = user_int[:, i_off:i_off + n].long()
            valid = (ids != 0).to(target.dtype)                                # [B, n]
            w = torch.sqrt(torch.log1p(user_dense[:, d_off:d_off + n].float().clamp_min(0.0)))
            w = w.to(target.dtype) * valid
            keys = key(table(ids)).view(b, n, h, d)                            # [B, n, H, d]
            score = torch.einsum("bhd,bnhd->bhn", queries[:, k], keys) / math.sqrt(d)
            gate = torch.sigmoid(score + self.bias[k].view(1, h, 1)) * valid.unsqueeze(1)
            out.append(torch.einsum("bhn,bn->bh", gate, w))
            out.append(gate.sum(dim=-1))
        return torch.cat(out, dim=-1)


class InteractionHead(nn.Module):
    """The explicit interactions of a model and their logit addend.

    Args:
        layout: the feature layout.
        cfg: architecture flags (``use_field_cross``, ``use_pair_target_attn`` and theirs).

    Shape: ``Batch``, user field embeddings ``[B, U_int, E]``, item field embeddings
        ``[B, I_int, E]`` (the NS tokenizers' ``NSFeatureEmbedding`` outputs) ->
        ``[B, action_num]``.
    """

    def __init__(self, layout: FeatureLayout, cfg: ModelConfig):
        super().__init__()
        e = cfg.emb_dim
        self.user_dense: Optional[DenseFields] = None
        self.item_dense: Optional[DenseFields] = None
        self.field_cross: Optional[FieldCross] = None
        self.history: Optional[HistoryFields] = None
        self.pair_attention: Optional[PairTargetAttention] = None
        self.pair_readout: Optional[nn.Sequential] = None
        if cfg.use_field_cross:
            user_groups = dense_field_groups(layout.user_dense, cfg.use_pair_62_66)
            item_groups = dense_field_groups(layout.item_dense, False)
            self.user_dense = DenseFields(user_groups, e) if user_groups else None
            self.item_dense = DenseFields(item_groups, e) if item_groups else None
            self.history = (HistoryFields(layout, cfg.history_field_dim)
                            if cfg.use_history_fields else None)
            self.field_cross = FieldCross(len(layout.user_int) + len(user_groups),
                                          len(layout.item_int) + len(item_groups), e,
                                          cfg.field_cross_heads, cfg.field_cross_dim,
                                          cfg.action_num,
                                          self.history.num_fields if self.history else 0,
                                          cfg.history_field_dim)
        if cfg.use_pair_target_attn:
            heads = cfg.pair_attn_heads
            self.pair_attention = PairTargetAttention(
                layout.pairs, len(layout.item_int) * e, e, heads,
                max(1, cfg.d_model // max(heads, 1)))
            width = self.pair_attention.num_features
            self.pair_readout = nn.Sequential(nn.Linear(width, cfg.d_model), nn.SiLU(),
                                              nn.Linear(cfg.d_model, cfg.action_num))
            nn.init.zeros_(self.pair_readout[-1].weight)
            nn.init.zeros_(self.pair_readout[-1].bias)
        if self.field_cross is None and self.pair_attention is None:
            raise ValueError("InteractionHead needs at least one interaction")

    def forward(self, batch: Batch, user_emb: torch.Tensor, item_emb: torch.Tensor
                ) -> torch.Tensor:
        out = 0.0
        if self.field_cross is not None:
            user, item = [user_emb], [item_emb]
            if self.user_dense is not None:
                user.append(self.user_dense(batch.user_dense).to(user_emb.dtype))
            if self.item_dense is not None:
                item.append(self.item_dense(batch.item_dense).to(item_emb.dtype))
            history = self.history(batch) if self.history is not None else None
            out = out + self.field_cross(torch.cat(user, dim=1), torch.cat(item, dim=1),
                                         history)
        if self.pair_attention is not None:
            feats = self.pair_attention(batch.user_int, batch.user_dense, item_emb.flatten(1))
            out = out + self.pair_readout(feats)
        return out


def build_interaction_head(cfg: ModelConfig, layout: FeatureLayout
                           ) -> Optional[InteractionHead]:
    """The model's ``InteractionHead`` for ``cfg``, or None when every interaction is off."""
    if cfg.use_history_fields and not cfg.use_field_cross:
        raise ValueError("use_history_fields adds fields to --use_field_cross; turn it on")
    if not (cfg.use_field_cross or cfg.use_pair_target_attn):
        return None
    return InteractionHead(layout, cfg)
