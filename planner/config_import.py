"""Reading the configs users arrive with: a Chronos training YAML or a Hugging Face T5 config.json.

Parsed safely (yaml.safe_load, a size limit, a schema check); every problem is one ValueError naming the
key and what is allowed. Keys that do not affect sizing are reported as ignored, never silently dropped.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from model.config import ARCHITECTURES, ChronosMoEConfig, make_config
from model.presets import DIMENSION_FIELDS, PRESETS, dims_from_hf_config
from planner.workload import CONTEXT_LENGTH, NUM_SAMPLES, PREDICTION_LENGTH, Workload

MAX_CONFIG_BYTES = 1_000_000  # a training config is a few KB; anything this large is not one
MAX_SHOWN_CHARS = 60  # of a value echoed in an error message
MAX_NUMBER_DIGITS = 30  # no setting needs more; Python refuses to convert past 4,300


def shown_text(text: str) -> str:
    """`text` cut to MAX_SHOWN_CHARS (a parser's message can quote a whole hostile line)."""
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "…"


def shown(value: Any) -> str:
    """`value` as an error message quotes it: its repr, cut short (a hostile file's value can be huge)."""
    return shown_text(repr(value))


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load without what no training config needs and a hostile file abuses: anchors and aliases
    (nested aliases expand exponentially: a 400-byte file becomes gigabytes), duplicate keys (silently the
    last would win) and numbers too long to be settings."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None) is not None:
            mark = self.peek_event().start_mark
            raise ValueError(f"training YAML uses an anchor or alias (&name / *name) at line {mark.line + 1}; "
                             f"write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: SafeLoader refuses it with its own message
            if key in seen:
                raise ValueError(f"training YAML sets {shown(key)} twice (line {key_node.start_mark.line + 1}); "
                                 f"keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        digits = sum(ch.isdigit() for ch in str(node.value))
        if digits > MAX_NUMBER_DIGITS:
            raise ValueError(f"training YAML has a {digits}-digit number at line {node.start_mark.line + 1}; "
                             f"no setting is that large")
        return super().construct_yaml_int(node)


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)

# model_id (last path part, lower case) -> preset. Chronos-T5 checkpoints and the T5-efficient
# backbones they were trained from name the same sizes.
_MODEL_ID_SIZES = {
    **{f"chronos-t5-{size}": size for size in ("tiny", "mini", "small", "base", "large")},
    **{f"t5-efficient-{size}": size for size in ("tiny", "mini", "small", "base", "large")},
}

# Chronos training YAML keys the planner reads.
_SIZING_KEYS = {
    "model_id", "model_type", "context_length", "prediction_length", "n_tokens", "use_moe", "num_experts",
    "num_active_experts", "router_hidden_dim", "load_balancing_weight", "expert_capacity", "shared_layers",
    "moe_architecture", "per_device_train_batch_size", "gradient_accumulation_steps", "num_samples",
    "optim", "bf16", "fp16", "tf32", "torch_dtype", "max_steps", "torch_compile",
}
# 8-bit AdamW as the Hugging Face Trainer names it (bitsandbytes); other 8-bit optimizers are refused.
_ADAMW_8BIT = {"adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit"}


@dataclass(frozen=True)
class ImportedConfig:
    """What a file says: the model, the workload, and what was not used."""

    size: str
    config: ChronosMoEConfig
    workload: Workload
    gradient_accumulation_steps: int = 1
    ignored_keys: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""
    max_steps: Optional[int] = None  # a training run's optimizer steps
    tf32: bool = False  # fp32 matmuls in TF32 (Chronos' training configs set it)
    torch_compile: bool = False

    @property
    def run_precision(self) -> str:
        """The training run's precision (planner.cost.training.PRECISIONS): autocast wins over TF32."""
        return "tf32" if self.tf32 and self.workload.precision == "fp32" else self.workload.precision


def size_for_model_id(model_id: str) -> str:
    """The preset a model_id names; a clear error listing the presets otherwise."""
    name = str(model_id).rstrip("/").split("/")[-1].lower()
    if name in PRESETS:
        return name
    if name in _MODEL_ID_SIZES:
        return _MODEL_ID_SIZES[name]
    known = ", ".join(f"{p}" for p in PRESETS if p != "debug")
    raise ValueError(
        f"model_id {shown(model_id)} is not a known Chronos-T5 size; use one of {known} "
        f"(e.g. amazon/chronos-t5-small or google/t5-efficient-small), or upload its config.json"
    )


def _read_text(source: Union[str, bytes, Path]) -> str:
    if isinstance(source, Path):
        if not source.is_file():
            raise ValueError(f"config file {str(source)!r} does not exist")
        if source.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"config file is larger than {MAX_CONFIG_BYTES:,} bytes; is it really a config?")
        source = source.read_bytes()
    if isinstance(source, bytes):
        if len(source) > MAX_CONFIG_BYTES:
            raise ValueError(f"config file is larger than {MAX_CONFIG_BYTES:,} bytes; is it really a config?")
        try:
            source = source.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not content
        except UnicodeDecodeError:
            raise ValueError("config file is not UTF-8 text") from None
    if len(source) > MAX_CONFIG_BYTES:
        raise ValueError(f"config file is larger than {MAX_CONFIG_BYTES:,} bytes; is it really a config?")
    return source.removeprefix("\ufeff")


def _integer(settings: Mapping[str, Any], key: str, default: Optional[int]) -> Optional[int]:
    value = settings.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {shown(value)}")
    return value


def _flag(settings: Mapping[str, Any], key: str) -> bool:
    """A true/false setting; a string such as "false" is refused, not read as true."""
    value = settings.get(key, False)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {shown(value)}")
    return bool(value)


def _training_precision(settings: Mapping[str, Any]) -> str:
    bf16, fp16 = _flag(settings, "bf16"), _flag(settings, "fp16")
    if bf16 and fp16:
        raise ValueError("bf16 and fp16 are both true; a run trains in one of them")
    return "amp_bf16" if bf16 else "amp_fp16" if fp16 else "fp32"


def _optimizer(settings: Mapping[str, Any]) -> str:
    name = settings.get("optim", "adamw_torch")
    if not isinstance(name, str):
        raise ValueError(f"optim must be an optimizer name such as adamw_torch, got {shown(name)}")
    name = name.lower()
    if name in _ADAMW_8BIT:
        return "adamw_8bit"
    if "8bit" in name:
        raise ValueError(f"optim {shown(name)}: of the 8-bit optimizers the planner sizes only AdamW "
                         f"({', '.join(sorted(_ADAMW_8BIT))}); use one of those or a 32-bit optimizer")
    if name.startswith("adamw"):
        return "adamw"
    if name.startswith("adam"):
        return "adam"
    if name.startswith("sgd"):
        return "sgd_momentum"
    raise ValueError(f"optim {shown(name)} is not one the planner sizes; allowed: adamw*, adam*, sgd")


def import_training_yaml(source: Union[str, bytes, Path], *, num_samples: int = NUM_SAMPLES) -> ImportedConfig:
    """A Chronos training YAML (the fields of chronos' train.py plus the MoE settings)."""
    text = _read_text(source)
    try:
        settings = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader, stricter
    except RecursionError:
        raise ValueError("training YAML is nested too deeply to be a training config") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(error, "problem", None) or error).split())  # one line
        raise ValueError(f"training YAML could not be parsed{where}: {shown_text(problem)}") from None
    if not isinstance(settings, Mapping):
        raise ValueError("training YAML must be a mapping of keys to values (key: value lines)")
    if "model_id" not in settings:
        raise ValueError("training YAML needs model_id (e.g. google/t5-efficient-small)")
    if settings.get("model_type", "seq2seq") != "seq2seq":
        raise ValueError(f"model_type must be seq2seq for Chronos-T5, got {shown(settings['model_type'])}")

    size = size_for_model_id(settings["model_id"])
    use_moe = _flag(settings, "use_moe")
    architecture = settings.get("moe_architecture") or "shared_then_expert"
    if architecture not in ARCHITECTURES:
        raise ValueError(f"moe_architecture must be one of {', '.join(ARCHITECTURES)}, got {shown(architecture)}")
    num_experts = _integer(settings, "num_experts", 8) if use_moe else 0
    if use_moe and num_experts < 1:
        raise ValueError(f"num_experts must be ≥ 1 when use_moe is true (got {num_experts}); "
                         f"for a dense model set use_moe: false")
    with _short_messages():
        config = _make_config_from_yaml(size, settings, architecture, num_experts, use_moe)
        workload = _workload_from_yaml(settings, num_samples)
    accumulation = _integer(settings, "gradient_accumulation_steps", 1)
    if accumulation < 1:
        raise ValueError(f"gradient_accumulation_steps must be ≥ 1, got {accumulation}")
    max_steps = _integer(settings, "max_steps", None)
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be ≥ 1, got {max_steps}")
    flags = {key: _flag(settings, key) for key in ("tf32", "torch_compile")}
    ignored = tuple(sorted(str(key) for key in settings if key not in _SIZING_KEYS))
    return ImportedConfig(size, config, workload, accumulation, ignored, source="training YAML",
                          max_steps=max_steps, **flags)


