"""Token-level building blocks of the PCVR HyFormer (model_spec §5-§9).

Conventions: ``B`` batch, ``L`` sequence length, ``D`` width, ``H`` heads, ``T`` tokens.
Sequences are newest first and left-aligned: position 0 is the most recent event and the
valid tokens of a row are positions ``0 .. len-1``.

Attention runs only through ``F.scaled_dot_product_attention`` with a compact boolean key
mask ``[B, 1, 1, Lk]`` (never an expanded ``[B, H, Lq, Lk]`` one). Two deliberate deviations
from the reference, both for speed:

* no dropout *inside* SDPA (a non-zero ``dropout_p`` forces the slow math kernel on CPU);
  the residual branch of every attention is dropped out instead, as an FFN's output is;
* an empty row (``len == 0``) keeps key 0 visible, so no row is ever fully masked (NaN-free
  outputs and gradients without any host sync); where such a row is read (cross-attention,
  pooling) its result is zeroed with ``len > 0``, which is what the reference gets from its
  fully masked rows.
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def valid_mask(lens: torch.Tensor, length: int) -> torch.Tensor:
    """``[B]`` lengths -> ``[B, length]`` bool, True at valid positions ``0 .. len-1``."""
    return torch.arange(length, device=lens.device) < lens.unsqueeze(1)


def attention_key_mask(lens: torch.Tensor, length: int) -> torch.Tensor:
    """``[B]`` lengths -> ``[B, 1, 1, length]`` bool "may attend" mask for SDPA.

    Key 0 stays visible in empty rows so that no row is fully masked (see module docstring).
    """
    return valid_mask(lens.clamp_min(1), length)[:, None, None, :]


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, L, D]`` over the valid positions of ``valid [B, L]`` -> ``[B, D]``.

    The denominator is clamped to 1, so an empty row gives zeros.
    """
    w = valid.to(x.dtype).unsqueeze(1)  # [B, 1, L]
    return (w @ x).squeeze(1) / w.sum(-1).clamp_min(1.0)


class _DropPositions(torch.autograd.Function):
    """``x * scale`` with the flat positions ``index`` zeroed; backward masks the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, scale: float) -> torch.Tensor:
        out = x.contiguous() * scale
        out.view(-1).index_fill_(0, index, 0.0)
        ctx.save_for_backward(index)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        grad = grad.contiguous() * ctx.scale
        grad.view(-1).index_fill_(0, index, 0.0)
        return grad, None, None


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training path draws only the dropped positions (same law).

    ``F.dropout`` on CPU draws one Bernoulli number per element, serially: ~16% of a training
    step at ``p = 0.01``. Here ``K ~ Poisson(lam)`` uniform positions are drawn (with
    replacement) and zeroed: by Poisson splitting each position is hit ``Poisson(lam / n)``
    times, independently, so with ``lam = -n log(1 - p)`` every element is dropped
    independently with probability exactly ``p``, as in ``F.dropout``; kept ones are scaled
    by ``1 / (1 - p)``. Only the ``~p n`` drawn indices are saved for backward. Other devices
    use ``F.dropout`` (``K`` is needed on the host, a sync on CUDA), as do ``p = 1``,
    ``inplace`` and code being compiled by ``torch.compile`` (``K`` is a data-dependent size;
    inductor fuses ``F.dropout``'s draws into its generated kernels instead).

    Shape: any -> the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.p == 0.0 or self.p >= 1.0 or self.inplace
                or x.device.type != "cpu" or torch.compiler.is_compiling()):
            return super().forward(x)
        n = x.numel()
        lam = torch.tensor(-n * math.log1p(-self.p), dtype=torch.float64)
        index = torch.randint(n, (int(torch.poisson(lam).item()),))
        return _DropPositions.apply(x, index, 1.0 / (1.0 - self.p))


def feed_forward(d_model: int, hidden: int, dropout: float) -> nn.Sequential:
    """``Lin(D -> hidden) -> GELU -> Dropout -> Lin(hidden -> D)``, ``[*, D] -> [*, D]``."""
    return nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), Dropout(dropout),
                         nn.Linear(hidden, d_model))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: Optional[torch.Tensor]) -> torch.Tensor:
    """SDPA ``[B, H, Lq, dh] x [B, H, Lk, dh] -> [B, H, Lq, dh]``, in float32 on CPU.

    On CPU the bf16 SDPA kernel is slower than the float32 one, its backward 1.4x (L 512)
    to 10x (L 64) (dh 16, one thread), far more than the casts cost, so under autocast the
    CPU path computes in float32 and returns the input dtype.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------- length buckets

