"""Upcycling: an MoE of the family built from a dense Chronos-T5 checkpoint (architecture.md §6).

The dense weights are copied, never shared: the upcycled model owns its tensors. What each architecture gets:

- Shared parts (embedding, encoder, decoder, their norms and relative-position biases): copied as they are.
- token_ffn: every expert FFN (wi, wo) of an MoE block is a copy of that block's dense FFN.
- expert_only: every expert encoder is a copy of the dense encoder stack; every expert LM head is the tied
  embedding times D^-0.5. T5's tied head rescales the decoder output by D^-0.5 before projecting; the
  experts' untied heads read the decoder output unscaled (experts.py), so the factor is folded into their
  weights: (W·D^-0.5)·h = W·(h·D^-0.5).
- shared_then_expert: see `upcycle` for what its heads keep and what they cannot.

Identical experts whose routing weights sum to 1 give the dense output whatever the router picks, so
token_ffn and expert_only equal the dense model at initialisation (eval mode, and for token_ffn no
`expert_capacity`: a capacity drops overflow tokens, which then skip the FFN the dense model runs).

Letters: D d_model, F d_ff, V vocabulary, E experts.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import T5ForConditionalGeneration

from .build import build_model_from_config
from .checks import SettingError, check_int
from .chronos_moe import ChronosMoEModel
from .config import MAX_EXPERTS, ChronosMoEConfig, make_config
from .presets import (
    DIMENSION_FIELDS,
    LAYER_NORM_EPSILON,
    PRESETS,
    RELATIVE_ATTENTION_MAX_DISTANCE,
    RELATIVE_ATTENTION_NUM_BUCKETS,
    BackboneDims,
    dims_from_hf_config,
)

ROUTER_INITS = ("normal", "zero")
ROUTER_INIT_STD = 0.02  # "small": router logits start within a few hundredths of each other
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what save_pretrained writes, new and old
MAX_CONFIG_BYTES = 1_000_000  # a T5 config.json is about 1 KB
SHOWN_CHARS = 120  # of a library's error message quoted in ours

# T5 settings the family fixes (build.t5_config), with T5Config's defaults where config.json omits them.
# Weights from a checkpoint with other values would compute something else in our backbone.
FAMILY_T5_SETTINGS = {
    "feed_forward_proj": ("relu", "relu"),
    "tie_word_embeddings": (True, True),
    "relative_attention_num_buckets": (RELATIVE_ATTENTION_NUM_BUCKETS, 32),
    "relative_attention_max_distance": (RELATIVE_ATTENTION_MAX_DISTANCE, 128),
    "layer_norm_epsilon": (LAYER_NORM_EPSILON, 1e-6),
}
# Names under which T5 also reaches its tied embedding; checkpoints may or may not carry them.
TIED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
DENSE_FFN_WEIGHT = re.compile(r"(?P<stack>encoder|decoder)\.block\.(?P<block>\d+)\.(?P<ffn>layer\.\d+\.DenseReluDense)"
                              r"\.(?P<linear>wi|wo)\.weight")

# make_config's keyword settings that upcycle passes on (the rest it sets itself from the checkpoint).
MOE_SETTINGS = tuple(name for name, parameter in inspect.signature(make_config).parameters.items()
                     if parameter.kind is inspect.Parameter.KEYWORD_ONLY
                     and name not in ("architecture", "num_experts", "top_k", "vocab_size"))

DenseSource = Union[str, os.PathLike, ChronosMoEModel, T5ForConditionalGeneration]


def upcycle(
    source: DenseSource,
    *,
    architecture: str,
    num_experts: int,
    top_k: int = 2,
    router_init: str = "normal",
    size: Optional[str] = None,
    trainable: str = "all",
    **settings: Any,
) -> ChronosMoEModel:
    """An MoE ChronosMoEModel (in training mode, fp32, on the CPU) whose weights come from a dense Chronos-T5.

    `source`: a directory in Hugging Face layout (config.json + model.safetensors or pytorch_model.bin, as
    `save_pretrained` writes and amazon/chronos-t5-* ship), a dense ChronosMoEModel, or a
    T5ForConditionalGeneration. The dimensions come from the source (`dims_from_hf_config`); `size`, when
    given, must name the preset they equal. `settings` are make_config's MoE settings (router_hidden_dim,
    dispatch, expert_capacity, encoder_moe_blocks, ...), not dimensions. `trainable` sets requires_grad by
    the fine-tuning regime (model.trainable): "all" continues training everything, "experts_and_router" keeps
    the copied backbone frozen.

    shared_then_expert: encoder, decoder and router input are the dense model's; each expert head starts as
    close to T5's head as its shape allows: fc2 weight and bias 0 (the MLP branch adds nothing, as in a
    zero-initialised residual; fc1 keeps its random init so fc2 gets gradients), LayerNorm weight 1 and bias
    0, lm_head = the tied embedding × D^-0.5. What differs: that LayerNorm is not T5's RMS norm and it
    follows the decoder's own final RMS norm, so the heads give (W·D^-0.5)·LN(h), LN(h) = (h − mean(h)) /
    sqrt(var(h) + 1e-5) over D per position, where the dense model gives (W·D^-0.5)·h. Each position's
    logits lose the component along mean(h) and are divided by its spread, which changes the distribution
    (the ranking too, as W·1 differs per token); no init with this head shape reproduces T5's exactly.

    Router: `router_init="normal"` (the default) draws the logit layer from N(0, 0.02²) with zero bias;
    "zero" sets it to 0 (uniform probabilities; ties go to the lowest expert indices). Either way the output
    at initialisation is as described above, since identical experts are mixed with weights summing to 1.
    "normal" is the default because identical experts need the router to tell them apart: with a zero
    router every row picks the same K experts (the lowest indices), and copies chosen alike get identical
    updates, so they and their router rows stay identical (sparse upcycling initialises its router randomly
    for the same reason). The ContextRouter's hidden layer
    keeps its random init in both cases.

    Every refusal is one SettingError line naming its field: `source` (missing directory, no config.json or
    weights, unreadable or mismatched weights, not a dense model), `model_type` and the T5 settings the family
    fixes, `size`, `router_init`, `num_experts`, and make_config's own (architecture, top_k, ...).
    """
    if not isinstance(router_init, str) or router_init not in ROUTER_INITS:
        raise SettingError("router_init", f"router_init must be one of {', '.join(ROUTER_INITS)}, got {router_init!r}")
    check_int("num_experts", num_experts, 1, MAX_EXPERTS)  # 0 would be the dense model itself
    for name in settings:
        if name in (*DIMENSION_FIELDS, "vocab_size"):
            raise SettingError(name, f"{name} comes from the dense checkpoint; remove it (size checks dimensions)")
        if name not in MOE_SETTINGS:
            raise SettingError(name, f"upcycle has no setting {name}; allowed: {', '.join(MOE_SETTINGS)}")
    dims, load_state = _open_dense(source)
    if size is not None:
        _check_size(size, dims)
    config = make_config("custom", architecture=architecture, num_experts=num_experts, top_k=top_k,
                         vocab_size=dims.vocab_size, **{name: getattr(dims, name) for name in DIMENSION_FIELDS},
                         **settings)
    model = build_model_from_config(config, trainable=trainable)
    with torch.no_grad():
        _copy_dense_weights(model, load_state())
        _init_new_parts(model, router_init)
    return model


def _check_size(size: object, dims: BackboneDims) -> None:
    """SettingError("size") unless `size` is the preset whose dimensions the checkpoint has (vocabulary aside)."""
    if not isinstance(size, str) or size not in PRESETS:
        raise SettingError("size", f"size must be one of {', '.join(PRESETS)} (or None: the checkpoint's "
                                   f"dimensions), got {str(size)[:40]!r}")
    differing = [f"{name} {getattr(dims, name)} (size {size}: {getattr(PRESETS[size], name)})"
                 for name in DIMENSION_FIELDS if getattr(dims, name) != getattr(PRESETS[size], name)]
    if differing:
        matching = [name for name, preset in PRESETS.items()
                    if all(getattr(dims, f) == getattr(preset, f) for f in DIMENSION_FIELDS)]
        hint = f"size {matching[0]} or None" if matching else "size None (its dimensions are no preset's)"
        raise SettingError("size", f"size {size} does not match the checkpoint: {', '.join(differing)}; give {hint}")


# --- reading the dense model -----------------------------------------------------------------------------

def _open_dense(source: object):
    """(dimensions, a function giving the dense state dict by T5ForConditionalGeneration names), all checked
    but the weights, which are read only once the MoE settings have passed."""
    if isinstance(source, ChronosMoEModel):
        if source.config.is_moe:
            raise SettingError("source", f"source must be a dense model (num_experts 0), got "
                                         f"{source.config.describe()}")
        _check_t5_settings(source.backbone.config.to_dict(), "the dense model's config")
        return source.config.dims, source.backbone.state_dict
    if isinstance(source, T5ForConditionalGeneration):
        settings = source.config.to_dict()
        _check_t5_settings(settings, "the T5 model's config")
        return dims_from_hf_config(settings), source.state_dict
    if not isinstance(source, (str, os.PathLike)):
        raise SettingError("source", "source must be a checkpoint directory (config.json + model.safetensors), a "
                                     f"dense ChronosMoEModel or a T5ForConditionalGeneration, got {type(source).__name__}")
    directory = Path(source)
    if not directory.is_dir():
        raise SettingError("source", f"source directory {str(directory)!r} does not exist (or is not a directory); "
                                     f"give one written by save_pretrained (config.json + model.safetensors)")
    settings = _read_config_json(directory / "config.json")
    _check_t5_settings(settings, "config.json")
    weights = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if weights is None:
        raise SettingError("source", f"source directory {str(directory)!r} has no weights: expected "
                                     f"{' or '.join(WEIGHT_FILES)} beside config.json")
    return dims_from_hf_config(settings), lambda: _read_weights(weights)


def _read_config_json(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise SettingError("source", f"source directory {str(path.parent)!r} has no config.json; give a directory "
                                     f"written by save_pretrained (config.json + model.safetensors)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise SettingError("source", f"source config.json is larger than {MAX_CONFIG_BYTES:,} bytes; is it a T5 config?")
    try:
        settings = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise SettingError("source", f"source config.json is not JSON: {_one_line(error)}") from None
    if not isinstance(settings, Mapping):
        raise SettingError("source", "source config.json must hold a JSON object of T5 settings")
    return settings


def _check_t5_settings(settings: Mapping[str, Any], where: str) -> None:
    """model_type t5 and the settings build.t5_config fixes; absent ones take T5Config's defaults."""
    model_type = settings.get("model_type")
    if model_type != "t5":
        raise SettingError("model_type", f"{where} model_type must be 't5' (a Chronos-T5 checkpoint), "
                                         f"got {str(model_type)[:40]!r}")
    for name, (allowed, default) in FAMILY_T5_SETTINGS.items():
        value = settings.get(name, default)
        if value != allowed:
            raise SettingError(name, f"{where} {name} must be {allowed!r} (Chronos-T5's, which the MoE backbone "
                                     f"uses), got {str(value)[:40]!r}")