@contextmanager
def _short_messages():
    """A config's own checks quote the value they refuse in full: cut such a message short."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        raise ValueError(message if len(message) <= 300 else message[:300] + "…") from None


def _make_config_from_yaml(size, settings, architecture, num_experts, use_moe) -> ChronosMoEConfig:
    return make_config(
        size,
        architecture=architecture,
        num_experts=num_experts,
        top_k=_integer(settings, "num_active_experts", 2),
        router_hidden_dim=_integer(settings, "router_hidden_dim", 256),
        vocab_size=_integer(settings, "n_tokens", 4096),
        load_balancing_weight=settings.get("load_balancing_weight", 0.01),
        expert_capacity=settings.get("expert_capacity") if use_moe else None,
        shared_layers=settings.get("shared_layers"),
    )


def _workload_from_yaml(settings: Mapping[str, Any], num_samples: int) -> Workload:
    return Workload(
        batch_size=_integer(settings, "per_device_train_batch_size", 32),
        context_length=_integer(settings, "context_length", CONTEXT_LENGTH),
        prediction_length=_integer(settings, "prediction_length", PREDICTION_LENGTH),
        num_samples=_integer(settings, "num_samples", num_samples),
        optimizer=_optimizer(settings),
        precision=_training_precision(settings),
    )


def _json_integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise ValueError(f"config.json has a {len(text.lstrip('-'))}-digit number; no T5 setting is that large")
    return int(text)


def import_hf_config_json(source: Union[str, bytes, Path], **moe_settings: Any) -> ImportedConfig:
    """A Hugging Face T5 config.json: custom backbone dimensions; MoE settings come from the caller."""
    text = _read_text(source)
    try:
        settings = json.loads(text, parse_int=_json_integer)
    except RecursionError:
        raise ValueError("config.json is nested too deeply to be a T5 config") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"config.json is not valid JSON: {error.msg} (line {error.lineno})") from None
    if not isinstance(settings, Mapping):
        raise ValueError("config.json must hold a JSON object of T5 settings")
    model_type = settings.get("model_type", "t5")
    if model_type not in ("t5", "mt5", "umt5"):
        raise ValueError(f"config.json model_type must be t5 (a T5 encoder-decoder), got {model_type!r}")
    with _short_messages():
        dims = dims_from_hf_config(settings)
        config = make_config("custom", vocab_size=dims.vocab_size,
                             **{name: getattr(dims, name) for name in DIMENSION_FIELDS}, **moe_settings)
    used = {*DIMENSION_FIELDS, "vocab_size", "model_type"}
    ignored = tuple(sorted(str(key) for key in settings if key not in used))
    return ImportedConfig("custom", config, Workload(), 1, ignored, source="config.json")


def import_config_file(path: Union[str, Path], **moe_settings: Any) -> ImportedConfig:
    """By extension: .json is a Hugging Face config.json, .yaml/.yml a Chronos training YAML."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return import_hf_config_json(path, **moe_settings)
    if suffix in (".yaml", ".yml"):
        return import_training_yaml(path)
    raise ValueError(f"config file must be .json (Hugging Face config.json) or .yaml/.yml (training YAML), got {path.name!r}")
