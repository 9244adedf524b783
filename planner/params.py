"""Exact parameter counts of every Chronos-MoE variant (architecture.md §1–3, conventions.md "Parameters").

Letters: D d_model, F d_ff, A = H·Dk attention width, H heads, V vocabulary, E experts, K top-k,
R router hidden width, Le/Ld encoder/decoder blocks, 4D the expert head's hidden width.

Unique tensors only: the tied LM head *is* the shared embedding (reachable as backbone.shared,
backbone.lm_head, and both stacks' embed_tokens), so it is counted once, under `embedding`.
T5 layer norms have a weight and no bias; T5 linears have no bias; buffers are not parameters.

Where the experts live:
- shared_then_expert: `expert_head` holds the E MoEExpertHeads (fc1, fc2, LayerNorm, lm_head).
- expert_only: there is no shared encoder (every `encoder_*` component is 0); `expert_encoder` holds the
  E copies of the T5 encoder stack, `expert_head` their E LM heads.
- token_ffn: `expert_ffn` holds the E expert FFNs of every MoE block, `router` the blocks' token routers;
  `encoder_ffn` / `decoder_ffn` keep only the dense blocks' FFNs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Optional

from model.checks import SettingError
from model.components import COMPONENTS, component_of_param
from model.config import ChronosMoEConfig
from model.presets import RELATIVE_ATTENTION_NUM_BUCKETS, BackboneDims
from model.trainable import EXPERT_COMPONENTS, nothing_trainable_message, trainable_components



def count_embedding_params(dims: BackboneDims) -> int:
    """Shared token embedding V·D, also the tied LM head."""
    return dims.vocab_size * dims.d_model


@dataclass(frozen=True)
class Linear:
    """One nn.Linear's shape: the unit every parameter count below is built from."""

    in_features: int
    out_features: int
    bias: bool

    @property
    def weight_params(self) -> int:
        """The matrix: what a matmul reads (and what autocast casts)."""
        return self.in_features * self.out_features

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features if self.bias else 0)


def attention_linears(dims: BackboneDims) -> tuple[Linear, ...]:
    """q, k, v Linear(D→A) and o Linear(A→D), no bias."""
    d, a = dims.d_model, dims.attention_width
    return (Linear(d, a, False),) * 3 + (Linear(a, d, False),)


def ffn_linears(dims: BackboneDims) -> tuple[Linear, ...]:
    """DenseReluDense wi Linear(D→F) and wo Linear(F→D), no bias (also one token-level expert)."""
    return Linear(dims.d_model, dims.d_ff, False), Linear(dims.d_ff, dims.d_model, False)


def lm_head_linear(dims: BackboneDims) -> Linear:
    """Linear(D→V), no bias: the tied head of the shared model, or an expert's own head."""
    return Linear(dims.d_model, dims.vocab_size, False)


def context_router_linears(config: ChronosMoEConfig) -> tuple[Linear, ...]:
    """ContextRouter: hidden Linear(D→R, bias), output Linear(R→E, bias)."""
    r = config.router_hidden_dim
    return Linear(config.dims.d_model, r, True), Linear(r, config.num_experts, True)


def token_router_linear(config: ChronosMoEConfig) -> Linear:
    """Token router of one token_ffn block: Linear(D→E, no bias)."""
    return Linear(config.dims.d_model, config.num_experts, False)


def expert_head_linears(config: ChronosMoEConfig) -> tuple[Linear, ...]:
    """One MoEExpertHead's linears: fc1 Linear(D→4D, bias), fc2 Linear(4D→D, bias), lm_head Linear(D→V)."""
    d, hidden = config.dims.d_model, config.expert_head_hidden_dim
    return Linear(d, hidden, True), Linear(hidden, d, True), lm_head_linear(config.dims)


def _params(linears: tuple[Linear, ...]) -> int:
    return sum(linear.params for linear in linears)


def count_attention_params(dims: BackboneDims) -> int:
    return _params(attention_linears(dims))


def count_ffn_params(dims: BackboneDims) -> int:
    return _params(ffn_linears(dims))


def count_position_bias_params(dims: BackboneDims) -> int:
    """Relative-attention bias Embedding(32, H), in block 0 of each stack only."""
    return RELATIVE_ATTENTION_NUM_BUCKETS * dims.num_heads