def _read_weights(path: Path) -> Mapping[str, torch.Tensor]:
    # A damaged or foreign file fails in library-specific ways (SafetensorError, UnpicklingError, ...): one line.
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - see above
        raise SettingError("source", f"source {path.name} could not be read: {_one_line(error)}") from None
    if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise SettingError("source", f"source {path.name} does not hold a state dict of tensors")
    return state


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


# --- copying and initialising ---------------------------------------------------------------------------

def _destinations(config: ChronosMoEConfig, dense_name: str) -> list[str]:
    """Where one dense weight goes in the MoE model's state dict (several places for an expert's copy)."""
    experts = range(config.num_experts)
    if config.architecture == "expert_only" and dense_name.startswith("encoder."):
        return [f"experts.{e}.{dense_name}" for e in experts]
    ffn = DENSE_FFN_WEIGHT.fullmatch(dense_name)
    if ffn:
        moe_blocks = config.token_moe_encoder_blocks if ffn["stack"] == "encoder" else config.token_moe_decoder_blocks
        if int(ffn["block"]) in moe_blocks:
            prefix = f"backbone.{ffn['stack']}.block.{ffn['block']}.{ffn['ffn']}"
            return [f"{prefix}.experts.{e}.{ffn['linear']}.weight" for e in experts]
    return [f"backbone.{dense_name}"]


