"""Memory of one variant at one workload, in bytes (conventions.md, Memory): weights, a training step, a forecast.

- Weights: parameters × bytes per parameter; all E experts are resident (different series of a batch pick
  different experts). "Only the active experts resident" is a separate, labelled what-if (experts paged
  in from host memory), never the default.
- Training, per parameter: fp32 4 weights + 4 gradients + optimizer moments; AMP keeps fp32 weights and
  gradients (only activations shrink); pure bf16 has bf16 weights and gradients with fp32 moments.
  Adam/AdamW keep two fp32 moments (8 B), SGD with momentum one (4 B), 8-bit AdamW two 1-byte moments (2 B):
  16 / 16 / 12 B with Adam, 12 B SGD fp32.
  Every trainable parameter is counted with a gradient and moments (over a run every expert is trained);
  frozen ones (a fine-tuning regime, model.trainable) have weights only.
  Activations are the bytes saved for backward (planner.activations), on CUDA unless told otherwise.
- Forecast: weights + KV cache + the encoder output copied per sample path + the largest live activation.
  The KV cache at the end of decoding (t = P) is Ld × 2 × A × bytes × (S + t) × N × B: self-attention over the
  t generated tokens, cross-attention over the S encoder tokens for every sample path, because the encoder
  output (and so its cross-attention keys and values) is repeated per sample path, as transformers'
  generate does. int8 means int8 weights with fp16 compute: cache and activations take 2 bytes.

Letters: B series, S encoder tokens, P prediction steps, N sample paths, D d_model, F d_ff, H heads,
A = H·Dk attention width, V vocabulary, E experts, K active experts, Ld decoder blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from model.config import ChronosMoEConfig
from planner.activations import FLOAT32_BYTES, estimate_activation_bytes
from planner.flops import count_running_experts
from planner.params import ParamBreakdown, count_params, count_trainable_params
from planner.workload import DTYPE_BYTES, Workload

# Training bytes per parameter: (weights, gradients) by precision regime, optimizer moments by optimizer.
WEIGHT_AND_GRADIENT_BYTES = {"fp32": (4, 4), "amp_bf16": (4, 4), "amp_fp16": (4, 4), "bf16": (2, 2)}
# fp32 moments in every regime; 8-bit AdamW (bitsandbytes) keeps both moments in one byte each (its block-wise
# quantisation statistics, one fp32 per 2048 values, are under 0.01 byte per parameter and left out).
OPTIMIZER_STATE_BYTES = {"adamw": 2 * 4, "adam": 2 * 4, "sgd_momentum": 4, "adamw_8bit": 2 * 1}
INT8_COMPUTE_BYTES = 2  # int8 weights are dequantised to fp16 to compute; the cache is kept in fp16


@dataclass(frozen=True)
class WeightsMemory:
    """All parameters (every expert) in each storage format."""

    fp32_bytes: int
    fp16_bytes: int
    bf16_bytes: int
    int8_bytes: int


@dataclass(frozen=True)
class TrainingMemory:
    """One training step in the workload's precision regime and optimizer."""

    weights_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    activations_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_states_bytes + self.activations_bytes


@dataclass(frozen=True)
class ForecastMemory:
    """One forecast of B series × N sample paths in the workload's dtype, all experts resident.

    `active_experts_weights_bytes` is the what-if where only the experts the batch routes to are resident
    (the rest paged in from host memory); `what_if_active_experts_total_bytes` the total under it.
    """

    weights_bytes: int
    self_attention_cache_bytes: int
    cross_attention_cache_bytes: int
    encoder_output_bytes: int
    largest_activation_bytes: int
    active_experts_weights_bytes: int

    @property
    def kv_cache_bytes(self) -> int:
        return self.self_attention_cache_bytes + self.cross_attention_cache_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.encoder_output_bytes + self.largest_activation_bytes

    @property
    def what_if_active_experts_total_bytes(self) -> int:
        return self.total_bytes - self.weights_bytes + self.active_experts_weights_bytes


@dataclass(frozen=True)
class MemoryBreakdown:
    weights: WeightsMemory
    training: TrainingMemory
    forecast: ForecastMemory


def estimate_weights_memory(total_params: int) -> WeightsMemory:
    """Parameters × bytes per parameter in each format."""
    return WeightsMemory(*(total_params * DTYPE_BYTES[dtype] for dtype in ("fp32", "fp16", "bf16", "int8")))


def estimate_training_memory(config: ChronosMoEConfig, workload: Workload, params: ParamBreakdown,
                             *, device: str = "cuda") -> TrainingMemory:
    """Weights of every parameter; gradients and optimizer states of the trainable ones (workload.trainable);
    the activations saved for backward."""
    weight_bytes, gradient_bytes = WEIGHT_AND_GRADIENT_BYTES[workload.precision]
    trainable = count_trainable_params(params, workload.trainable, config.label)
    return TrainingMemory(
        weights_bytes=params.total_params * weight_bytes,
        gradients_bytes=trainable * gradient_bytes,
        optimizer_states_bytes=trainable * OPTIMIZER_STATE_BYTES[workload.optimizer],
        activations_bytes=estimate_activation_bytes(config, workload, device=device),
    )


