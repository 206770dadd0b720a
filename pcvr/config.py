"""Every flag of the project, declared once.

Each flag is a field of one of four dataclasses:

* ``DataConfig``   - how parquet rows become tensors (needed again by ``infer.py``);
* ``ModelConfig``  - the architecture (needed again by ``infer.py`` to rebuild the model);
* ``DecouplingConfig`` - the endogenous-decoupling losses (model side, also used by the
  MovieLens benchmark);
* ``TrainConfig``  - optimisation, paths and logging (training only).

The command line (``build_parser``), ``train_config.json`` (``to_flat_dict``) and the strict
rebuild in ``infer.py`` (``from_flat_dict``) are all generated from these fields, so a flag
cannot be forgotten by one of them. A field's ``metadata`` holds its help text and, where
needed, ``choices``, the ``--no_*`` twin of a boolean, or a ``env`` variable that overrides it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Type, TypeVar

from pcvr.errors import ConfigError

# The project folder (train.py, run.sh and the default ns_groups.json live there).
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

T = TypeVar("T")


def flag(default: Any, help: str, choices: Optional[Iterable[Any]] = None,
         negate: Optional[str] = None, env: Optional[str] = None,
         const: Optional[Any] = None, added_later: bool = False) -> Any:
    """Declares one CLI flag as a dataclass field.

    Args:
        default: the default value (its type is the field's annotation).
        help: help text shown by ``--help``.
        choices: allowed values, if restricted.
        negate: for booleans, the name of the ``--no_*`` twin (default ``no_<name>`` with a
            leading ``use_`` dropped).
        env: an environment variable that overrides the CLI value when set.
        const: the value of the flag given without a value (``--resume`` alone).
        added_later: a model flag added after checkpoints were written without it; its
            default reproduces the older model, so ``from_flat_dict`` takes the default when
            an older ``train_config.json`` lacks the key (every other key stays required).
    """
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if negate is not None:
        meta["negate"] = negate
    if env is not None:
        meta["env"] = env
    if const is not None:
        meta["const"] = const
    if added_later:
        meta["added_later"] = True
    return field(default=default, metadata=meta)


DEFAULT_SEQ_MAX_LENS = "seq_a:256,seq_b:256,seq_c:512,seq_d:512"

# Named starting points for ``--preset``: flag name -> value, declared once here and used by
# run.sh, baseline/run.sh, the benchmarks and the tests. ``seed`` is the seed's active
# configuration (the reference's run.sh); ``baseline`` switches its additions off again.
SEED_PRESET: Dict[str, Any] = {
    "experiment_name": "sota_activity_dense_utc8_pair6266_bf16train_fp32infer",
    "ns_tokenizer_type": "rankmixer", "user_ns_tokens": 5, "item_ns_tokens": 2,
    "num_queries": 2, "ns_groups_json": "", "emb_skip_threshold": 1000000, "num_workers": 8,
    "use_time_buckets": True, "use_abs_time_emb": True, "time_zone_offset_hours": 8.0,
    "use_user_activity_dense": True, "use_pair_62_66": True, "use_bf16_train": True,
    "inference_dtype": "float32",
}
PRESETS: Dict[str, Dict[str, Any]] = {
    "seed": SEED_PRESET,
    "baseline": dict(SEED_PRESET, experiment_name="official_baseline", use_abs_time_emb=False,
                     time_zone_offset_hours=0.0, use_user_activity_dense=False,
                     use_pair_62_66=False, use_bf16_train=False, num_epochs=999, patience=5),
    # Issue 17: the seed plus explicit user x item interactions trained at their own rate,
    # and more passes below 60,000 training rows (README "Ablations and the recommended
    # configuration" and "Small data and learning curves" have the runner's figures).
    "recommended": dict(SEED_PRESET, experiment_name="recommended_seed_interactions",
                        use_field_cross=True, use_pair_target_attn=True,
                        use_history_fields=True, interaction_lr=3e-3,
                        min_train_samples=60000),
}


@dataclass
class DataConfig:
    """How rows are read and converted; recorded so that inference converts identically."""
    seq_max_lens: str = flag(DEFAULT_SEQ_MAX_LENS,
                             "per-domain history length kept, 'domain:len' comma list "
                             "(unlisted domains keep 256)")
    seq_keep: str = flag("recent", "which events a history keeps: 'recent' = the L most recent "
                         "by timestamp, newest first (fix); 'first' = the first L as stored "
                         "(the reference's head truncation)", choices=("recent", "first"))
    use_user_activity_dense: bool = flag(True, "append user activity dense fids 900-915 "
                                         "(history lengths and 1/3/5-day event counts over the "
                                         "full history)")
    time_zone_offset_hours: float = flag(0.0, "hours added to Unix time before deriving hour "
                                         "and day of week (8 = UTC+8)")
    user_abs_time_missing_as_padding: bool = flag(False, "user hour/dow ids are shifted by one "
                                                  "and 0 marks a missing request timestamp")


@dataclass
class ModelConfig:
    """The architecture. Every field is required again by infer.py to rebuild the model."""
    d_model: int = flag(64, "backbone width D")
    emb_dim: int = flag(64, "width of each embedding table E")
    num_queries: int = flag(1, "queries per sequence domain")
    num_hyformer_blocks: int = flag(2, "stacked HyFormer blocks")
    num_heads: int = flag(4, "attention heads (d_model % num_heads == 0)")
    seq_encoder_type: str = flag("transformer", "sequence encoder",
                                 choices=("transformer", "swiglu", "longer"))
    hidden_mult: int = flag(4, "FFN width multiplier")
    dropout_rate: float = flag(0.01, "dropout; sequence id embeddings use twice this")
    seq_top_k: int = flag(50, "most recent tokens kept by the 'longer' encoder")
    seq_causal: bool = flag(False, "causal self-attention among the kept tokens ('longer')")
    action_num: int = flag(1, "number of output logits")
    use_time_buckets: bool = flag(True, "add time-bucket embeddings to sequence tokens",
                                  negate="no_time_buckets")
    rank_mixer_mode: str = flag("full", "RankMixer: 'full' needs d_model % T == 0",
                                choices=("full", "ffn_only", "none"))
    use_rope: bool = flag(False, "rotary position embedding in sequence attention")
    rope_base: float = flag(10000.0, "RoPE base")
    emb_skip_threshold: int = flag(0, "features with vocab > threshold get no table "
                                   "(zero vectors); 0 = keep every table")
    seq_id_threshold: int = flag(10000, "sequence features with vocab > threshold count as ids "
                                 "and get extra embedding dropout")
    ns_groups_json: str = flag(os.path.join(PROJECT_DIR, "ns_groups.json"),
                               "fid groups for the NS tokenizer; '' = one group per feature")
    ns_tokenizer_type: str = flag("rankmixer", "NS tokenizer", choices=("group", "rankmixer"))
    user_ns_tokens: int = flag(0, "RankMixer user NS tokens (0 = number of user groups)")
    item_ns_tokens: int = flag(0, "RankMixer item NS tokens (0 = number of item groups)")
    randomized_split: bool = flag(False, "RankMixer: split whole fids into tokens by a seeded "
                                  "random permutation")
    randomized_split_seed: int = flag(42, "seed of the randomized split (item uses seed+100003)")
    use_abs_time_emb: bool = flag(False, "hour/day-of-week embeddings for the request and "
                                  "every history event")
    add_user_time_to_dense_tok: bool = flag(False, "also add the request hour/dow embedding to "
                                            "the user dense token")
    use_pair_62_66: bool = flag(False, "pool int fids 62-66 weighted by their paired dense "
                                "values, and per-fid user dense heads")
    pair_pooling: str = flag("sum", "pair 62-66 pooling: 'sum' = the reference's weighted sum "
                             "(measured better on the demo data); 'mean' = weights normalised "
                             "to sum 1",
                             choices=("mean", "sum"))
    use_dense_cross_token: bool = flag(False, "extra NS token crossing user and item dense "
                                       "features (adds 1 to T)")
    dense_cross_user_fids: str = flag("61,87", "user dense fids of the dense cross token")
    dense_cross_item_source: str = flag("user_dense", "item side of the dense cross token",
                                        choices=("user_dense", "item_dense", "item_ns"))
    dense_cross_item_fids: str = flag("89,90,91", "dense fids of the item side (ignored for "
                                      "item_ns)")
    dense_cross_dim: int = flag(0, "width of the dense cross (0 = d_model)")
    use_target_attention: bool = flag(False, "DIN-style target-aware attention head")
    use_ns_se_gate: bool = flag(False, "squeeze-and-excitation gate over NS tokens")
    use_ns_self_attn: bool = flag(False, "NS token self-attention inside every block")
    ns_self_attn_impl: str = flag("mha", "NS self-attention implementation",
                                  choices=("mha", "autoint"))
    ns_autoint_layers: int = flag(2, "AutoInt layers of the NS self-attention")
    ns_autoint_heads: int = flag(0, "AutoInt heads (0 = num_heads)")
    ns_autoint_gate_init: float = flag(0.05, "AutoInt residual gate init")
    ns_autoint_activation: str = flag("relu", "AutoInt activation",
                                      choices=("relu", "silu", "gelu"))
    use_combined_autoint: bool = flag(False, "gated AutoInt over query + NS tokens per block")
    combined_autoint_layers: int = flag(1, "combined AutoInt layers")
    combined_autoint_heads: int = flag(0, "combined AutoInt heads (0 = num_heads)")
    combined_autoint_dropout: float = flag(-1.0, "combined AutoInt dropout (<0 = dropout_rate)")
    combined_autoint_gate_init: float = flag(0.0, "combined AutoInt gate init (0 = identity)")
    combined_autoint_position: str = flag("pre_mixer", "where the combined AutoInt runs",
                                          choices=("pre_mixer", "post_mixer"))
    head_cross_layers: int = flag(0, "HeadCrossNet layers (0 = off)")
    head_cross_init_scale: float = flag(0.01, "HeadCrossNet initial layer scale")
    use_pair_target_attn: bool = flag(False, "target-aware lookup over the paired lists 62-66: "
                                      "the item fields' embeddings query every element's id "
                                      "and read its paired value (a logit side path, "
                                      "pcvr/model/interactions.py)", added_later=True)
    pair_attn_heads: int = flag(4, "match heads per paired list of --use_pair_target_attn",
                                added_later=True)
    use_field_cross: bool = flag(False, "user x item field cross: every user field (int fid, "
                                 "dense field) and every item field projected per head, the "
                                 "dot product of each (user, item) pair weighted and added to "
                                 "the logits (a field-weighted FM; pcvr/model/interactions.py)",
                                 added_later=True)
    field_cross_heads: int = flag(2, "projections per field of --use_field_cross",
                                  added_later=True)
    field_cross_dim: int = flag(8, "width of each projection of --use_field_cross",
                                added_later=True)
    use_history_fields: bool = flag(False, "with --use_field_cross: each history feature's mean "
                                    "embedding over the kept events is one more user field "
                                    "(own tables, larger vocabularies hashed into 16,384 "
                                    "rows)", added_later=True)
    history_field_dim: int = flag(16, "embedding width of --use_history_fields",
                                  added_later=True)
    emb_min_count: int = flag(0, "frequency admission: ids seen fewer than this many times in "
                              "the first training epoch share the out-of-vocabulary row of "
                              "their table instead of a row of their own (0 = off)",
                              added_later=True)


@dataclass
class DecouplingConfig:
    """Endogenous decoupling (second seed); defaults are the tuning log's values."""
    use_endogenous_decoupling: bool = flag(False, "decouple the target item (and, with "
                                           "--decouple_user, the user) into atom and side "
                                           "representations trained with self-supervised losses")
    decouple_user: bool = flag(False, "also decouple the user (atom = user id-like fids)")
    decouple_item_atom_fids: str = flag("16", "item fids forming the item atom (id-like)")
    decouple_item_side_fids: str = flag("5,6,7,11", "item fids forming the item side "
                                        "(category-like)")
    decouple_user_atom_fids: str = flag("3,4", "user fids forming the user atom")
    decouple_user_side_fids: str = flag("1,48,49,50", "user fids forming the user side")
    decouple_dim: int = flag(64, "width of the atom/side representations")
    decouple_temperature: float = flag(0.1, "temperature of the in-batch contrastive losses")
    decouple_fake_neg_threshold: float = flag(0.99, "in-batch negatives with cosine above this "
                                              "are masked as fake negatives")
    decouple_stage1_margin: float = flag(0.5, "margin of the truncated cosine loss "
                                         "max(0, margin - cos(atom, side))^2")
    decouple_stage1_weight: float = flag(0.25, "weight of the truncated cosine (stage-1) loss")
    decouple_side_weight: float = flag(1.0, "weight of the side self-supervised loss")
    decouple_atom_weight: float = flag(1.0, "weight of the atom-orthogonal self-supervised loss")
    decouple_loss_weight: float = flag(0.1, "weight of the summed decoupling losses in the "
                                       "PCVR training loss")
    decouple_ipw: bool = flag(False, "weight samples by atom/side similarity (batch-normalised, "
                              "gradient stopped) in place of inverse propensity")


@dataclass
class TrainConfig:
    """Optimisation, paths and logging: training only, never needed to rebuild the model. An
    environment variable named by a flag wins over the flag (the platform sets them)."""
    data_dir: Optional[str] = flag(None, "folder of *.parquet (+ schema.json) or one parquet "
                                   "file", env="TRAIN_DATA_PATH")
    schema_path: Optional[str] = flag(None, "schema.json (default <data_dir>/schema.json)")
    ckpt_dir: Optional[str] = flag(None, "checkpoint root", env="TRAIN_CKPT_PATH")
    log_dir: Optional[str] = flag(None, "folder of train.log (default <ckpt_dir>/../logs)",
                                  env="TRAIN_LOG_PATH")
    tf_events_dir: Optional[str] = flag(None, "TensorBoard folder (default <log_dir>/events)",
                                        env="TRAIN_TF_EVENTS_PATH")
    batch_size: int = flag(256, "batch size for training, validation and inference")
    lr: float = flag(1e-4, "AdamW learning rate (dense parameters)")
    interaction_lr: float = flag(0.0, "AdamW learning rate of the explicit interactions "
                                 "(--use_field_cross, --use_pair_target_attn); 0 = --lr")
    weight_decay: float = flag(0.01, "AdamW weight decay (dense parameters)")
    adam_beta1: float = flag(0.9, "AdamW beta1")
    adam_beta2: float = flag(0.98, "AdamW beta2")
    lr_schedule: str = flag("constant", "learning-rate schedule of both optimisers: "
                            "'constant' (the reference), 'cosine' = cosine decay to 0 over "
                            "num_epochs", choices=("constant", "cosine"))
    lr_warmup_steps: int = flag(0, "linear learning-rate warm-up over this many steps (both "
                                "optimisers; 0 = none)")
    num_epochs: int = flag(6, "maximum number of epochs")
    min_train_samples: int = flag(0, "small data: raise num_epochs until num_epochs x training "
                                  "rows >= this (validating after each epoch, early "
                                  "stopping by --patience, the best checkpoint kept; "
                                  "from the second pass on, --interaction_lr divided by the "
                                  "same factor, not below --lr); 0 = off")
    patience: int = flag(5, "stop after this many validations without a better AUC "
                         "(0 = run every epoch)")
    seed: int = flag(42, "random seed")
    device: str = flag("auto", "device: auto (cuda when available), cpu, cuda or cuda:N")
    num_workers: int = flag(16, "DataLoader workers (training, validation and inference)")
    buffer_batches: int = flag(20, "shuffle buffer, in batches")
    train_ratio: float = flag(1.0, "fraction of the training rows to use, the head (never moves "
                              "rows into validation)")
    valid_ratio: float = flag(0.1, "fraction of the rows (the tail, cutting a row group where "
                              "needed) used for validation")
    eval_every_n_steps: int = flag(0, "also validate every N steps (0 = at epoch end only)")
    save_every_n_steps: int = flag(0, "also save a resumable checkpoint every N steps, without "
                                   "validating (0 = at validations only)")
    keep_last: int = flag(0, "keep only the N newest checkpoints (the best is never deleted; "
                          "0 = keep all)")
    resume: str = flag("", "continue an interrupted run: 'latest' (also --resume alone) = the "
                       "newest complete checkpoint in --ckpt_dir, if any; or a checkpoint folder",
                       env="TRAIN_RESUME", const="latest")
    check_data: str = flag("off", "decode every needed column of every row group up front "
                           "(with the workers) and report all damaged ones in one table: "
                           "'first' = then train if nothing is damaged, 'only' = then stop",
                           choices=("off", "first", "only"))
    loss_type: str = flag("bce", "training loss", choices=("bce", "focal"))
    focal_alpha: float = flag(0.1, "focal loss alpha")
    focal_gamma: float = flag(2.0, "focal loss gamma")
    grad_clip: float = flag(1.0, "max gradient norm over the dense parameters (0 = off)")
    sparse_lr: float = flag(0.05, "Adagrad learning rate (embedding tables)")
    sparse_weight_decay: float = flag(0.0, "Adagrad weight decay (embedding tables)")
    reinit_sparse_after_epoch: int = flag(1, "re-initialise high-cardinality tables after "
                                          "every epoch >= this one, except the last "
                                          "(0 = never)")
    reinit_cardinality_threshold: int = flag(0, "tables with vocab > threshold are "
                                             "re-initialised; 0 re-initialises every feature "
                                             "table")
    ema_decay: float = flag(0.0, "EMA decay of the weights (0 = off)")
    ema_start_epoch: int = flag(3, "1-based epoch at which the EMA starts")
    swa_start_frac: float = flag(0.0, "stochastic weight averaging: an equal-weight average of "
                                 "the weights from this fraction of the run's steps on, "
                                 "validated beside the raw weights like the EMA (in its "
                                 "place; 0 = off)")
    swa_every_n_steps: int = flag(5, "SWA averages one step in this many")
    use_bf16_train: bool = flag(False, "bf16 autocast for the training forward pass where "
                                "this device runs bf16 fast (CUDA >= 8.0, CPUs with "
                                "AVX512-BF16 or AMX); float32 elsewhere, and the log says why")
    train_precision: str = flag("auto", "training precision: 'auto' = --use_bf16_train's rule; "
                                "'bf16' or 'float32' force it. train_config.json records the "
                                "precision actually used in place of 'auto'",
                                choices=("auto", "bf16", "float32"))
    compile: bool = flag(False, "torch.compile the model for training (fixed-shape path: one "
                         "length bucket, dense table gradients; compiles again for each new "
                         "history shape, see --seq_pad_multiple)", negate="no_compile")
    seq_pad_multiple: int = flag(0, "pad each batch's history lengths up to a multiple of N "
                                 "(at most the domain's --seq_max_lens; N >= the longest = one "
                                 "fixed shape) so that --compile meets a few shapes, not one "
                                 "per batch; 0 = trimmed to the batch's longest history")
    inference_dtype: str = flag("float32", "dtype for validation and inference",
                                choices=("float32",))
    experiment_name: str = flag("baseline", "recorded in train_config.json")
    preset: str = flag("", "start from a named configuration (PRESETS: 'seed' = run.sh, "
                       "'baseline' = the official baseline, 'recommended' = the seed with the "
                       "explicit interactions of issue 17 and more passes on small data); "
                       "flags given explicitly win",
                       choices=("",) + tuple(sorted(PRESETS)))


@dataclass
class InferConfig:
    """Inference paths (the platform sets the environment variables; locally, flags)."""
    model_dir: Optional[str] = flag(None, "checkpoint folder (a global_step* folder, or a "
                                    "checkpoint root with best_checkpoint.json)",
                                    env="MODEL_OUTPUT_PATH")
    data_dir: Optional[str] = flag(None, "folder of test *.parquet (may hold schema.json)",
                                   env="EVAL_DATA_PATH")
    result_dir: Optional[str] = flag(None, "output folder of predictions.json (created)",
                                     env="EVAL_RESULT_PATH")
    score: bool = flag(False, "read labels from the parquet and print the AUC (and, on demo "
                       "data, the oracle AUC and the effect capture)")


@dataclass
class RunConfig:
    """How a command line reports the project's errors."""
    debug: bool = flag(False, "show the traceback of data, schema, config and checkpoint "
                       "errors too (env PCVR_DEBUG=1 does the same)")


SECTIONS: Tuple[type, ...] = (DataConfig, ModelConfig, DecouplingConfig, TrainConfig)
# Sections that inference needs back from train_config.json, strictly.
REBUILD_SECTIONS: Tuple[type, ...] = (DataConfig, ModelConfig, DecouplingConfig)


@dataclass
class Config:
    """All sections together; ``cfg.model.d_model`` etc."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decoupling: DecouplingConfig = field(default_factory=DecouplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTION_ATTR = {DataConfig: "data", ModelConfig: "model", DecouplingConfig: "decoupling",
                 TrainConfig: "train"}


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def add_section_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one argparse option per field of dataclass ``cls`` (booleans get a --no_* twin)."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        tp = _field_type(cls, f)
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help
        if "env" in f.metadata:
            help_text += f" (env {f.metadata['env']})"
        if tp is bool:
            neg = f.metadata.get("negate") or "no_" + (
                f.name[len("use_"):] if f.name.startswith("use_") else f.name)
            group.add_argument(f"--{f.name}", dest=f.name, action="store_true",
                               default=f.default, help=f"{help_text} (default {f.default})")
            group.add_argument(f"--{neg}", dest=f.name, action="store_false",
                               help=f"turn off --{f.name}")
        else:
            extra = {"nargs": "?", "const": f.metadata["const"]} if "const" in f.metadata else {}
            group.add_argument(f"--{f.name}", dest=f.name, type=tp, default=f.default,
                               choices=f.metadata.get("choices"),
                               help=f"{help_text} (default {f.default!r})", **extra)


def build_parser(sections: Iterable[type] = SECTIONS,
                 description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    for cls in sections:
        add_section_args(parser, cls)
    return parser


def section_from_namespace(cls: Type[T], ns: argparse.Namespace) -> T:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


def env_values(sections: Iterable[type],
               environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Field name -> value of every field of ``sections`` whose ``env`` variable is set."""
    environ = os.environ if environ is None else environ
    return {f.name: environ[f.metadata["env"]] for cls in sections
            for f in dataclasses.fields(cls) if environ.get(f.metadata.get("env", ""))}


def parse_config(argv: Optional[List[str]] = None,
                 environ: Optional[Mapping[str, str]] = None) -> Config:
    """Parses the CLI: a ``--preset``'s values first, then the flags given, then environment
    variables named by a field's ``env``, each overriding the one before."""
    parser = build_parser(SECTIONS + (RunConfig,), description="Train the PCVR HyFormer model.")
    preset, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS.get(preset.preset, {}))
    ns = parser.parse_args(argv)
    for name, value in env_values(SECTIONS, environ).items():  # the platform's variables win
        setattr(ns, name, value)
    return Config(**{_SECTION_ATTR[c]: section_from_namespace(c, ns) for c in SECTIONS})


