"""Model assembly: the one function that builds a model from a config and a feature layout.

Training, inference, the benchmarks and the tests all call ``build_model``, so a model is
always built from the same inputs: the flags of ``Config`` (its model, data and decoupling
sections), the ``FeatureLayout`` of the schema, and the NS groups.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional

from pcvr.config import Config
from pcvr.errors import ConfigError
from pcvr.model.hyformer import PCVRHyFormer
from pcvr.model.inputs import NSGroups
from pcvr.schema import FeatureLayout

log = logging.getLogger(__name__)


def load_ns_groups(path: str) -> Dict[str, Any]:
    """Reads an ns_groups.json; ``''`` or a missing file -> ``{}`` (one group per feature).

    Raises:
        ConfigError: the file is not valid JSON (naming the file).
    """
    if not path:
        return {}
    if not os.path.isfile(path):
        log.warning("ns_groups_json %s not found: one NS group per feature", path)
        return {}
    with open(path, "r", encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def build_model(cfg: Config, layout: FeatureLayout,
                ns_groups: Optional[NSGroups] = None) -> PCVRHyFormer:
    """Builds the PCVR HyFormer of ``cfg`` for ``layout``.

    Args:
        cfg: the configuration (``cfg.model``, ``cfg.decoupling`` and the data flag
            ``user_abs_time_missing_as_padding`` shape the model).
        layout: the feature layout of the batches (``schema.load_layout``).
        ns_groups: the parsed NS groups; None reads ``cfg.model.ns_groups_json``
            (``load_ns_groups``), ``{}`` means one group per feature.
    Returns:
        The model, in float32 on the CPU, in training mode.
    """
    if ns_groups is None:
        ns_groups = load_ns_groups(cfg.model.ns_groups_json)
    try:
        return PCVRHyFormer(layout, cfg.model, cfg.decoupling, ns_groups,
                            user_time_missing_as_padding=cfg.data.user_abs_time_missing_as_padding)
    except ConfigError:
        raise
    except (ValueError, KeyError) as exc:  # flags that do not fit each other or the schema
        raise ConfigError(f"the model cannot be built: {exc.args[0] if exc.args else exc}") \
            from exc
