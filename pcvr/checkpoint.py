"""The checkpoint format: folder names, the files in a folder, atomic save and strict load.

A checkpoint is a folder ``<ckpt_dir>/global_step{S}.epoch{E}.layer={L}.head={H}.hidden={D}``
(the platform's rule: it starts with ``global_step``, has at most 300 characters of
``[A-Za-z0-9_-=.]``) holding:

=====================  =============================================================  ========
file                   what it holds                                                  needed by
=====================  =============================================================  ========
``model.pt``           the model's ``state_dict`` (raw or EMA weights: see meta)      infer
``train_config.json``  every flag (``config.to_flat_dict``) + ``num_time_buckets``    infer
``schema.json``        the schema the model was trained on                            infer
``ns_groups.json``     the NS groups, when the model used any                         infer
``checkpoint.json``    meta: format version, weights (raw/ema), step, epoch, AUC      infer
``train_state.pt``     optimisers, schedulers, EMA, RNG and loop state (resume)       resume
=====================  =============================================================  ========

``<ckpt_dir>/best_checkpoint.json`` names the best folder. Folders are written atomically
(``pcvr.atomic``), so a kill during a write leaves the previous checkpoint usable. Loading
is strict: every model and data flag must be in ``train_config.json`` and no unknown key may
be, and the weights load with ``strict=True``; a damaged file is a ``CheckpointError`` that
names it and says what to do.

Format 1 (before ``checkpoint.json`` existed) is read too: its weights are renamed to the
current module paths (``FORMAT1_RENAMES``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from pcvr.atomic import atomic_dir, atomic_write_json
from pcvr.config import Config, from_flat_dict, to_flat_dict
from pcvr.errors import CheckpointError, ConfigError
from pcvr.model.build import build_model, load_ns_groups
from pcvr.model.hyformer import PCVRHyFormer
from pcvr.model.inputs import NSGroups
from pcvr.schema import NUM_TIME_BUCKETS, FeatureLayout, load_layout

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
PREFIX = "global_step"
MODEL_FILE = "model.pt"
CONFIG_FILE = "train_config.json"
SCHEMA_FILE = "schema.json"
NS_GROUPS_FILE = "ns_groups.json"
META_FILE = "checkpoint.json"
STATE_FILE = "train_state.pt"
BEST_FILE = "best_checkpoint.json"
NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-=.")
# Keys of train_config.json that are derived from the flags, not flags.
DERIVED_KEYS = ("num_time_buckets",)
# Format 1 state-dict prefixes -> their current module paths.
FORMAT1_RENAMES: Tuple[Tuple[str, str], ...] = tuple(
    [(p, "ns." + p) for p in ("user_tokenizer.", "item_tokenizer.", "user_dense_token.",
                              "item_dense_token.", "user_hour_emb.", "user_dow_emb.",
                              "item_decoupling.", "user_decoupling.", "dense_cross_token.",
                              "se_gate.")]
    + [("seq_tokenizers.", "seq.tokenizers."), ("time_bucket_emb.", "seq.time_bucket_emb."),
       ("seq_hour_emb.", "seq.hour_emb."), ("seq_dow_emb.", "seq.dow_emb.")]
    + [(p, "head." + p) for p in ("output_proj.", "head_cross.", "target_attention.",
                                  "classifier.")])


@dataclass
class CheckpointMeta:
    """``checkpoint.json``: what the folder is.

    Attributes:
        format_version: ``FORMAT_VERSION`` of the writer.
        weights: ``'raw'`` or ``'ema'``: which weights ``model.pt`` holds.
        global_step: optimiser steps done.
        epoch: 1-based epoch of the save.
        valid_auc: validation AUC of the saved weights, or None when not validated.
    """
    format_version: int = FORMAT_VERSION
    weights: str = "raw"
    global_step: int = 0
    epoch: int = 0
    valid_auc: Optional[float] = None


def checkpoint_name(step: int, epoch: int, cfg: Config) -> str:
    """The platform-valid folder name of the checkpoint of ``step``."""
    m = cfg.model
    name = (f"{PREFIX}{step}.epoch{epoch}.layer={m.num_hyformer_blocks}"
            f".head={m.num_heads}.hidden={m.d_model}")
    assert len(name) <= 300 and set(name) <= NAME_CHARS, name
    return name


def derived_keys(cfg: Config) -> Dict[str, Any]:
    """The derived keys recorded beside the flags in ``train_config.json``."""
    return {"num_time_buckets": NUM_TIME_BUCKETS if cfg.model.use_time_buckets else 0}


def save(path: str, model_state: Mapping[str, torch.Tensor], cfg: Config,
         raw_schema: Mapping[str, Any], ns_groups: NSGroups, meta: CheckpointMeta,
         train_state: Optional[Mapping[str, Any]] = None) -> None:
    """Writes the checkpoint folder ``path`` atomically (replacing one that exists).

    Args:
        path: the folder (``<ckpt_dir>/checkpoint_name(...)``).
        model_state: the weights to save (raw or EMA, as ``meta.weights`` says).
        cfg: the configuration of the run.
        raw_schema: the parsed schema.json.
        ns_groups: the NS groups the model was built with (``{}``: one group per feature).
        meta: the folder's meta.
        train_state: the training state for resume, or None.
    """
    flat = dict(to_flat_dict(cfg), **derived_keys(cfg))
    with atomic_dir(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model_state.items()},
                   os.path.join(tmp, MODEL_FILE))
        if train_state is not None:
            torch.save(train_state, os.path.join(tmp, STATE_FILE))
        _write_json(os.path.join(tmp, SCHEMA_FILE), raw_schema)
        # The groups the model was built with travel inside the folder ('' = one per feature).
        flat["ns_groups_json"] = NS_GROUPS_FILE if ns_groups else ""
        if ns_groups:
            _write_json(os.path.join(tmp, NS_GROUPS_FILE), ns_groups)
        _write_json(os.path.join(tmp, CONFIG_FILE), flat, indent=2)
        _write_json(os.path.join(tmp, META_FILE), dataclasses.asdict(meta), indent=2)


def _write_json(path: str, obj: Any, indent: Optional[int] = None) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=indent)


def write_best(ckpt_dir: str, name: str, valid_auc: Optional[float]) -> None:
    """``best_checkpoint.json``: ``{"checkpoint": name, "valid_auc": auc or null}``."""
    atomic_write_json(os.path.join(ckpt_dir, BEST_FILE),
                      {"checkpoint": name, "valid_auc": valid_auc}, indent=2)


# ----------------------------------------------------------------------------- finding
def step_of(name: str) -> Optional[int]:
    """The global step of a checkpoint folder name, or None for other names."""
    match = re.match(rf"{PREFIX}(\d+)(\.|$)", name)
    return int(match.group(1)) if match else None


def list_checkpoints(ckpt_dir: str) -> List[str]:
    """The complete checkpoint folders of ``ckpt_dir`` (those with ``model.pt``), oldest step
    first."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = [n for n in os.listdir(ckpt_dir) if step_of(n) is not None
             and os.path.isfile(os.path.join(ckpt_dir, n, MODEL_FILE))]
    return [os.path.join(ckpt_dir, n) for n in sorted(names, key=step_of)]


