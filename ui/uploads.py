"""An uploaded config file (or a solver's candidate), turned into sidebar widget values.

The parsing and its checks (yaml.safe_load, a size limit, a schema check, one ValueError naming the key)
are the planner's (planner.config_import); this module only maps what it read onto the sidebar's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from model.config import ChronosMoEConfig
from model.presets import DIMENSION_FIELDS
from planner.config_import import (
    MAX_CONFIG_BYTES,
    ImportedConfig,
    import_hf_config_json,
    import_training_yaml,
)

# Streamlit's uploader counts whole megabytes; the planner's byte limit is checked again on the bytes.
MAX_UPLOAD_MB = max(1, MAX_CONFIG_BYTES // 1_000_000)


@dataclass(frozen=True)
class UploadResult:
    """Widget key -> value to set, and one line telling the user what was read and what was ignored."""

    values: dict[str, Any]
    summary: str


def _custom_size_values(imported: ImportedConfig) -> dict[str, Any]:
    dims = imported.config.dims
    # The uploaded model replaces the preset sizes in the grid; the user can add presets back.
    return {"custom": True, "sizes": [], "vocab_size": dims.vocab_size,
            **{name: getattr(dims, name) for name in DIMENSION_FIELDS}}


def _training_values(imported: ImportedConfig) -> dict[str, Any]:
    config, workload = imported.config, imported.workload
    values: dict[str, Any] = {
        "sizes": [imported.size],
        "custom": False,
        "vocab_size": config.dims.vocab_size,
        "context_length": workload.context_length,
        "prediction_length": workload.prediction_length,
        "batch_size": workload.batch_size,
        "num_samples": workload.num_samples,
        "optimizer": workload.optimizer,
        "precision": workload.precision,
        "experts": "0",
    }
    if config.is_moe:
        values.update(moe_values(config))
    return values


def moe_values(config: ChronosMoEConfig) -> dict[str, Any]:
    """The sidebar's MoE widgets for one MoE config (also how the Budget tab opens a candidate in Plan)."""
    return {
        "architectures": [config.architecture],
        "experts": f"0, {config.num_experts}",  # the dense model stays in the grid as the baseline
        "top_k": config.top_k,
        "router_hidden_dim": config.router_hidden_dim,
        "expert_capacity": config.expert_capacity,
    }


def _summary(name: str, imported: ImportedConfig) -> str:
    config = imported.config
    model = f"{imported.size} {config.label}" if imported.size != "custom" else f"custom d_model {config.dims.d_model}"
    text = f"{name}: {model}"
    if imported.gradient_accumulation_steps > 1:
        text += f"; gradient accumulation {imported.gradient_accumulation_steps} (memory is per step)"
    if imported.ignored_keys:
        text += f". Ignored (not about size): {', '.join(imported.ignored_keys)}"
    return text


def read_upload(name: str, data: bytes, *, num_samples: int = 20) -> UploadResult:
    """Widget values from a config.json (custom size) or a Chronos training YAML; ValueError if unusable.

    `num_samples` is kept unless the YAML sets it (training configs rarely do).
    """
    suffix = PurePath(name).suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"file must be a config.json or a training .yaml/.yml, got {name!r}")
    if suffix == ".json":
        imported = import_hf_config_json(data)
        values = _custom_size_values(imported)
    else:
        imported = import_training_yaml(data, num_samples=num_samples)
        values = _training_values(imported)
    return UploadResult(values=values, summary=_summary(name, imported))
