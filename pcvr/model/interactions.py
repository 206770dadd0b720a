"""Explicit interactions between the NS features, read out as an additive logit path.

The backbone sees the user and item NS tokens side by side, and any product between them
(user segment x item category, user taste x item vector, the engagement value a user's list
pairs with the target's type) has to be built by its MLPs, which one pass over the data does
poorly (README "Demo quality": such effects were captured at 0.17-0.37). These modules build
the products explicitly and add their read-out to the logits (a wide-and-deep style side
path; zero at initialisation, so a model starts as the backbone alone):

* ``PairTargetAttention`` (``--use_pair_target_attn``): per paired list (user int + user
  dense fids 62-66) and head, every element's id is matched against the target item:
  ``g_p = sigmoid(<q(item), k(id_p)> / sqrt(d) + b)``, and the list gives ``sum_p g_p w_p``
  (``w_p = sqrt(log1p(value_p))``, the pair pooling's weight) and ``sum_p g_p`` (how much of
  the list matched at all). A lookup by the target, which a pooled list cannot express: the
  pooled vector is the same whatever item is scored.
* ``TokenDotInteraction`` (``--use_ns_dot_interaction``): every NS token is projected per
  head to ``ns_dot_dim`` and the dot product of every pair of tokens is a feature (DLRM / FM
  style): a rank-``ns_dot_dim`` bilinear form between any user and any item token.
* ``InteractionHead``: the concatenated features -> ``LN -> Lin -> SiLU -> Lin`` -> a logit
  addend ``[B, action_num]``, last layer zero-initialised.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcvr.batch import Batch
from pcvr.config import ModelConfig
from pcvr.model.tokens import make_table
from pcvr.schema import FeatureLayout, FeatureSpec


class PairTargetAttention(nn.Module):
    """Target-aware read-out of the paired (id, value) lists.

    Args:
        pairs: (user int spec, user dense spec) of every paired fid (``FeatureLayout.pairs``).
        target_dim: width of the target vector (the flattened item NS tokens).
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


class TokenDotInteraction(nn.Module):
    """Pairwise dot products of per-token projections of the NS tokens.

    Token ``t`` is projected by its own ``[D, H * k]`` matrix; for every head and every pair
    ``t < u`` the feature is ``<z_t, z_u> / sqrt(k)``.

    Shape: ``[B, N, D] -> [B, H * N (N - 1) / 2]``.
    """

    def __init__(self, num_tokens: int, d_model: int, num_heads: int, dim: int):
        super().__init__()
        if num_tokens < 2:
            raise ValueError("use_ns_dot_interaction needs at least two NS tokens")
        if num_heads < 1 or dim < 1:
            raise ValueError(f"ns_dot_heads and ns_dot_dim must be >= 1, got {num_heads}, "
                             f"{dim}")
        self.num_heads, self.dim = num_heads, dim
        self.weight = nn.Parameter(torch.empty(num_tokens, d_model, num_heads * dim))
        nn.init.normal_(self.weight, std=d_model ** -0.5)
        rows, cols = torch.triu_indices(num_tokens, num_tokens, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.num_features = num_heads * rows.numel()

    def forward(self, ns: torch.Tensor) -> torch.Tensor:
        b, n, _ = ns.shape
        z = torch.einsum("bnd,ndk->bnk", ns, self.weight).view(b, n, self.num_heads, self.dim)
        z = z.transpose(1, 2)                                                  # [B, H, N, k]
        dots = z @ z.transpose(-1, -2) / math.sqrt(self.dim)                   # [B, H, N, N]
        return dots[:, :, self.rows, self.cols].flatten(1)


class InteractionHead(nn.Module):
    """The explicit interactions of a model and their logit read-out.

    Args:
        pair_attention: a ``PairTargetAttention`` or None.
        token_dot: a ``TokenDotInteraction`` or None.
        item_span: ``(start, end)`` of the item NS tokens (the pair attention's target).
        d_model: ``D`` (hidden width of the read-out).
        action_num: logits.

    Shape: ``Batch``, ns ``[B, N_ns, D]`` -> ``[B, action_num]``.
    """

    def __init__(self, pair_attention: Optional[PairTargetAttention],
                 token_dot: Optional[TokenDotInteraction], item_span: Tuple[int, int],
                 d_model: int, action_num: int):
        super().__init__()
        if pair_attention is None and token_dot is None:
            raise ValueError("InteractionHead needs at least one interaction")
        self.pair_attention, self.token_dot, self.item_span = pair_attention, token_dot, item_span
        width = sum(m.num_features for m in (pair_attention, token_dot) if m is not None)
        self.readout = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d_model), nn.SiLU(),
                                     nn.Linear(d_model, action_num))
        nn.init.zeros_(self.readout[-1].weight)
        nn.init.zeros_(self.readout[-1].bias)

    def forward(self, batch: Batch, ns: torch.Tensor) -> torch.Tensor:
        feats = []
        if self.pair_attention is not None:
            target = ns[:, self.item_span[0]:self.item_span[1]].flatten(1)
            feats.append(self.pair_attention(batch.user_int, batch.user_dense, target))
        if self.token_dot is not None:
            feats.append(self.token_dot(ns))
        return self.readout(torch.cat(feats, dim=-1))


def build_interaction_head(cfg: ModelConfig, layout: FeatureLayout,
                           item_span: Tuple[int, int], num_ns: int) -> Optional[InteractionHead]:
    """The model's ``InteractionHead`` for ``cfg``, or None when every interaction is off."""
    pair = token_dot = None
    if cfg.use_pair_target_attn:
        if item_span[0] == item_span[1]:
            raise ValueError("use_pair_target_attn needs at least one item NS token")
        heads = cfg.pair_attn_heads
        pair = PairTargetAttention(layout.pairs, (item_span[1] - item_span[0]) * cfg.d_model,
                                   cfg.emb_dim, heads, max(1, cfg.d_model // max(heads, 1)))
    if cfg.use_ns_dot_interaction:
        token_dot = TokenDotInteraction(num_ns, cfg.d_model, cfg.ns_dot_heads, cfg.ns_dot_dim)
    if pair is None and token_dot is None:
        return None
    return InteractionHead(pair, token_dot, item_span, cfg.d_model, cfg.action_num)