def latest_resumable(ckpt_dir: str) -> Optional[str]:
    """The newest complete checkpoint of ``ckpt_dir`` that carries a training state."""
    paths = [p for p in list_checkpoints(ckpt_dir) if os.path.isfile(os.path.join(p, STATE_FILE))]
    return paths[-1] if paths else None


def resolve_model_dir(path: str) -> str:
    """The checkpoint folder meant by ``path``: ``path`` itself when it holds ``model.pt``;
    for a checkpoint root, the folder that its ``best_checkpoint.json`` names (logged).

    Raises:
        CheckpointError: ``path`` is neither, naming the ``global_step*`` folders found.
    """
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    found = [os.path.basename(p) for p in list_checkpoints(path)]
    best = os.path.join(path, BEST_FILE)
    if os.path.isfile(best):
        try:
            with open(best, "r", encoding="utf-8") as fh:
                name = json.load(fh)["checkpoint"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{best}: not a best-checkpoint record ({exc})") from None
        if name in found:
            log.info("%s is a checkpoint root: using %s, named by %s", path, name, BEST_FILE)
            return os.path.join(path, name)
    raise CheckpointError(
        f"{path}: not a checkpoint folder (no {MODEL_FILE}); point it at one of the "
        f"{PREFIX}* folders inside: {found or 'none found'}")


# ----------------------------------------------------------------------------- loading
@dataclass
class Checkpoint:
    """A checkpoint folder read strictly (``read``).

    Attributes:
        path: the folder.
        cfg: the configuration it was trained with.
        meta: its meta (format 1: ``format_version`` 1, weights unknown = ``'raw'``).
        schema_path: its ``schema.json``.
        ns_groups: the NS groups of its model (``{}``: one group per feature).
    """
    path: str
    cfg: Config
    meta: CheckpointMeta
    schema_path: str
    ns_groups: NSGroups


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: a checkpoint folder must carry the {what} "
                              f"written by train.py")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: damaged, not valid JSON ({exc}); take another "
                              f"checkpoint folder or train again") from None