def count_encoder_stack_params(dims: BackboneDims) -> int:
    """One T5 encoder stack without embedding: Le × (attention + FFN + 2 norms) + final norm + position bias."""
    block = count_attention_params(dims) + count_ffn_params(dims) + 2 * dims.d_model
    return dims.num_layers * block + dims.d_model + count_position_bias_params(dims)


def count_context_router_params(config: ChronosMoEConfig) -> int:
    return _params(context_router_linears(config))


def count_token_router_params(config: ChronosMoEConfig) -> int:
    return token_router_linear(config).params


def count_expert_head_params(config: ChronosMoEConfig) -> int:
    """One MoEExpertHead: its linears and its LayerNorm(D) weight and bias."""
    return _params(expert_head_linears(config)) + 2 * config.dims.d_model


@dataclass(frozen=True)
class ParamBreakdown:
    """Parameters of one variant by component (see the module docstring), plus total and active per series."""

    embedding_params: int
    encoder_attention_params: int
    encoder_ffn_params: int
    encoder_norm_params: int
    encoder_position_bias_params: int
    decoder_self_attention_params: int
    decoder_cross_attention_params: int
    decoder_ffn_params: int
    decoder_norm_params: int
    decoder_position_bias_params: int
    router_params: int
    expert_encoder_params: int
    expert_ffn_params: int
    expert_head_params: int
    params_per_expert: int  # one expert's share of the expert components (all experts are the same shape)
    num_experts: int
    top_k: int

    def components(self) -> dict[str, int]:
        """Component name → parameters, in display order."""
        return {name: getattr(self, f"{name}_params") for name in COMPONENTS}

    @cached_property
    def total_params(self) -> int:
        """Everything registered (what must be stored), tied tensors once."""
        return sum(self.components().values())

    @property
    def expert_params(self) -> int:
        return self.expert_encoder_params + self.expert_ffn_params + self.expert_head_params

    @property
    def active_params(self) -> int:
        """Used for one series: everything but the E − K experts it was not routed to.

        For token_ffn this is "K experts per MoE block" (each token uses K), the usual MoE convention.
        """
        return self.total_params if self.num_experts == 0 else self.with_experts(self.top_k)

    def with_experts(self, held: int) -> int:
        """Parameters with only `held` of the E experts present (the others routed away, idle or on
        other devices): total − (E − held) × one expert's. The one formula for resident/active counts."""
        return self.total_params - (self.num_experts - held) * self.params_per_expert


