"""The scorers compared by the debiasing benchmarks: two-tower models built from atom and side
features (the tuning log's two baselines, the head-only control and the decoupled model) and
matrix factorisation. Every scorer returns a ``Scored`` for a batch of (user, item) pairs and
a full ``[n_users, n_items]`` score matrix for evaluation."""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from pcvr.config import DecouplingConfig
from pcvr.debias.data import EntityTable
from pcvr.model.decoupling import EntityDecoupler, projection_mlp

VARIANTS = ("concat_mlp", "mlp_concat", "mlp_concat_head", "decoupled")
HEADS = ("mlp", "split")


class Scored(NamedTuple):
    """A scorer's output for ``B`` pairs.

    score: ``[B]``.
    losses: the decoupling losses (already weighted by their ``DecouplingConfig`` weights;
        empty for every model but the decoupled one).
    weight: ``[B]`` detached atom/side-distance weights of the items, mean 1 (decoupled model
        with ``decouple_ipw`` only), else None.
    """
    score: torch.Tensor
    losses: Dict[str, torch.Tensor]
    weight: Optional[torch.Tensor]


def _init_table(table: nn.EmbeddingBag, init_std: Optional[float]) -> None:
    """``N(0, init_std^2)`` rows with a zero padding row; ``None`` keeps PyTorch's N(0, 1)."""
    if init_std is not None:
        with torch.no_grad():
            table.weight.normal_(0.0, init_std)
            table.weight[0].zero_()