def read(path: str, fallback_schema: Optional[str] = None) -> Checkpoint:
    """Reads and strictly validates the configuration side of checkpoint folder ``path``.

    Args:
        path: the checkpoint folder.
        fallback_schema: the schema.json to use when the folder has none (format 1
            checkpoints of other tools), e.g. the one beside the data.
    Raises:
        CheckpointError: a missing or damaged file.
        ConfigError: a configuration that cannot rebuild the model exactly.
    """
    config_path = os.path.join(path, CONFIG_FILE)
    raw = _read_json(config_path, CONFIG_FILE)
    cfg = from_flat_dict(raw, source=config_path, derived=DERIVED_KEYS)
    if cfg.train.inference_dtype != "float32":
        raise ConfigError(f"{config_path}: inference_dtype {cfg.train.inference_dtype!r}; only "
                          f"float32 is supported")
    expected = derived_keys(cfg)["num_time_buckets"]
    if raw.get("num_time_buckets", expected) != expected:
        raise ConfigError(f"{config_path}: num_time_buckets {raw['num_time_buckets']} does not "
                          f"match use_time_buckets={cfg.model.use_time_buckets} (expected "
                          f"{expected})")
    meta_path = os.path.join(path, META_FILE)
    if os.path.isfile(meta_path):
        fields = _read_json(meta_path, META_FILE)
        try:
            meta = CheckpointMeta(**fields)
        except TypeError as exc:
            raise CheckpointError(f"{meta_path}: not a checkpoint meta ({exc})") from None
        if meta.format_version > FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {meta.format_version} is newer "
                                  f"than this code's {FORMAT_VERSION}; update the code")
    else:
        meta = CheckpointMeta(format_version=1)
    schema_path = os.path.join(path, SCHEMA_FILE)
    if not os.path.isfile(schema_path) and fallback_schema:
        schema_path = fallback_schema
    ns_groups: NSGroups = {}
    if cfg.model.ns_groups_json:
        inside = os.path.join(path, os.path.basename(cfg.model.ns_groups_json))
        if meta.format_version == 1 and not os.path.isfile(inside):
            ns_groups = load_ns_groups(cfg.model.ns_groups_json)  # format 1 kept the path
        else:
            ns_groups = _read_json(inside, NS_GROUPS_FILE)
    return Checkpoint(path, cfg, meta, schema_path, ns_groups)


def _torch_load(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: the checkpoint folder has no {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged or truncated, cannot be read "
                              f"({str(exc).splitlines()[0]}); take another checkpoint folder "
                              f"or train again") from None


def load_weights(ckpt: Checkpoint) -> Dict[str, torch.Tensor]:
    """The folder's ``model.pt`` as a state dict with the current module paths."""
    state = _torch_load(os.path.join(ckpt.path, MODEL_FILE), MODEL_FILE)
    if ckpt.meta.format_version == 1:
        state = {_rename_format1(k): v for k, v in state.items()}
    return state


def _rename_format1(key: str) -> str:
    for old, new in FORMAT1_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def load_train_state(ckpt: Checkpoint) -> Dict[str, Any]:
    """The folder's ``train_state.pt`` (resume)."""
    return _torch_load(os.path.join(ckpt.path, STATE_FILE), STATE_FILE)


def load_model(ckpt: Checkpoint) -> Tuple[PCVRHyFormer, FeatureLayout]:
    """Rebuilds the model of ``ckpt`` from its configuration and loads its weights strictly.

    Returns:
        (model in float32 eval mode on the CPU, the feature layout).
    Raises:
        CheckpointError: the weights do not match the rebuilt model.
    """
    layout, _ = load_layout(ckpt.schema_path, ckpt.cfg.data)
    model = build_model(ckpt.cfg, layout, ckpt.ns_groups)
    try:
        model.load_state_dict(load_weights(ckpt), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt.path}: the weights do not match the model rebuilt from "
                              f"{CONFIG_FILE}: {exc}") from None
    return model.float().eval(), layout


class CheckpointWriter:
    """Writes the checkpoints of one training run into ``ckpt_dir``.

    Binds what every checkpoint of a run shares (configuration, schema, NS groups), so that
    the trainer only says what changes: the weights, the meta and the training state.

    Args:
        ckpt_dir: the checkpoint root.
        cfg: the run's configuration.
        raw_schema: the parsed schema.json.
        ns_groups: the NS groups the model was built with (``{}``: one group per feature).
    """

    def __init__(self, ckpt_dir: str, cfg: Config, raw_schema: Mapping[str, Any],
                 ns_groups: NSGroups) -> None:
        self.ckpt_dir, self.cfg = ckpt_dir, cfg
        self.raw_schema, self.ns_groups = raw_schema, ns_groups

    def save(self, model_state: Mapping[str, torch.Tensor], meta: CheckpointMeta,
             train_state: Optional[Mapping[str, Any]] = None) -> str:
        """Writes the checkpoint of ``meta.global_step``; returns its folder."""
        path = os.path.join(self.ckpt_dir, checkpoint_name(meta.global_step, meta.epoch,
                                                           self.cfg))
        save(path, model_state, self.cfg, self.raw_schema, self.ns_groups, meta, train_state)
        log.info("saved checkpoint %s (%s weights)", path, meta.weights)
        return path

    def write_best(self, path: str, valid_auc: Optional[float]) -> None:
        """Records ``path`` as the run's best checkpoint."""
        write_best(self.ckpt_dir, os.path.basename(path), valid_auc)

    def stale(self, keep_last: int, keep: Optional[str]) -> List[str]:
        """The checkpoint folders beyond the ``keep_last`` newest, ``keep`` excepted."""
        paths = list_checkpoints(self.ckpt_dir)
        return [p for p in paths[:max(0, len(paths) - keep_last)]
                if keep is None or os.path.abspath(p) != os.path.abspath(keep)]
