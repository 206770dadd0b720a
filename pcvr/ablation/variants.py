"""The table's rows: ``Variant``, the default and quick sets, and reading them from text."""
from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from typing import List, Sequence, Tuple


@dataclass(frozen=True)
class Variant:
    """One row of the table: train.py flags added to the base.

    Attributes:
        name: the row's label (``base`` is the reference every delta is taken against).
        flags: the flags, as a train.py command line would list them.
        seed_report: what the seed's log reported for this feature (README comparison).
    """
    name: str
    flags: Tuple[str, ...] = ()
    seed_report: str = ""


BASE = Variant("base", (), "0.811 -> 0.8309 in total")
# Each seed feature off (its report is the gain the seed's log gave for adding it).
SEED_FEATURES_OFF: Tuple[Variant, ...] = (
    Variant("-abs_time", ("--no_abs_time_emb",), "+0.012"),
    Variant("-activity_dense", ("--no_user_activity_dense",), "+0.0005"),
    Variant("-pair_62_66", ("--no_pair_62_66",), "+0.06 (as written)"),
    Variant("-bf16_train", ("--no_bf16_train",), "not scored (with EMA: 'implemented wrong, "
                                                 "gain ~1e-4')"),
)
# Each experimental option on (the seed's code has them, its run.sh leaves them off).
EXPERIMENTAL_ON: Tuple[Variant, ...] = (
    Variant("+ns_se_gate", ("--use_ns_se_gate",), "+0.002 (with NS self-attention)"),
    Variant("+ns_self_attn", ("--use_ns_self_attn",), "+0.002 (with the SE gate)"),
    Variant("+combined_autoint", ("--use_combined_autoint",), "not scored"),
    Variant("+target_attention", ("--use_target_attention",), "negative"),
    Variant("+head_cross", ("--head_cross_layers", "2"), "negative"),
    Variant("+dense_cross_token", ("--use_dense_cross_token", "--user_ns_tokens", "4"),
            "large drop"),
    Variant("+randomized_split", ("--randomized_split",), "negative"),
    Variant("+ema", ("--ema_decay", "0.999", "--ema_start_epoch", "1"),
            "'implemented wrong', ~1e-4"),
    # issue 17's options
    Variant("+swa", ("--swa_start_frac", "0.5"), "new (issue 17)"),
    Variant("+field_cross", ("--use_field_cross", "--interaction_lr", "3e-3"),
            "new (issue 17)"),
    Variant("+pair_target_attn", ("--use_pair_target_attn", "--interaction_lr", "3e-3"),
            "new (issue 17)"),
    Variant("recommended", ("--preset", "recommended"),
            "new (issue 17): both of the above + --use_history_fields"),
)
DEFAULT_VARIANTS: Tuple[Variant, ...] = (BASE,) + SEED_FEATURES_OFF + EXPERIMENTAL_ON
QUICK_VARIANTS: Tuple[Variant, ...] = (BASE, SEED_FEATURES_OFF[2], EXPERIMENTAL_ON[-1])


def parse_variant(text: str) -> Variant:
    """``'NAME=FLAGS'`` (or ``'NAME: FLAGS'``) -> a ``Variant``; ``'base'`` alone is the base.

    Raises:
        ValueError: no name.
    """
    m = re.search(r"[=:]", text)
    name, flags = (text[:m.start()], text[m.end():]) if m else (text, "")
    name = name.strip()
    if not name:
        raise ValueError(f"variant {text!r}: expected NAME=FLAGS")
    return Variant(name, tuple(shlex.split(flags)))


def load_variants(spec: str) -> List[Variant]:
    """``'default'``, ``'quick'``, or a file of one ``NAME=FLAGS`` line per variant (``#``
    comments; a line ``base`` or ``base=`` is the base, added first when missing)."""
    if spec == "default":
        return list(DEFAULT_VARIANTS)
    if spec == "quick":
        return list(QUICK_VARIANTS)
    with open(spec, "r", encoding="utf-8") as fh:
        out = [parse_variant(line.strip()) for line in fh
               if line.strip() and not line.lstrip().startswith("#")]
    return with_base(out)


def with_base(variants: Sequence[Variant]) -> List[Variant]:
    """The variants with the base first (added when missing); duplicate names refused."""
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate variant names: {dup}")
    base = [v for v in variants if v.name == BASE.name]
    rest = [v for v in variants if v.name != BASE.name]
    return [dataclasses.replace(base[0], flags=base[0].flags) if base else BASE] + rest