def to_flat_dict(cfg: Config) -> Dict[str, Any]:
    """One flat dict of every field of every section (the train_config.json layout)."""
    out: Dict[str, Any] = {}
    for cls in SECTIONS:
        out.update(dataclasses.asdict(getattr(cfg, _SECTION_ATTR[cls])))
    return out


def from_flat_dict(d: Mapping[str, Any], source: str = "train_config.json",
                   sections: Iterable[type] = REBUILD_SECTIONS,
                   derived: Iterable[str] = ()) -> Config:
    """Rebuilds the sections inference needs, strictly.

    Every field of ``sections`` must be present (a missing key is an error naming it), and
    every key must be a known field of some section or one of ``derived`` (keys recorded
    beside the flags, checked by their owner); an unknown key is an error too, since it means
    the checkpoint came from a different version of the code. Training-only fields are taken
    when present and defaulted otherwise.
    """
    sections = tuple(sections)
    known = {f.name for c in SECTIONS for f in dataclasses.fields(c)} | set(derived)
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; the checkpoint was written by "
                          f"a different version of this code")
    cfg = Config()
    for cls in SECTIONS:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                kwargs[f.name] = d[f.name]
            elif cls in sections and not f.metadata.get("added_later"):
                raise ConfigError(f"{source}: missing key '{f.name}' "
                                  f"({cls.__name__}); cannot rebuild the model strictly")
        setattr(cfg, _SECTION_ATTR[cls], cls(**kwargs))
    return cfg


def parse_int_list(text: str) -> List[int]:
    """'61, 87' -> [61, 87]; '' -> []."""
    return [int(x) for x in str(text).replace(" ", "").split(",") if x]


def parse_seq_max_lens(text: str) -> Dict[str, int]:
    """'seq_a:256,seq_b:256' -> {'seq_a': 256, 'seq_b': 256}; raises ValueError when malformed."""
    out: Dict[str, int] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition(":")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) <= 0:
            raise ConfigError(f"--seq_max_lens: bad entry {part!r}; expected 'domain:positive_int'")
        out[name.strip()] = int(value)
    return out