def experts_per_device(num_experts: int, num_devices: int) -> int:
    """Experts one device holds under expert parallelism: the E experts dealt round the devices, so the
    busiest holds ceil(E / n) (every expert is whole on one device; with n > E, rank 0 still holds one)."""
    return -(-num_experts // num_devices)


def experts_of_device(num_experts: int, num_devices: int, rank: int) -> range:
    """The experts device `rank` holds, as model.expert_parallel places them: [r·c, min(E, (r+1)·c)),
    c = ceil(E/n); rank 0 holds the most, and with n > E the last ranks hold none (experts are not
    replicated)."""
    per_device = experts_per_device(num_experts, num_devices)
    return range(min(num_experts, rank * per_device), min(num_experts, (rank + 1) * per_device))


def count_params(config: ChronosMoEConfig) -> ParamBreakdown:
    """Exact parameter counts of the modules `model.build_model_from_config(config)` builds."""
    dims = config.dims
    d, e = dims.d_model, config.num_experts
    arch = config.architecture if config.is_moe else "dense"
    encoder_moe = len(config.token_moe_encoder_blocks)
    decoder_moe = len(config.token_moe_decoder_blocks)
    shared_encoder = arch != "expert_only"

    router = expert_encoder = expert_ffn = expert_head = per_expert = 0
    if arch in ("shared_then_expert", "expert_only"):
        router = count_context_router_params(config)
    if arch == "shared_then_expert":
        per_expert = count_expert_head_params(config)
        expert_head = e * per_expert
    elif arch == "expert_only":
        lm_head = d * dims.vocab_size
        expert_encoder = e * count_encoder_stack_params(dims)
        expert_head = e * lm_head
        per_expert = count_encoder_stack_params(dims) + lm_head
    elif arch == "token_ffn":
        router = (encoder_moe + decoder_moe) * count_token_router_params(config)
        per_expert = (encoder_moe + decoder_moe) * count_ffn_params(dims)
        expert_ffn = e * per_expert

    le, ld = dims.num_layers, dims.num_decoder_layers
    return ParamBreakdown(
        embedding_params=count_embedding_params(dims),
        encoder_attention_params=le * count_attention_params(dims) if shared_encoder else 0,
        encoder_ffn_params=(le - encoder_moe) * count_ffn_params(dims) if shared_encoder else 0,
        encoder_norm_params=(2 * le + 1) * d if shared_encoder else 0,  # 2 per block + final
        encoder_position_bias_params=count_position_bias_params(dims) if shared_encoder else 0,
        decoder_self_attention_params=ld * count_attention_params(dims),
        decoder_cross_attention_params=ld * count_attention_params(dims),
        decoder_ffn_params=(ld - decoder_moe) * count_ffn_params(dims),
        decoder_norm_params=(3 * ld + 1) * d,  # self, cross, FFN per block + final
        decoder_position_bias_params=count_position_bias_params(dims),
        router_params=router,
        expert_encoder_params=expert_encoder,
        expert_ffn_params=expert_ffn,
        expert_head_params=expert_head,
        params_per_expert=per_expert,
        num_experts=e,
        top_k=config.top_k if config.is_moe else 0,
    )


@dataclass(frozen=True)
class TrainableSplit:
    """The trainable parameters of a regime, split as expert parallelism places them."""

    shared: int  # outside the experts: replicated on every device
    per_expert: int  # one expert's trainable share (every expert is the same shape)
    num_experts: int

    @property
    def total(self) -> int:
        return self.shared + self.per_expert * self.num_experts

    def with_experts(self, held: int) -> int:
        """What a device holding `held` experts trains."""
        return self.shared + self.per_expert * held


def split_trainable_params(params: ParamBreakdown, trainable: str, label: str = "this variant") -> TrainableSplit:
    """The parameters the fine-tuning regime `trainable` trains (model.trainable), by its components.
    SettingError naming `trainable` when that leaves nothing to train in `label`."""
    components = trainable_components(trainable)
    counts = params.components()
    experts = sum(counts[name] for name in EXPERT_COMPONENTS if name in components)
    split = TrainableSplit(sum(counts[name] for name in components if name not in EXPERT_COMPONENTS),
                           experts // params.num_experts if params.num_experts else 0, params.num_experts)
    if split.total == 0:
        raise SettingError("trainable", nothing_trainable_message(trainable, label))
    return split


def count_trainable_params(params: ParamBreakdown, trainable: str, label: str = "this variant") -> int:
    """Parameters the fine-tuning regime `trainable` trains: the sum of its components."""
    return split_trainable_params(params, trainable, label).total


# --- the parameter tensors one by one ----------------------------------------------------------------------------

_EXPERT_ID = re.compile(r"(?:^|\.)experts\.(\d+)\.")


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor of the built model: its `named_parameters()` name and shape. What per-tensor
    layouts need (FSDP2 shards each tensor on dim 0; AdamW keeps a `step` per tensor; DDP buckets tensors)."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def component(self) -> Optional[str]:
        return component_of_param(self.name)

    @property
    def expert(self) -> Optional[int]:
        """The expert it belongs to (its global id), None for a shared tensor."""
        match = _EXPERT_ID.search(self.name)
        return int(match.group(1)) if match else None


def fsdp_shard_rows(dim0: int, num_devices: int, rank: int = 0) -> tuple[int, int]:
    """FSDP2's dim-0 sharding of one parameter: (rows every rank allocates, padded; rows `rank` holds).
    torch.chunk's split: chunks of ceil(dim0/n) rows, the last ones shorter or empty."""
    chunk = -(-dim0 // num_devices)
    return chunk, max(0, min(chunk, dim0 - rank * chunk))


def fsdp_shard_numel(shape: tuple[int, ...], num_devices: int, rank: int = 0) -> tuple[int, int]:
    """(padded elements every rank allocates, elements `rank` holds) of one parameter of `shape`."""
    rest = math.prod(shape[1:])
    padded, held = fsdp_shard_rows(shape[0], num_devices, rank)
    return padded * rest, held * rest


def _linear_tensors(prefix: str, linear: Linear) -> list[ParamTensor]:
    """nn.Linear registers weight (out, in), then bias (out,)."""
    tensors = [ParamTensor(f"{prefix}.weight", (linear.out_features, linear.in_features))]
    return tensors + ([ParamTensor(f"{prefix}.bias", (linear.out_features,))] if linear.bias else [])


def _t5_stack_tensors(prefix: str, config: ChronosMoEConfig, decoder: bool) -> list[ParamTensor]:
    """A T5Stack (without its tied embed_tokens): per block the attention layer(s) and the FFN layer, each
    sub-module before its layer_norm (registration order), block 0's relative-attention bias after o; then
    the final norm. token_ffn's MoE blocks have a router and E expert FFNs in place of the dense FFN."""
    dims = config.dims
    norm = (dims.d_model,)
    moe_blocks = config.token_moe_decoder_blocks if decoder else config.token_moe_encoder_blocks
    token_moe = config.is_moe and config.architecture == "token_ffn"
    tensors: list[ParamTensor] = []
    attentions = ("SelfAttention", "EncDecAttention") if decoder else ("SelfAttention",)
    for block in range(dims.num_decoder_layers if decoder else dims.num_layers):
        layer = f"{prefix}.block.{block}.layer"
        for index, attention in enumerate(attentions):
            for name, linear in zip("qkvo", attention_linears(dims)):
                tensors += _linear_tensors(f"{layer}.{index}.{attention}.{name}", linear)
            if block == 0 and attention == "SelfAttention":
                tensors.append(ParamTensor(f"{layer}.{index}.{attention}.relative_attention_bias.weight",
                                           (RELATIVE_ATTENTION_NUM_BUCKETS, dims.num_heads)))
            tensors.append(ParamTensor(f"{layer}.{index}.layer_norm.weight", norm))
        ffn = f"{layer}.{len(attentions)}.DenseReluDense"
        if token_moe and block in moe_blocks:
            tensors += _linear_tensors(f"{ffn}.router", token_router_linear(config))
            for expert in range(config.num_experts):
                for name, linear in zip(("wi", "wo"), ffn_linears(dims)):
                    tensors += _linear_tensors(f"{ffn}.experts.{expert}.{name}", linear)
        else:
            for name, linear in zip(("wi", "wo"), ffn_linears(dims)):
                tensors += _linear_tensors(f"{ffn}.{name}", linear)
        tensors.append(ParamTensor(f"{layer}.{len(attentions)}.layer_norm.weight", norm))
    return tensors + [ParamTensor(f"{prefix}.final_layer_norm.weight", norm)]


def parameter_tensors(config: ChronosMoEConfig) -> tuple[ParamTensor, ...]:
    """Every parameter tensor `model.build_model_from_config(config)` registers, in `named_parameters()` order
    (tied tensors once: the shared embedding is the LM head), derived from the config alone."""
    dims = config.dims
    arch = config.architecture if config.is_moe else "dense"
    tensors = [ParamTensor("backbone.shared.weight", (dims.vocab_size, dims.d_model))]
    if arch != "expert_only":
        tensors += _t5_stack_tensors("backbone.encoder", config, decoder=False)
    tensors += _t5_stack_tensors("backbone.decoder", config, decoder=True)
    if arch in ("shared_then_expert", "expert_only"):
        hidden, output = context_router_linears(config)
        tensors += _linear_tensors("router.hidden", hidden) + _linear_tensors("router.output", output)
    for expert in range(config.num_experts if arch in ("shared_then_expert", "expert_only") else 0):
        prefix = f"experts.{expert}"
        if arch == "shared_then_expert":
            fc1, fc2, lm_head = expert_head_linears(config)
            tensors += _linear_tensors(f"{prefix}.fc1", fc1) + _linear_tensors(f"{prefix}.fc2", fc2)
            tensors += [ParamTensor(f"{prefix}.norm.weight", (dims.d_model,)),
                        ParamTensor(f"{prefix}.norm.bias", (dims.d_model,))]
            tensors += _linear_tensors(f"{prefix}.lm_head", lm_head)
        else:
            tensors += _t5_stack_tensors(f"{prefix}.encoder", config, decoder=False)  # plain T5 blocks
            tensors += _linear_tensors(f"{prefix}.lm_head", lm_head_linear(dims))
    return tuple(tensors)

