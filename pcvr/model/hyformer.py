"""PCVR HyFormer: the model of model_spec.md, built from a ``FeatureLayout`` and the config.

Data flow of one forward pass (model_spec §8)::

    ns    = NSTokens(batch): user ints, user dense, item ints, item dense, dense cross  [B, N_ns, D]
    seqs  = SequenceTokens(batch): per-domain tokens (+ time embeddings)   S x [B, L, D]
    q     = MultiSeqQueryGenerator(ns, pooled seqs)                       [B, S, Nq, D]
    q, ns, seqs = HyFormerBlock x num_hyformer_blocks
    logits = Head(q, ns, seqs): LN(Lin(flatten(q))) (+ HeadCrossNet, + target attention)
             -> classifier                                                [B, action_num]

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
  (the same Adagrad update, much cheaper; ``tokens``);
* the reinit threshold is explicit: ``vocab_size > threshold``, so 0 re-initialises every
  feature table (model_spec §11.1.2).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from pcvr.batch import Batch
from pcvr.config import DecouplingConfig, ModelConfig
from pcvr.model.inputs import DENSE_CROSS_SOURCES, NSGroups, NSTokens, SequenceTokens
from pcvr.model.interactions import build_interaction_head
from pcvr.model.modules import (BucketedSeq, CrossAttention, Dropout, GatedTokenAutoInt,
                                HeadCrossNet, LongerEncoder, MultiSeqQueryGenerator,
                                NSAutoIntLayer, NSSelfAttention, RankMixerBlock,
                                RotaryEmbedding, SwiGLUEncoder, TargetAwareAttentionHead,
                                TransformerEncoder, masked_mean, valid_mask)
from pcvr.model.outputs import ModelOutput
from pcvr.model.tokens import IdAdmission, init_table_, set_sparse_grads
from pcvr.schema import FeatureLayout

ROPE_MAX_LEN = 2048
AUTOINT_POSITIONS = ("pre_mixer", "post_mixer")


def check_config(cfg: ModelConfig) -> None:
    """Validations of model_spec §9.7-§9.10 that do not depend on the schema."""
    if min(cfg.d_model, cfg.emb_dim, cfg.num_heads, cfg.num_queries, cfg.num_hyformer_blocks,
           cfg.hidden_mult, cfg.action_num) < 1:
        raise ValueError("d_model, emb_dim, num_heads, num_queries, num_hyformer_blocks, "
                         "hidden_mult and action_num must all be >= 1")
    if cfg.d_model % cfg.num_heads:
        raise ValueError(f"d_model {cfg.d_model} is not divisible by num_heads {cfg.num_heads}")
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

# ----------------------------------------------------------------------------- head


class Head(nn.Module):
    """Queries -> logits (model_spec §7, §9.9, §9.10).

    ``h = LN(Lin(flatten(q)))``, then optionally ``HeadCrossNet`` and the target-aware
    attention over the sequences (target = the mean item NS token), then the classifier
    ``Lin -> LN -> SiLU -> Dropout -> Lin``.

    Args:
        cfg: architecture flags.
        num_domains: ``S``.
        item_span: ``(start, end)`` of the item NS tokens.

    Shape: q ``[B, S, Nq, D]``, ns ``[B, N_ns, D]``, seqs ``S x BucketedSeq`` ->
        ``[B, action_num]``.
    """

    def __init__(self, cfg: ModelConfig, num_domains: int, item_span: Tuple[int, int]):
        super().__init__()
        d = cfg.d_model
        self.output_proj = nn.Sequential(nn.Linear(cfg.num_queries * num_domains * d, d),
                                         nn.LayerNorm(d))
        self.head_cross = (HeadCrossNet(d, cfg.head_cross_layers, cfg.head_cross_init_scale)
                           if cfg.head_cross_layers > 0 else None)
        self.item_span = item_span
        self.target_attention = None
        if cfg.use_target_attention:
            if item_span[0] == item_span[1]:
                raise ValueError("use_target_attention needs at least one item NS token")
            self.target_attention = TargetAwareAttentionHead(d, num_domains, cfg.hidden_mult)
        self.classifier = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.SiLU(),
                                        Dropout(cfg.dropout_rate),
                                        nn.Linear(d, cfg.action_num))

    def forward(self, q: torch.Tensor, ns: torch.Tensor, seqs: List[BucketedSeq]
                ) -> torch.Tensor:
        h = self.output_proj(q.flatten(1))
        if self.head_cross is not None:
            h = self.head_cross(h)
        if self.target_attention is not None:
            target = ns[:, self.item_span[0]:self.item_span[1]].mean(dim=1)
            h = self.target_attention(h, target, seqs)
        return self.classifier(h)


# ----------------------------------------------------------------------------- the model

class PCVRHyFormer(nn.Module):
    """The PCVR HyFormer ranking model (model_spec.md): ``NSTokens`` and ``SequenceTokens``,
    the query generator, ``num_hyformer_blocks`` blocks and the ``Head``.

    Args:
        layout: the flattened feature layout of the batches (``schema.FeatureLayout``).
        cfg: architecture flags.
        dcfg: endogenous-decoupling settings (read when ``dcfg.use_endogenous_decoupling``).
        ns_groups: parsed ns_groups.json (``user_ns_groups`` / ``item_ns_groups``: name ->
            fids), or None / empty for one group per feature.
        user_time_missing_as_padding: the data's request hour/day ids are shifted by one
            with 0 = missing (``DataConfig.user_abs_time_missing_as_padding``).

    Attributes:
        num_tokens: ``T = num_queries * S + N_ns`` (``N_ns = ns.num_tokens``).

    Inputs (``forward``/``predict``): a ``pcvr.batch.Batch``.
    """

    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, dcfg: DecouplingConfig,
                 ns_groups: Optional[NSGroups] = None, *,
                 user_time_missing_as_padding: bool = False):
        super().__init__()
        check_config(cfg)
        if not layout.seq:
            raise ValueError("the schema has no sequence domain; HyFormer needs at least one")
        d, num_domains = cfg.d_model, len(layout.seq)
        self.ns = NSTokens(layout, cfg, dcfg, ns_groups, user_time_missing_as_padding)
        num_ns = self.ns.num_tokens
        self.num_tokens = cfg.num_queries * num_domains + num_ns
        if cfg.rank_mixer_mode == "full" and d % self.num_tokens:
            user_k = self.ns.user_tokenizer.num_tokens \
                if cfg.ns_tokenizer_type == "rankmixer" else None
            raise ValueError(
                f"rank_mixer_mode 'full' needs d_model % T == 0, but d_model = {d} and "
                f"T = num_queries * S + N_ns = {cfg.num_queries} * {num_domains} + "
                f"{num_ns} = {self.num_tokens}; "
                + _token_count_hint(d, cfg.num_queries * num_domains, num_domains, num_ns,
                                    user_k))
        self.seq = SequenceTokens(layout, cfg)
        self._init_time_tables()

        self.query_generator = MultiSeqQueryGenerator(num_domains, cfg.num_queries, num_ns, d,
                                                      cfg.hidden_mult)
        self.input_dropout = Dropout(cfg.dropout_rate)
        rope = None
        if cfg.use_rope:
            longest = max(dom.max_len for dom in layout.seq)
            if longest > ROPE_MAX_LEN:
                raise ValueError(f"use_rope supports sequences up to {ROPE_MAX_LEN}, got "
                                 f"{longest}")
            rope = RotaryEmbedding(d // cfg.num_heads, cfg.rope_base, ROPE_MAX_LEN)
        seq_max_lens = [dom.max_len for dom in layout.seq]
        self.blocks = nn.ModuleList(HyFormerBlock(cfg, seq_max_lens, num_ns, rope, first=i == 0)
                                    for i in range(cfg.num_hyformer_blocks))
        self.head = Head(cfg, num_domains, self.ns.item_span)
        # Explicit NS interactions added to the logits (None when their flags are off).
        self.interactions = build_interaction_head(cfg, layout)

    def time_tables(self) -> List[nn.Embedding]:
        """The time-bucket, request hour/day and event hour/day tables, in that order."""
        bucket = [self.seq.time_bucket_emb] if self.seq.time_bucket_emb is not None else []
        seq_times = [self.seq.hour_emb, self.seq.dow_emb] if self.seq.use_abs_time else []
        return bucket + self.ns.time_tables() + seq_times

    @torch.no_grad()
    def _init_time_tables(self) -> None:
        """Xavier-normal time tables with a zero padding row, like the feature tables (the
        order of ``time_tables``, and so a seed's weights, is that of checkpoint format 1)."""
        for table in self.time_tables():
            nn.init.xavier_normal_(table.weight)
            if table.padding_idx is not None:
                table.weight[table.padding_idx].zero_()

    def _forward_impl(self, batch: Batch, input_dropout: bool) -> ModelOutput:
        emb = self.ns.embed(batch) if self.interactions is not None else None
        ns, aux, sample_weight = self.ns(batch, emb)
        seqs = self.seq(batch)
        pooled = torch.stack([seq.per_row(lambda s, n: masked_mean(s, valid_mask(n, s.shape[1])))
                              for seq in seqs], dim=1)
        q = self.query_generator(ns, pooled)  # [B, S, Nq, D], from the undropped tokens
        if input_dropout:
            q, ns = self.input_dropout(q), self.input_dropout(ns)
            seqs = [seq._replace(tokens=[self.input_dropout(s) for s in seq.tokens])
                    for seq in seqs]
        for block in self.blocks:
            q, ns, seqs = block(q, ns, seqs)
        logits = self.head(q, ns, seqs)
        if self.interactions is not None:
            logits = logits + self.interactions(batch, *emb)
        return ModelOutput(logits, aux, sample_weight)

    def forward(self, batch: Batch) -> ModelOutput:
        """Training forward (input emb-dropout on in train mode) -> ``ModelOutput``."""
        return self._forward_impl(batch, input_dropout=True)

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits ``[B, action_num]`` without the input emb-dropout (callers use eval mode).

        Inference only: runs under ``no_grad`` (recording a graph made float32 inference of a
        256-row batch ~1.1-2.5x slower and kept every activation alive).
        """
        return self._forward_impl(batch, input_dropout=False).logits

    # ------------------------------------------------------------------ speed paths
    def pad_batch(self, batch: Batch, multiple: int) -> Batch:
        """The batch with history lengths padded up to a multiple (fixed shapes for
        ``torch.compile``; same outputs): ``SequenceTokens.pad_batch``."""
        return self.seq.pad_batch(batch, multiple)

    def set_sparse_grads(self, enabled: bool) -> None:
        """Sparse (the CPU's eager step) or dense (the fixed-shape path) gradients for the
        large embedding tables (``tokens.set_sparse_grads``)."""
        set_sparse_grads(self, enabled)

    # ------------------------------------------------------------------ parameter groups
    def feature_tables(self) -> List[nn.Embedding]:
        """The NS and sequence feature tables (time tables excluded)."""
        owners = [self.ns.user_tokenizer.embedding, self.ns.item_tokenizer.embedding,
                  *self.seq.tokenizers.values()]
        return [t for owner in owners for t in owner.tables.values()]

    def sparse_parameters(self) -> List[nn.Parameter]:
        """Every embedding table weight (feature and time tables): the Adagrad group."""
        return [m.weight for m in self.modules() if isinstance(m, nn.Embedding)]

    def dense_parameters(self) -> List[nn.Parameter]:
        """Every other parameter: the AdamW group."""
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    @torch.no_grad()
    def stop_counting_ids(self) -> int:
        """Ends the id counting of ``--emb_min_count`` (the trainer calls it after the first
        epoch; calling it again does nothing). With several processes every rank takes rank
        0's counts, so that all admit the same ids as the checkpoint. Returns the number of
        tables that count."""
        mods = [m for m in self.modules() if isinstance(m, IdAdmission)]
        if any(m.counting for m in mods) and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            for m in mods:
                torch.distributed.broadcast(m.counts, src=0)
        for m in mods:
            m.counting = False
        return len(mods)

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
