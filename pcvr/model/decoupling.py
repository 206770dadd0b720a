"""Endogenous decoupling: an entity's representation split into an atom part and a side part.

An entity (item, user, query) has *atom* features (high-cardinality ids that memorise exposure)
and *side* features (category, genre, demographics that generalise). ``EntityDecoupler``
projects each through its own MLP and returns, beside the two representations, the
self-supervised losses of the method (reference: shared/reference/decoupling_method.md):

* side SSL: ``contrastive_uniformity_loss(side)``, spreads different sides over the sphere;
* stage-1: ``stage1_loss(atom, side)``, pulls an atom to within ``margin`` cosine of its side;
* atom-orthogonal SSL: ``atom_orth_ssl_loss(atom, side)``, spreads the atoms' components
  orthogonal to their side, so atoms of one side cluster around it yet stay distinct;
* optional IPW: ``ipw_sample_weight(atom, side)``, a per-sample weight replacing inverse
  propensity, large for atoms far from their side (rare ones, since frequent atoms dominate
  and so sit near the side representation).

Every weight, margin, threshold and temperature comes from ``DecouplingConfig``.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcvr.config import DecouplingConfig

_NORM_EPS = 1e-6  # floor of vector norms before normalising (an orthogonal part can vanish)


def projection_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear, ``[*, in_dim] -> [*, out_dim]`` (hidden width ``out_dim``)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim))


def contrastive_uniformity_loss(z: torch.Tensor, temperature: float,
                                fake_neg_threshold: float) -> torch.Tensor:
    """In-batch InfoNCE whose positive is the anchor itself: a uniformity loss on the sphere.

    For row ``i`` with unit vector ``u_i`` and cosines ``c_ij = u_i . u_j``, the positive is
    ``i`` itself (``c_ii = 1``) and the negatives ``N(i)`` are the other rows with
    ``c_ij <= fake_neg_threshold``. Rows above the threshold are *fake negatives* (the same
    entity, or one indistinguishable from it, seen again in the batch) and are masked::

        loss_i = -log(e^{1/t} / (e^{1/t} + sum_{j in N(i)} e^{c_ij/t}))
               = log(1 + sum_{j in N(i)} e^{(c_ij - 1)/t})

    The positive term carries no gradient, so the loss only pushes true negatives apart; it
    is 0 when no row has a negative. The mask is computed on detached cosines.

    Args:
        z: ``[B, D]`` representations (any norm).
        temperature: ``t`` above.
        fake_neg_threshold: cosine above which an in-batch negative is masked.

    Returns:
        Scalar: the mean of ``loss_i`` over the ``B`` rows.
    """
    u = F.normalize(z, dim=-1, eps=_NORM_EPS)
    cos = u @ u.t()  # [B, B]
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    negative = ~eye & (cos.detach() <= fake_neg_threshold)
    logits = ((cos - 1.0) / temperature).masked_fill(~negative, float("-inf"))
    # Column of zeros = the positive's logit after subtracting 1/t from every logit.
    logits = torch.cat([logits.new_zeros(z.shape[0], 1), logits], dim=1)  # [B, B + 1]
    return torch.logsumexp(logits, dim=1).mean()


def stage1_loss(atom: torch.Tensor, side: torch.Tensor, margin: float) -> torch.Tensor:
    """Truncated cosine alignment ``mean_i max(0, margin - cos(atom_i, side_i))^2``.

    Asymmetric by design: an atom farther than ``margin`` cosine from its side is pulled in;
    one already within it is left free (zero loss and zero gradient).

    Args:
        atom: ``[B, D]`` atom representations.
        side: ``[B, D]`` side representations of the same entities.
        margin: cosine the atom must reach.

    Returns:
        Scalar loss.
    """
    cos = F.cosine_similarity(atom, side, dim=-1, eps=_NORM_EPS)  # [B]
    return F.relu(margin - cos).pow(2).mean()


def orthogonal_component(atom: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """``atom - (atom . s) s`` with ``s = side / |side|``, shapes ``[B, D] -> [B, D]``.

    ``side`` is detached: the atom-orthogonal loss shapes the atoms around their side and
    must not move the side itself (side SSL and the task do that).
    """
    s = F.normalize(side.detach(), dim=-1, eps=_NORM_EPS)
    return atom - (atom * s).sum(dim=-1, keepdim=True) * s


def atom_orth_ssl_loss(atom: torch.Tensor, side: torch.Tensor, temperature: float,
                       fake_neg_threshold: float) -> torch.Tensor:
    """``contrastive_uniformity_loss`` on ``orthogonal_component(atom, side)``.

    Atoms are not spread over the whole sphere (stage-1 keeps them near their side) but
    their residuals around the side are; repeated atoms in a batch are fake negatives.

    Args:
        atom: ``[B, D]`` atom representations.
        side: ``[B, D]`` side representations of the same entities.
        temperature: contrastive temperature.
        fake_neg_threshold: cosine above which an in-batch negative is masked.

    Returns:
        Scalar loss.
    """
    return contrastive_uniformity_loss(orthogonal_component(atom, side), temperature,
                                       fake_neg_threshold)


def ipw_sample_weight(atom: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Per-sample weight from atom/side distance, replacing inverse-propensity weights.

    ``d_i = 1 - cos(atom_i, side_i)`` in ``[0, 2]`` grows as an atom leaves its side, i.e.
    as it gets rarer (frequent atoms pull the side towards themselves). Normalised within the
    batch, ``w_i = (d_i + eps) / (mean(d) + eps)``, so ``mean(w) = 1`` (``sum(w) = B``), and
    computed without gradient so the weight never trains the representations.

    Args:
        atom: ``[B, D]`` atom representations.
        side: ``[B, D]`` side representations.

    Returns:
        ``[B]`` weights, detached, mean exactly 1.
    """
    with torch.no_grad():
        d = 1.0 - F.cosine_similarity(atom, side, dim=-1, eps=_NORM_EPS)
        return (d + _NORM_EPS) / (d.mean() + _NORM_EPS)