# Cost of one length bucket for RowBuckets, in units of one attention score:
# rows * (len^2 + BUCKET_LINEAR * len) + BUCKET_OVERHEAD. Fitted to the fwd+bwd CPU time of a
# transformer encoder + query cross-attention (D 64, bf16 autocast, one thread): ~9 ns per
# score, ~6 us per token, ~1.5 ms of per-call overhead per bucket and block (tokenizer included).
BUCKET_LINEAR = 660.0
BUCKET_OVERHEAD = 2e5
# oneDNN compiles (and caches, LRU) a kernel per matmul shape, ~1 ms per new shape, so bucket
# shapes come from a small set: row counts are multiples of ROW_QUANTUM (but the last bucket's)
# and lengths multiples of LEN_QUANTUM (or L). Measured: free bucket shapes cost ~0.3 s/step.
ROW_QUANTUM = 8
LEN_QUANTUM = 32


class RowBuckets:
    """Groups a batch's rows by sequence length, so that each group runs on a trimmed prefix.

    Sequences are left-aligned and every reader masks padded positions, so a row's outputs at
    its valid positions depend only on its positions ``0 .. len-1``. A group of rows can thus
    run on a prefix ``0 .. L_j - 1`` covering its longest row (at least 1) with the
    same valid-position results, for ~``(L_j / L)^2`` of the attention and ``L_j / L`` of the
    token-wise work; positions past ``L_j`` (padding of every row of the group) are never
    computed. Rows are sorted by length and cut into at most ``max_buckets`` runs by a small DP
    over the cost model above, so a cut is made only where trimming saves more than a bucket's
    per-call overhead; bucket shapes are quantised (``ROW_QUANTUM``, ``LEN_QUANTUM``).

    Planning reads the lengths on the host, which is free for CPU tensors. Lengths on another
    device (CUDA), and code being compiled by ``torch.compile``, take the fixed-shape path:
    one bucket of all rows, in batch order, at the full (padded) length, with no host read,
    no data-dependent shape and so no sync and no graph break.

    Args:
        lens: ``[B]`` int lengths.
        max_len: ``L``, the padded length.
        max_buckets: the most buckets to use (1 = only trim to the longest row).

    Attributes:
        order: ``[B]`` row indices sorted by length, or None (batch order, one bucket).
        bounds: per bucket ``(start, end, length)``: its rows are ``order[start:end]``, its
            tensors have ``length`` positions.
    """

    def __init__(self, lens: torch.Tensor, max_len: int, max_buckets: int = 1):
        batch = lens.shape[0]
        self.order: Optional[torch.Tensor] = None
        self.inverse: Optional[torch.Tensor] = None
        if lens.device.type != "cpu" or batch == 0 or torch.compiler.is_compiling():
            self.bounds = [(0, batch, max_len)]
            return
        sorted_lens, order = torch.sort(lens.clamp(1, max_len), stable=True)
        # Candidate bucket ends, and the (quantised) length of a bucket ending there.
        ends = torch.tensor(list(range(ROW_QUANTUM, batch, ROW_QUANTUM)) + [batch])
        longest = sorted_lens[ends - 1]
        lengths = ((longest + LEN_QUANTUM - 1) // LEN_QUANTUM * LEN_QUANTUM).clamp_max(max_len)
        cuts = self._plan(ends.double(), lengths.double(), max_buckets)
        ends_list, lengths_list = ends.tolist(), lengths.tolist()
        starts = [0] + [ends_list[c] for c in cuts[:-1]]
        self.bounds = [(start, ends_list[c], lengths_list[c]) for start, c in zip(starts, cuts)]
        if len(self.bounds) > 1:
            self.order, self.inverse = order, torch.argsort(order)

    @staticmethod
    def _plan(ends: torch.Tensor, lengths: torch.Tensor, max_buckets: int) -> List[int]:
        """Indices into ``ends`` to cut at: the cheapest split into <= ``max_buckets`` runs.

        ``ends`` ``[m]``: candidate exclusive end rows (increasing, the last = B); ``lengths``
        ``[m]``: the length of a bucket ending there. State ``i`` = rows before candidate
        ``i`` are covered (0: none); a run from state ``i`` to candidate ``e >= i`` costs
        ``rows * (len^2 + BUCKET_LINEAR * len) + BUCKET_OVERHEAD`` and leads to state ``e + 1``.
        """
        m = ends.shape[0]
        rows = ends[None, :] - torch.cat([ends.new_zeros(1), ends[:-1]])[:, None]  # [i, e]
        cost = rows * (lengths * lengths + BUCKET_LINEAR * lengths) + BUCKET_OVERHEAD
        cost = cost.masked_fill(rows <= 0, math.inf)
        best = torch.cat([ends.new_zeros(1), ends.new_full((m,), math.inf)])  # per state
        choices, totals = [], []
        for _ in range(max_buckets):
            value, arg = (best[:m, None] + cost).min(dim=0)
            best = torch.cat([best.new_full((1,), math.inf), value])
            choices.append(arg)
            totals.append(float(best[m]))
        runs = min(range(max_buckets), key=totals.__getitem__) + 1
        cuts, e = [], m - 1
        for j in range(runs - 1, -1, -1):
            cuts.append(e)
            e = int(choices[j][e]) - 1
        return cuts[::-1]

    def split(self, x: torch.Tensor, seq_dim: Optional[int] = None) -> List[torch.Tensor]:
        """Per bucket: its rows of ``x`` (dim 0), trimmed to its length along ``seq_dim``."""
        parts = []
        for start, end, length in self.bounds:
            part = x if seq_dim is None else x.narrow(seq_dim, 0, length)
            if self.order is not None:
                part = part.index_select(0, self.order[start:end])
            parts.append(part)
        return parts

    def merge(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``split`` for per-row results: concat on dim 0, batch order restored."""
        out = torch.cat(list(parts)) if len(parts) > 1 else parts[0]
        return out if self.inverse is None else out.index_select(0, self.inverse)


class BucketedSeq(NamedTuple):
    """One domain's sequence tokens, per ``RowBuckets`` bucket.

    ``tokens[j]`` ``[rows_j, L_j, D]`` and ``lens[j]`` ``[rows_j]`` hold bucket j's rows
    (``buckets.split`` order); ``per_row`` computes per-row results and restores batch order.
    """
    buckets: RowBuckets
    tokens: List[torch.Tensor]
    lens: List[torch.Tensor]

    def per_row(self, fn: Callable[..., torch.Tensor], *row_inputs: torch.Tensor
                ) -> torch.Tensor:
        """``fn(tokens_j, lens_j, *inputs_j)`` per bucket, merged back into batch order.

        ``row_inputs``: ``[B, ...]`` tensors, split into the buckets' rows like the tokens;
        ``fn`` returns one result per row of its bucket. Returns ``[B, ...]``.
        """
        splits = [self.buckets.split(x) for x in row_inputs]
        return self.buckets.merge([fn(s, n, *xs) for s, n, *xs
                                   in zip(self.tokens, self.lens, *splits)])


# ----------------------------------------------------------------------------- attention

class RotaryEmbedding(nn.Module):
    """Rotary position embedding (half-split convention) for positions ``0 .. max_len-1``.

    ``inv_freq_k = base^(-2k/dh)``; ``x -> x cos + rotate_half(x) sin`` with
    ``rotate_half(x) = concat(-x2, x1)``. Positions are indices in the newest-first sequence,
    i.e. the recency rank of an event.

    Shape: ``[B, H, L, dh] -> [B, H, L, dh]`` (``L <= max_len``).
    """

    def __init__(self, head_dim: int, base: float, max_len: int = 2048):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        self.max_len = max_len
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-2]
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        cos, sin = self.cos[:length].to(x.dtype), self.sin[:length].to(x.dtype)
        return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head attention through SDPA, with an optional output gate (model_spec §6.2).

    ``out = W_o(attend(W_q x_q, W_k x_kv, W_v x_kv) * sigmoid(W_g x_q))``; the gate ``W_g``
    starts at weight 0 and bias 1 (a constant ``sigmoid(1)``) and is absent when
    ``gated=False`` (plain MHA, as ``nn.MultiheadAttention`` without its prob-dropout).
    ``q_proj`` holds ``[W_q; W_g]`` and ``kv_proj`` ``[W_k; W_v]``; self-attention runs all
    four as one GEMM.

    Args:
        d_model: ``D`` (divisible by ``num_heads``).
        num_heads: ``H``.
        gated: add the output gate.
        rope: rotary embedding applied to K (and to Q when ``rope_on_q``), or None.
        rope_on_q: rotate Q too (self-attention) or not (query decoding).

    Shape: x_q ``[B, Lq, D]``; x_kv ``[B, Lk, D]`` or None for self-attention; attn_mask
        bool broadcastable to ``[B, H, Lq, Lk]`` (True = may attend) or None; empty ``[B]``
        bool (rows whose attention output is zeroed) or None -> ``[B, Lq, D]``.
    """

    def __init__(self, d_model: int, num_heads: int, gated: bool = True,
                 rope: Optional[RotaryEmbedding] = None, rope_on_q: bool = True):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.d_model, self.num_heads, self.gated = d_model, num_heads, gated
        self.q_proj = nn.Linear(d_model, 2 * d_model if gated else d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        if gated:
            with torch.no_grad():
                self.q_proj.weight[d_model:].zero_()
                self.q_proj.bias[d_model:].fill_(1.0)
        self.rope = rope
        self.rope_on_q = rope_on_q

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x_q: torch.Tensor, x_kv: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None,
                empty: Optional[torch.Tensor] = None) -> torch.Tensor:
        # One split into D-wide parts (q, [gate,] k, v): its backward is a single concat,
        # where separate slices would each zero-fill a full-size gradient.
        if x_kv is None:
            weight = torch.cat([self.q_proj.weight, self.kv_proj.weight])
            bias = torch.cat([self.q_proj.bias, self.kv_proj.bias])
            parts = F.linear(x_q, weight, bias).split(self.d_model, -1)
        else:
            parts = (self.q_proj(x_q).split(self.d_model, -1)
                     + self.kv_proj(x_kv).split(self.d_model, -1))
        q, k, v = self._heads(parts[0]), self._heads(parts[-2]), self._heads(parts[-1])
        if self.rope is not None:
            k = self.rope(k)
            if self.rope_on_q:
                q = self.rope(q)
        out = attend(q, k, v, attn_mask)
        if empty is not None:
            out = out * (~empty).to(out.dtype)[:, None, None, None]
        out = out.transpose(1, 2).flatten(2)  # [B, Lq, D]
        if self.gated:
            out = out * torch.sigmoid(parts[1])
        return self.out_proj(out)


# ----------------------------------------------------------------------------- sequence encoders

class TransformerEncoder(nn.Module):
    """Pre-LN self-attention block over one domain (model_spec §6.3, ``transformer``).

    ``x += Dropout(Attn(LN(x)))``, ``x += Dropout(FFN(LN(x)))``; no causal mask. Padded
    positions are updated too but every reader masks them.

    Shape: x ``[B, L, D]``, lens ``[B]`` -> (``[B, L, D]``, lens).
    """

    def __init__(self, d_model: int, num_heads: int, hidden_mult: int, dropout: float,
                 rope: Optional[RotaryEmbedding] = None):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, rope=rope)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = feed_forward(d_model, hidden_mult * d_model, dropout)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.attn_norm(x)
        x = x + self.dropout(self.attn(h, None, attention_key_mask(lens, x.shape[1])))
        return x + self.dropout(self.ffn(self.ffn_norm(x))), lens


class SwiGLUEncoder(nn.Module):
    """Attention-free token-wise block (model_spec §6.3, ``swiglu``).

    ``x += Dropout(Lin(a * SiLU(b)))`` with ``[a, b] = Lin(D -> 2*hidden)(LN(x))``.

    Shape: x ``[B, L, D]``, lens ``[B]`` -> (``[B, L, D]``, lens).
    """

    def __init__(self, d_model: int, hidden_mult: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, 2 * hidden_mult * d_model)
        self.down = nn.Linear(hidden_mult * d_model, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a, b = self.up(self.norm(x)).chunk(2, dim=-1)
        return x + self.dropout(self.down(a * F.silu(b))), lens


class LongerEncoder(nn.Module):
    """Keeps the ``top_k`` most recent tokens (model_spec §6.3, ``longer``).

    With newest-first sequences the ``top_k`` most recent events are positions
    ``0 .. top_k-1`` and a row keeps ``min(len, top_k)`` valid tokens at the front, so a
    plain slice does the selection. This is correct by construction for rows shorter than
    ``top_k``, where the reference's gather misaligns tokens and mask (model_spec §11.1.1).

    * ``reduce`` (the first block of a domain with ``max_len > top_k``): the kept tokens
      cross-attend to all ``L`` tokens (pre-LN ``norm_q`` on the queries, ``norm_kv`` on the
      keys), residual on the kept ones.
    * otherwise (later blocks): self-attention with ``norm_q``; with ``causal`` a token
      attends to itself and older events (higher positions).
    * then ``x += Dropout(FFN(LN(x)))``.

    The reference switches on ``L > top_k`` with ``L`` the domain's fixed padded length; here
    ``L`` is trimmed per batch and per length bucket, so the branch is fixed at construction:
    a row's output never depends on the lengths of the rows batched with it.

    Shape: x ``[B, L, D]``, lens ``[B]`` -> (``[B, min(L, top_k), D]``, ``min(lens, top_k)``).
    """

    def __init__(self, d_model: int, num_heads: int, hidden_mult: int, dropout: float,
                 top_k: int, causal: bool, reduce: bool,
                 rope: Optional[RotaryEmbedding] = None):
        super().__init__()
        if top_k < 1:
            raise ValueError(f"seq_top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        self.causal = causal
        self.reduce = reduce
        self.norm_q = nn.LayerNorm(d_model)
        self.norm_kv = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, rope=rope)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = feed_forward(d_model, hidden_mult * d_model, dropout)
        self.dropout = Dropout(dropout)

    def _self_mask(self, lens: torch.Tensor, length: int) -> torch.Tensor:
        if not self.causal:
            return attention_key_mask(lens, length)
        pos = torch.arange(length, device=lens.device)
        older = pos[None, :] >= pos[:, None]  # [L, L]: key j is query i or older
        # The diagonal keeps padded query rows from being fully masked.
        mask = (valid_mask(lens, length)[:, None, :] & older) | torch.eye(
            length, dtype=torch.bool, device=lens.device)
        return mask.unsqueeze(1)  # [B, 1, L, L], L <= top_k

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        length = x.shape[1]
        if self.reduce:
            kept = x[:, :self.top_k]
            attn = self.attn(self.norm_q(kept), self.norm_kv(x),
                             attention_key_mask(lens, length))
            x = kept + self.dropout(attn)
        else:
            h = self.norm_q(x)
            x = x + self.dropout(self.attn(h, None, self._self_mask(lens, length)))
        return x + self.dropout(self.ffn(self.ffn_norm(x))), lens.clamp_max(self.top_k)


class CrossAttention(nn.Module):
    """Query decoding: ``q += Dropout(Attn(LN_q(q), LN_kv(seq)))`` (model_spec §6.4).

    RoPE (if any) rotates K only. A query of an empty sequence gets no attention update
    (residual only, like the reference).

    Shape: q ``[B, Nq, D]``, seq ``[B, L, D]``, lens ``[B]`` -> ``[B, Nq, D]``.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float,
                 rope: Optional[RotaryEmbedding] = None):
        super().__init__()
        self.norm_q = nn.LayerNorm(d_model)
        self.norm_kv = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, rope=rope, rope_on_q=False)
        self.dropout = Dropout(dropout)

    def forward(self, q: torch.Tensor, seq: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        attn = self.attn(self.norm_q(q), self.norm_kv(seq),
                         attention_key_mask(lens, seq.shape[1]), empty=lens == 0)
        return q + self.dropout(attn)


# ----------------------------------------------------------------------------- token mixing

def token_mix(x: torch.Tensor) -> torch.Tensor:
    """RankMixer token mixing ``[B, T, D] -> [B, T, D]`` (``D % T == 0``), parameter free.

    View as ``[B, T, T, D/T]`` (token, sub-chunk), swap the two ``T`` axes: output token h is
    the concatenation over tokens t of sub-chunk h of token t. Applying it twice is identity.
    """
    b, t, d = x.shape
    return x.view(b, t, t, d // t).transpose(1, 2).reshape(b, t, d)


class RankMixerBlock(nn.Module):
    """Query boosting over all ``T`` tokens (model_spec §6.5).

    ``full``: ``post_LN(X + FFN(LN(token_mix(X))))`` with one FFN shared by the tokens
    (needs ``D % T == 0``); ``ffn_only``: the same without mixing; ``none``: identity.

    Shape: ``[B, T, D] -> [B, T, D]``.
    """

    MODES = ("full", "ffn_only", "none")

    def __init__(self, num_tokens: int, d_model: int, hidden_mult: int, dropout: float,
                 mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"rank_mixer_mode must be one of {self.MODES}, got {mode!r}")
        if mode == "full" and d_model % num_tokens:
            raise ValueError(f"rank_mixer_mode 'full' needs d_model % T == 0, got d_model "
                             f"{d_model}, T {num_tokens}")
        self.mode = mode
        if mode != "none":
            self.norm = nn.LayerNorm(d_model)
            self.ffn = feed_forward(d_model, hidden_mult * d_model, dropout)
            self.post_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        mixed = token_mix(x) if self.mode == "full" else x
        return self.post_norm(x + self.ffn(self.norm(mixed)))


# ----------------------------------------------------------------------------- NS / token crosses

class NSSelfAttention(nn.Module):
    """``x + Dropout(MHA(LN(x)))`` over the NS tokens (model_spec §9.7, ``mha``).

    Shape: ``[B, N, D] -> [B, N, D]``.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, gated=False)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.dropout(self.attn(h))


class NSAutoIntLayer(nn.Module):
    """AutoInt interaction layer with a gated residual (model_spec §9.7, ``autoint``).

    ``o = act(Dropout(MHA(LN(x))) + R x)`` with ``R`` (no bias) initialised to the identity;
    output ``x + g (o - x)`` with the scalar ``g`` initialised to ``gate_init``.

    Shape: ``[B, N, D] -> [B, N, D]``.
    """

    ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}

    def __init__(self, d_model: int, num_heads: int, dropout: float, gate_init: float,
                 activation: str):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, gated=False)
        self.dropout = Dropout(dropout)
        self.res_proj = nn.Linear(d_model, d_model, bias=False)
        nn.init.eye_(self.res_proj.weight)
        self.act = self.ACTIVATIONS[activation]()
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        o = self.act(self.dropout(self.attn(h)) + self.res_proj(x))
        return x + self.gate * (o - x)