def _is_new(config: ChronosMoEConfig, name: str) -> bool:
    """True for the MoE model's weights no dense weight fills (routers, heads; the tied aliases)."""
    if name.removeprefix("backbone.") in TIED_ALIASES or name.startswith("router."):
        return True
    if config.architecture == "shared_then_expert":
        return name.startswith("experts.")
    if config.architecture == "expert_only":
        return re.fullmatch(r"experts\.\d+\.lm_head\.weight", name) is not None
    return name.endswith(".DenseReluDense.router.weight")


def _copy_dense_weights(model: ChronosMoEModel, dense_state: Mapping[str, torch.Tensor]) -> None:
    targets = model.state_dict()  # detached views of the model's own tensors
    filled, foreign = set(), []
    for dense_name, tensor in dense_state.items():
        if tensor.is_meta:
            raise SettingError("source", "source is on the meta device: it has shapes but no weights; build or "
                                         "load it on a real device")
        if dense_name in TIED_ALIASES:
            continue  # the same tensor as shared.weight (tie_word_embeddings is checked)
        names = _destinations(model.config, dense_name)
        if any(name not in targets for name in names):
            foreign.append(dense_name)
            continue
        for name in names:
            if targets[name].shape != tensor.shape:
                raise SettingError("source", f"source weight {dense_name} has shape {tuple(tensor.shape)}, but the source's "
                                             f"config gives {tuple(targets[name].shape)}")
            targets[name].copy_(tensor)
        filled.update(names)
    if foreign:
        raise SettingError("source", f"source checkpoint has {len(foreign)} weights a Chronos-T5 lacks (e.g. {foreign[0]}); "
                                     f"give a T5ForConditionalGeneration checkpoint (Chronos-Bolt is not one)")
    missing = [name for name in targets if name not in filled and not _is_new(model.config, name)]
    if missing:
        raise SettingError("source", f"source checkpoint lacks {len(missing)} weights of a Chronos-T5 (e.g. "
                                     f"{missing[0].removeprefix('backbone.')}); is it a complete T5 checkpoint?")


def _init_new_parts(model: ChronosMoEModel, router_init: str) -> None:
    config = model.config
    scaled_embedding = model.backbone.shared.weight * config.dims.d_model**-0.5  # (V, D)
    if config.architecture == "expert_only":
        for expert in model.experts:
            expert.lm_head.weight.copy_(scaled_embedding)
    elif config.architecture == "shared_then_expert":
        for head in model.experts:
            head.fc2.weight.zero_()
            head.fc2.bias.zero_()
            head.norm.reset_parameters()
            head.lm_head.weight.copy_(scaled_embedding)
    logit_layers: list[nn.Linear] = [layer.router for _, layer in model.token_moe_layers()]
    if model.router is not None:
        logit_layers.append(model.router.output)
    for layer in logit_layers:
        if router_init == "zero":
            layer.weight.zero_()
        else:
            layer.weight.normal_(0.0, ROUTER_INIT_STD)
        if layer.bias is not None:
            layer.bias.zero_()