class DecoupledOutput(NamedTuple):
    """What ``EntityDecoupler`` returns.

    atom: ``[B, out_dim]`` atom representation.
    side: ``[B, out_dim]`` side representation.
    losses: ``{'side_ssl', 'stage1', 'atom_orth_ssl'}`` scalars, already multiplied by their
        ``DecouplingConfig`` weights (sum them, then scale by ``decouple_loss_weight``).
    sample_weight: ``[B]`` detached IPW weights (mean 1) when ``decouple_ipw``, else None.
    """
    atom: torch.Tensor
    side: torch.Tensor
    losses: Dict[str, torch.Tensor]
    sample_weight: Optional[torch.Tensor]


def first_occurrences(x: torch.Tensor) -> torch.Tensor:
    """Indices of the first row of each distinct row of ``x [B, D]``, in row order: ``[U]``.

    ``torch.unique`` has a data-dependent size, so on a GPU this synchronises with the host.
    """
    distinct, inverse = torch.unique(x, dim=0, return_inverse=True)
    pos = torch.arange(x.shape[0], device=x.device)
    first = torch.full((distinct.shape[0],), x.shape[0], dtype=pos.dtype, device=x.device)
    return first.scatter_reduce(0, inverse, pos, reduce="amin").sort().values


class EntityDecoupler(nn.Module):
    """Atom and side encoders, each with its own projection MLP, plus the decoupling losses.

    The two MLPs are separate because sharing one projection hurt (tuning log, iteration 2).
    Losses are computed in-batch on every call (training and evaluation alike). With
    ``unique_entities`` they are computed over the distinct entities of the batch (rows with
    the same atom input count once), so that an entity's weight in the losses does not grow
    with its exposure: in a logged batch popular entities repeat, and without it they
    dominate the side representations and the stage-1 pull (off by default: it costs a
    ``torch.unique``, a host sync on a GPU).

    The representations are shaped by the losses (sides spread uniformly, atoms around their
    side), so a model should score them through its own head (e.g. an MLP over
    ``concat(side, atom)``) rather than by a raw dot product: the log adds a separate ranking
    MLP for the same reason.

    Args:
        atom_in: width of the atom input (e.g. concatenated id embeddings).
        side_in: width of the side input (e.g. concatenated category embeddings).
        out_dim: width of both representations.
        cfg: the decoupling hyper-parameters.
        unique_entities: compute the losses over the batch's distinct entities (see above).
    """

    def __init__(self, atom_in: int, side_in: int, out_dim: int, cfg: DecouplingConfig,
                 unique_entities: bool = False):
        super().__init__()
        self.atom_proj = projection_mlp(atom_in, out_dim)
        self.side_proj = projection_mlp(side_in, out_dim)
        self.cfg = cfg
        self.unique_entities = unique_entities

    def forward(self, atom_x: torch.Tensor, side_x: torch.Tensor,
                loss_rows: Optional[int] = None) -> DecoupledOutput:
        """``atom_x [B, atom_in]``, ``side_x [B, side_in]`` -> ``DecoupledOutput``.

        ``loss_rows``: compute the losses on the first ``loss_rows`` rows only (default all),
        e.g. to leave out extra scored rows whose ``O(B^2)`` in-batch losses are not wanted.
        """
        c = self.cfg
        atom = self.atom_proj(atom_x)
        side = self.side_proj(side_x)
        a, s = atom[:loss_rows], side[:loss_rows]
        if self.unique_entities:
            keep = first_occurrences(atom_x[:loss_rows].detach())
            a, s = a[keep], s[keep]
        t, thr = c.decouple_temperature, c.decouple_fake_neg_threshold
        losses = {
            "side_ssl": c.decouple_side_weight * contrastive_uniformity_loss(s, t, thr),
            "stage1": c.decouple_stage1_weight * stage1_loss(a, s, c.decouple_stage1_margin),
            "atom_orth_ssl": c.decouple_atom_weight * atom_orth_ssl_loss(a, s, t, thr),
        }
        weight = ipw_sample_weight(atom, side) if c.decouple_ipw else None
        return DecoupledOutput(atom, side, losses, weight)