def inference_element_bytes(dtype: str) -> int:
    """Bytes of one cached or live element when the weights are stored as `dtype`."""
    return INT8_COMPUTE_BYTES if dtype == "int8" else DTYPE_BYTES[dtype]


def estimate_kv_cache_bytes(config: ChronosMoEConfig, workload: Workload,
                            steps: Optional[int] = None) -> tuple[int, int]:
    """(self-attention, cross-attention) cache bytes after `steps` decoded tokens (default P, the end).

    Ld blocks × keys and values × A × bytes × tokens × N × B; cross-attention over S for every sample path.
    """
    steps = workload.prediction_length if steps is None else steps
    dims, element = config.dims, inference_element_bytes(workload.dtype)
    paths = workload.num_samples * workload.batch_size
    per_token = dims.num_decoder_layers * 2 * dims.attention_width * element * paths
    return per_token * steps, per_token * workload.encoder_tokens


def estimate_largest_forecast_activation_bytes(config: ChronosMoEConfig, workload: Workload) -> int:
    """The largest set of transient tensors alive at once in a forecast (eval mode, no dropout), an estimate:

    - encoder self-attention: the position bias with the mask (B, H, S, S), the scores, the fp32 softmax
      (and its fp32 input when the scores are half);
    - encoder FFN: the wi output and the ReLU output (B, S, F);
    - a decoding step's sampling over B·N rows: the logits, the fp32 scores before and after the top-k
      filter, and the filter's bool mask (B·N, V).
    It is added to the full KV cache, which is not yet there during the encoder pass: a slight overestimate.
    """
    dims, element = config.dims, inference_element_bytes(workload.dtype)
    batch, seq = workload.batch_size, workload.encoder_tokens
    scores = batch * dims.num_heads * seq * seq
    float_input = FLOAT32_BYTES if element < FLOAT32_BYTES else 0
    encoder_attention_bytes = scores * (2 * element + FLOAT32_BYTES + float_input)
    encoder_ffn_bytes = batch * seq * dims.d_ff * 2 * element
    rows = batch * workload.num_samples
    sampling_bytes = rows * dims.vocab_size * (element + 2 * FLOAT32_BYTES + 1)
    return max(encoder_attention_bytes, encoder_ffn_bytes, sampling_bytes)


def count_resident_expert_params(config: ChronosMoEConfig, workload: Workload, params: ParamBreakdown) -> int:
    """What-if: parameters resident when only the experts this batch routes to are loaded.

    Sample-level routing needs at most min(E, B·K) experts; token-level routing sees B·S tokens per MoE
    block in the encoder pass alone, so min(E, B·S·K) — in practice every expert, and paging saves nothing.
    Dense dispatch runs every expert.
    """
    if not config.is_moe:
        return params.total_params
    rows = workload.batch_size * (workload.encoder_tokens if config.architecture == "token_ffn" else 1)
    return params.with_experts(count_running_experts(config, rows))


def estimate_forecast_memory(config: ChronosMoEConfig, workload: Workload, params: ParamBreakdown) -> ForecastMemory:
    """A forecast's memory with every expert resident, and the active-experts what-if beside it."""
    weight_bytes = DTYPE_BYTES[workload.dtype]
    self_cache, cross_cache = estimate_kv_cache_bytes(config, workload)
    dims, element = config.dims, inference_element_bytes(workload.dtype)
    rows = workload.batch_size * workload.num_samples
    return ForecastMemory(
        weights_bytes=params.total_params * weight_bytes,
        self_attention_cache_bytes=self_cache,
        cross_attention_cache_bytes=cross_cache,
        encoder_output_bytes=rows * workload.encoder_tokens * dims.d_model * element,  # repeated per path
        largest_activation_bytes=estimate_largest_forecast_activation_bytes(config, workload),
        active_experts_weights_bytes=count_resident_expert_params(config, workload, params) * weight_bytes,
    )


def estimate_memory(config: ChronosMoEConfig, workload: Workload = Workload(),
                    params: Optional[ParamBreakdown] = None, *, device: str = "cuda") -> MemoryBreakdown:
    """Weights in every format, a training step and a forecast. `params`, when given, must be this config's
    counts (count_params(config)); another config's would size the wrong model."""
    counted = count_params(config)  # analytic: microseconds
    if params is not None and params != counted:
        raise ValueError(f"params: these parameter counts ({params.total_params:,} in all) are not this config's "
                         f"({counted.total_params:,}); pass count_params(config) or leave params out")
    params = counted
    return MemoryBreakdown(
        weights=estimate_weights_memory(params.total_params),
        training=estimate_training_memory(config, workload, params, device=device),
        forecast=estimate_forecast_memory(config, workload, params),
    )