class EntityFeatures(nn.Module):
    """Entity index ``[B]`` -> atom ``[B, E * n_atom_fields]`` and side
    ``[B, E * n_side_fields]``: one mean-pooled embedding bag per field (padding id 0)."""

    def __init__(self, table: EntityTable, emb_dim: int, init_std: Optional[float] = None):
        super().__init__()
        self.kinds = {"atom": len(table.atom), "side": len(table.side)}
        self.bags = nn.ModuleDict()
        for kind, fields in (("atom", table.atom), ("side", table.side)):
            for n, f in enumerate(fields):
                bag = nn.EmbeddingBag(f.vocab, emb_dim, mode="mean", padding_idx=0)
                _init_table(bag, init_std)
                self.bags[f"{kind}{n}"] = bag
                self.register_buffer(f"{kind}{n}_ids", torch.from_numpy(f.ids))
        self.atom_dim = emb_dim * len(table.atom)
        self.side_dim = emb_dim * len(table.side)

    def _kind(self, kind: str, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.bags[f"{kind}{n}"](getattr(self, f"{kind}{n}_ids")[idx])
                          for n in range(self.kinds[kind])], -1)

    def forward(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._kind("atom", idx), self._kind("side", idx)


class SplitHead(nn.Module):
    """``[B, 2 * dim]`` -> ``[B, 2 * dim]``: one projection MLP on each half (side, atom)."""

    def __init__(self, dim: int):
        super().__init__()
        self.side, self.atom = projection_mlp(dim, dim), projection_mlp(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side, atom = x.chunk(2, dim=-1)
        return torch.cat([self.side(side), self.atom(atom)], -1)


TowerOut = Tuple[torch.Tensor, Dict[str, torch.Tensor], Optional[torch.Tensor]]


class Tower(nn.Module):
    """Features -> ``[B, 2 * dim]`` vector, decoupling losses and distance weights.

    Variants (``VARIANTS``):

    * ``concat_mlp``: MLP(concat(side_emb, atom_emb)) (the log's baseline 1);
    * ``mlp_concat``: concat(MLP(side_emb), MLP(atom_emb)) (baseline 2);
    * ``mlp_concat_head``: baseline 2 followed by a ranking-head MLP (the control: the
      decoupled architecture without its losses);
    * ``decoupled``: ``mlp_concat_head`` whose two MLPs are an ``EntityDecoupler``. The head
      is needed: the losses spread the representations over the sphere, which a raw dot
      product cannot rank.

    The ranking head of the last two (``HEADS``): ``mlp``, one MLP over ``concat(side,
    atom)``; ``split``, one MLP per half, ``concat(MLP(side), MLP(atom))``, which keeps
    baseline 2's additive structure (score = side match + atom match) while still giving the
    ranking its own space apart from the one the decoupling losses shape.

    Args:
        features: an ``EntityFeatures``.
        dim: width of each of the side and atom halves.
        variant: one of ``VARIANTS``.
        cfg: decoupling hyper-parameters (``decoupled`` only).
        unique_entities: decoupling losses over the batch's distinct entities
            (``EntityDecoupler``; ``decoupled`` only).
        head: the ranking head (``HEADS``; ``mlp_concat_head`` and ``decoupled`` only).
    """

    def __init__(self, features: EntityFeatures, dim: int, variant: str,
                 cfg: DecouplingConfig, unique_entities: bool = False, head: str = "mlp"):
        super().__init__()
        self.features, self.variant = features, variant
        a, s = features.atom_dim, features.side_dim
        if variant == "concat_mlp":
            self.mlp = nn.Sequential(nn.Linear(s + a, 2 * dim), nn.ReLU(),
                                     nn.Linear(2 * dim, 2 * dim))
        elif variant == "mlp_concat" or variant == "mlp_concat_head":
            self.side_mlp, self.atom_mlp = projection_mlp(s, dim), projection_mlp(a, dim)
        elif variant == "decoupled":
            self.decoupler = EntityDecoupler(a, s, dim, cfg, unique_entities)
        else:
            raise ValueError(f"unknown tower variant {variant!r}; choose from {VARIANTS}")
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose from {HEADS}")
        self.head: nn.Module = nn.Identity()
        if variant in ("mlp_concat_head", "decoupled"):
            self.head = projection_mlp(2 * dim, 2 * dim) if head == "mlp" else SplitHead(dim)

    def forward(self, idx: torch.Tensor, loss_rows: Optional[int] = None) -> TowerOut:
        """``idx [B]`` -> (``[B, 2 * dim]``, losses over the first ``loss_rows`` rows,
        ``[B]`` distance weights or None)."""
        atom_x, side_x = self.features(idx)
        if self.variant == "concat_mlp":
            return self.mlp(torch.cat([side_x, atom_x], -1)), {}, None
        if self.variant == "decoupled":
            out = self.decoupler(atom_x, side_x, loss_rows)
            return self.head(torch.cat([out.side, out.atom], -1)), out.losses, out.sample_weight
        return self.head(torch.cat([self.side_mlp(side_x), self.atom_mlp(atom_x)], -1)), {}, None


def _with_ssl_rows(tower: Tower, idx: torch.Tensor,
                   ssl_idx: Optional[torch.Tensor]) -> TowerOut:
    """The tower on ``idx``, its losses computed on ``ssl_idx`` instead when given.

    ``ssl_idx`` rows go first so that ``loss_rows`` selects them; only ``idx``'s vectors and
    weights come back (weights renormalised to mean 1 over ``idx``).
    """
    if ssl_idx is None:
        return tower(idx)
    vec, losses, weight = tower(torch.cat([ssl_idx, idx]), loss_rows=len(ssl_idx))
    n = len(ssl_idx)
    if weight is not None:
        weight = weight[n:] / weight[n:].mean().clamp_min(1e-12)
    return vec[n:], losses, weight


class TwoTower(nn.Module):
    """Score = user vector . item vector + a learned offset (the offset lets a pointwise loss
    fit the rating scale; it never changes a ranking).

    Args:
        users, items: the entity feature tables.
        variant: the item tower's variant (``VARIANTS``); the user tower uses the same,
            except that a ``decoupled`` model without ``cfg.decouple_user`` gives the user the
            control's ``mlp_concat_head``.
        emb_dim: width of every embedding table.
        dim: width of each tower half (side, atom).
        cfg: decoupling hyper-parameters.
        init_std: std of the embedding rows (None = PyTorch's default N(0, 1)).
        unique_entities: decoupling losses over the batch's distinct users and items.
        head: the towers' ranking head (``HEADS``).
    """

    def __init__(self, users: EntityTable, items: EntityTable, variant: str, emb_dim: int,
                 dim: int, cfg: DecouplingConfig, init_std: Optional[float] = None,
                 unique_entities: bool = False, head: str = "mlp"):
        super().__init__()
        self.n_users, self.n_items = users.n, items.n
        user_variant = ("mlp_concat_head" if variant == "decoupled" and not cfg.decouple_user
                        else variant)
        self.users = Tower(EntityFeatures(users, emb_dim, init_std), dim, user_variant, cfg,
                           unique_entities, head)
        self.items = Tower(EntityFeatures(items, emb_dim, init_std), dim, variant, cfg,
                           unique_entities, head)
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, u: torch.Tensor, i: torch.Tensor, ssl_users: Optional[torch.Tensor] = None,
                ssl_items: Optional[torch.Tensor] = None) -> Scored:
        """Scores ``B`` pairs ``(u [B], i [B])``.

        ``ssl_users``/``ssl_items``: entities on which the decoupling losses are computed
        instead of the batch's own (e.g. drawn uniformly, so that every atom is regularised as
        often, whatever its exposure).
        """
        u_vec, u_losses, _ = _with_ssl_rows(self.users, u, ssl_users)
        i_vec, i_losses, weight = _with_ssl_rows(self.items, i, ssl_items)
        losses = {f"user/{k}": v for k, v in u_losses.items()}
        losses.update({f"item/{k}": v for k, v in i_losses.items()})
        return Scored((u_vec * i_vec).sum(-1) + self.offset, losses, weight)

    @torch.no_grad()
    def score_matrix(self) -> torch.Tensor:
        """``[n_users, n_items]`` scores of every pair."""
        u = self.users(torch.arange(self.n_users))[0]
        i = self.items(torch.arange(self.n_items))[0]
        return u @ i.t() + self.offset


class MatrixFactorisation(nn.Module):
    """Biased matrix factorisation on ids only: ``p_u . q_i + b_u + b_i + mu``.

    Args:
        n_users, n_items: entity counts.
        dim: factor width.
        init_std: std of the factor rows (biases start at 0).
    """

    def __init__(self, n_users: int, n_items: int, dim: int, init_std: float = 0.1):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.p = nn.Embedding(n_users, dim)
        self.q = nn.Embedding(n_items, dim)
        self.bu = nn.Embedding(n_users, 1)
        self.bi = nn.Embedding(n_items, 1)
        self.mu = nn.Parameter(torch.zeros(()))
        with torch.no_grad():
            self.p.weight.normal_(0.0, init_std)
            self.q.weight.normal_(0.0, init_std)
            self.bu.weight.zero_()
            self.bi.weight.zero_()

    def forward(self, u: torch.Tensor, i: torch.Tensor, ssl_users: Optional[torch.Tensor] = None,
                ssl_items: Optional[torch.Tensor] = None) -> Scored:
        """Scores ``(u [B], i [B])``; ``ssl_*`` are accepted and ignored (no losses)."""
        s = (self.p(u) * self.q(i)).sum(-1) + self.bu(u)[:, 0] + self.bi(i)[:, 0] + self.mu
        return Scored(s, {}, None)

    @torch.no_grad()
    def score_matrix(self) -> torch.Tensor:
        """``[n_users, n_items]`` scores of every pair."""
        return (self.p.weight @ self.q.weight.t() + self.bu.weight + self.bi.weight.t()
                + self.mu)