class TokenAutoIntLayer(nn.Module):
    """``post_LN(x + Dropout(MHA(LN(x))))`` (model_spec §9.8). Shape: ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, gated=False)
        self.dropout = Dropout(dropout)
        self.post_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.post_norm(x + self.dropout(self.attn(h)))


class GatedTokenAutoInt(nn.Module):
    """A ``TokenAutoIntLayer`` stack blended in by a scalar gate: ``x + g (stack(x) - x)``.

    With ``gate_init = 0`` the module is the identity at init (model_spec §9.8).

    Shape: ``[B, T, D] -> [B, T, D]``.
    """

    def __init__(self, d_model: int, num_heads: int, num_layers: int, dropout: float,
                 gate_init: float):
        super().__init__()
        self.layers = nn.Sequential(*(TokenAutoIntLayer(d_model, num_heads, dropout)
                                      for _ in range(num_layers)))
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * (self.layers(x) - x)


class NSTokenSEGate(nn.Module):
    """Squeeze-and-excitation over the NS tokens, identity at init (model_spec §9.6).

    ``gate = 2 sigmoid(Lin(SiLU(Lin(LN(mean_t x_t)))))`` per token, last Linear zero-init.

    Shape: ``[B, N, D] -> [B, N, D]``.
    """

    def __init__(self, num_tokens: int, d_model: int):
        super().__init__()
        hidden = max(4, d_model // 4)
        self.excite = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, hidden),
                                    nn.SiLU(), nn.Linear(hidden, num_tokens))
        nn.init.zeros_(self.excite[-1].weight)
        nn.init.zeros_(self.excite[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = 2.0 * torch.sigmoid(self.excite(x.mean(dim=1)))
        return x * gate.unsqueeze(-1)


# ----------------------------------------------------------------------------- queries

class MultiSeqQueryGenerator(nn.Module):
    """``Nq`` queries per domain from the NS tokens and the domain's pooled tokens (§5).

    ``g_s = LN([flatten(ns), pooled_s])``; query ``(s, j) = LN_sj(Lin(SiLU(Lin(g_s))))`` with
    independent weights per (domain, query). The ``S * Nq`` MLPs run as two batched einsums
    over stacked weights (same parameters as separate ``nn.Linear`` s, default init).

    Args:
        num_domains: ``S``.
        num_queries: ``Nq``.
        num_ns: ``N_ns``.
        d_model: ``D``.
        hidden_mult: MLP width multiplier.

    Shape: ns ``[B, N_ns, D]``, pooled ``[B, S, D]`` -> ``[B, S, Nq, D]``.
    """

    def __init__(self, num_domains: int, num_queries: int, num_ns: int, d_model: int,
                 hidden_mult: int):
        super().__init__()
        in_dim, hidden = (num_ns + 1) * d_model, hidden_mult * d_model
        s, q = num_domains, num_queries
        self.global_norm = nn.LayerNorm(in_dim)
        self.w1 = nn.Parameter(torch.empty(s, q, in_dim, hidden))
        self.b1 = nn.Parameter(torch.empty(s, q, hidden))
        self.w2 = nn.Parameter(torch.empty(s, q, hidden, d_model))
        self.b2 = nn.Parameter(torch.empty(s, q, d_model))
        self.norm_weight = nn.Parameter(torch.ones(s, q, d_model))
        self.norm_bias = nn.Parameter(torch.zeros(s, q, d_model))
        for p, fan_in in ((self.w1, in_dim), (self.b1, in_dim), (self.w2, hidden),
                          (self.b2, hidden)):  # nn.Linear's default U(+-1/sqrt(fan_in))
            nn.init.uniform_(p, -fan_in ** -0.5, fan_in ** -0.5)

    def forward(self, ns: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        b, s, d = pooled.shape
        g = torch.cat([ns.flatten(1).unsqueeze(1).expand(b, s, -1), pooled], dim=-1)
        g = self.global_norm(g)  # [B, S, (N_ns+1) D]
        h = F.silu(torch.einsum("bsi,sqih->bsqh", g, self.w1) + self.b1)
        y = torch.einsum("bsqh,sqhd->bsqd", h, self.w2) + self.b2
        return F.layer_norm(y, (d,)) * self.norm_weight + self.norm_bias


# ----------------------------------------------------------------------------- head

class TargetAwareAttentionHead(nn.Module):
    """DIN-style residual head, identity at init (model_spec §9.9).

    Target ``t`` = mean item NS token. Per domain: masked mean, the most recent valid token
    (position 0; zero when empty) and the DIN context ``sum_p w_p s_p`` with
    ``w = masked softmax(MLP([t, s_p, t - s_p, t * s_p]))``. The ``S`` summaries ``[t, mean,
    last, context]`` -> ``LN -> Lin -> SiLU -> Lin(-> 2D)`` (last layer zero) ``= [r, g]``;
    output ``h + r * sigmoid(g)``. The score MLP's first Linear is applied block-wise, so the
    ``[B, L, 4D]`` concatenation is never built (same parameters and function).

    Shape: h ``[B, D]``, target ``[B, D]``, seqs ``S x BucketedSeq`` -> ``[B, D]``.
    """

    def __init__(self, d_model: int, num_domains: int, hidden_mult: int):
        super().__init__()
        self.score_in = nn.Linear(4 * d_model, d_model)  # over [t, s, t - s, t * s]
        self.score_out = nn.Linear(d_model, 1)
        width = 4 * num_domains * d_model
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden_mult * d_model),
                                 nn.SiLU(), nn.Linear(hidden_mult * d_model, 2 * d_model))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def _scores(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        w_t, w_s, w_d, w_p = self.score_in.weight.split(t.shape[-1], dim=1)
        z = (F.linear(t, w_t + w_d, self.score_in.bias).unsqueeze(1) + F.linear(s, w_s - w_d)
             + F.linear(s * t.unsqueeze(1), w_p))
        return self.score_out(F.silu(z)).squeeze(-1)  # [B, L]

    def _summary(self, s: torch.Tensor, n: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``[t, mean, last, context]`` ``[B, 4D]`` of one domain (or bucket)."""
        valid = valid_mask(n, s.shape[1])
        nonempty = (n > 0).to(s.dtype).unsqueeze(-1)
        w = torch.softmax(self._scores(t, s).float().masked_fill(~valid, -1e9), -1)
        w = w * valid
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-6)
        context = (w.to(s.dtype).unsqueeze(1) @ s).squeeze(1)
        return torch.cat([t, masked_mean(s, valid), s[:, 0] * nonempty, context], -1)

    def forward(self, h: torch.Tensor, target: torch.Tensor,
                seqs: Sequence[BucketedSeq]) -> torch.Tensor:
        summaries = [seq.per_row(self._summary, target) for seq in seqs]
        r, g = self.out(torch.cat(summaries, dim=-1)).chunk(2, dim=-1)
        return h + r * torch.sigmoid(g)


class HeadCrossNet(nn.Module):
    """DCN-style cross layers ``h <- h + s_l * x0 * (W_l h + b_l)`` (model_spec §9.10).

    ``s`` is a learnable vector initialised to ``init_scale`` (0 gives the identity).

    Shape: ``[B, D] -> [B, D]``.
    """

    def __init__(self, d_model: int, num_layers: int, init_scale: float):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(num_layers))
        self.scale = nn.Parameter(torch.full((num_layers,), float(init_scale)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x0 = h
        for i, layer in enumerate(self.layers):
            h = h + self.scale[i] * x0 * layer(h)
        return h
