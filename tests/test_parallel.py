"""Multi-device plans: hand derivations, and DeepSpeed's own ZeRO estimators where DeepSpeed installs."""

import math

import pytest
import torch

from model import build_model, make_config
from planner.activations import estimate_activation_bytes
from planner.params import count_params
from planner.parallel import GPU_MEMORY_BYTES, estimate_checkpointed_activation_bytes, plan_all_strategies, plan_devices
from planner.parallel_terms import count_largest_layer_params, max_expert_load_factor
from planner.workload import Workload
from tests.fsdp_fixtures import fsdp2_shards

WORKLOAD = Workload(batch_size=4, context_length=128, prediction_length=16)


def instantiated_params(size: str, **moe) -> int:
    """Parameters counted on the real modules (meta device), apart from the planner's count."""
    return sum(p.numel() for p in build_model(size, device="meta", **moe).parameters())


def test_data_parallel_fp32_adam_is_sixteen_bytes_per_parameter():
    config = make_config("small", num_experts=8)
    model = build_model("small", num_experts=8, device="meta")
    plan = plan_devices(config, WORKLOAD, "data_parallel", 8)
    # 16 bytes per parameter, plus AdamW's fp32 `step` (4 bytes) per parameter tensor; DDP's buckets are a
    # second copy of the gradients, outside the model states and inside the peak, as are the loss's (B, T, V)
    # fp32 logits and, in log-softmax's backward, the fp32 gradients of the log-probs and of the logits
    # (B 4, T = 16 + 1 EOS, V 4096).
    tensors = sum(1 for _ in model.parameters())
    assert plan.model_states_bytes == 16 * instantiated_params("small", num_experts=8) + 4 * tensors
    assert plan.bucket_bytes == plan.gradients_bytes == 4 * instantiated_params("small", num_experts=8)
    assert plan.loss_transient_bytes == 4 * 17 * 4096 * (4 + 4 + 4)
    assert plan.peak_bytes == plan.total_bytes + plan.bucket_bytes + plan.loss_transient_bytes


def test_zero_stages_shard_what_they_should():
    config = make_config("tiny", architecture="token_ffn", num_experts=4)
    total = instantiated_params("tiny", architecture="token_ffn", num_experts=4)
    tensors = sum(1 for _ in build_model("tiny", architecture="token_ffn", num_experts=4, device="meta").parameters())
    # fp32 + AdamW: weights 4, gradients 4, moments 8 bytes per parameter; n = 4. ZeRO-1 partitions the flat
    # count (DeepSpeed's layout); ZeRO-2 is FSDP2's: every dim 0 of tiny token_ffn (256, 1024, 4096, 32, the
    # routers' 4) divides by 4, so the shard is P/4, plus AdamW's 4-byte step per tensor, and the whole
    # weights gathered for the step on top of the resident shard.
    assert plan_devices(config, WORKLOAD, "zero1", 4).model_states_bytes == 4 * total + 4 * total + 8 * math.ceil(
        total / 4)
    zero2 = plan_devices(config, WORKLOAD, "zero2", 4)
    assert (zero2.weights_bytes, zero2.gathered_layer_bytes) == (total, 4 * total)
    assert zero2.model_states_bytes == 4 * total + (4 + 4 + 8) * (total // 4) + 4 * tensors


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_fsdp2_pads_dim0_and_the_last_rank_holds_fewer_moment_rows(rank):
    """debug token_ffn MoE-4 on 3 devices: D = 64, F = 256, V = 4096, 32 position buckets and 4-row routers do not
    divide by 3. Weights and gradients are the padded chunks on every rank, the moments the rank's own rows."""
    model = build_model("debug", architecture="token_ffn", num_experts=4, device="meta")
    padded, held = fsdp2_shards(model, 3, rank)
    tensors = sum(1 for _ in model.parameters())
    plan = plan_devices(model.config, WORKLOAD, "zero3", 3, rank=rank)
    assert (plan.weights_bytes, plan.gradients_bytes) == (4 * padded, 4 * padded)
    assert plan.optimizer_states_bytes == 8 * held + 4 * tensors
    assert padded > math.ceil(sum(p.numel() for p in model.parameters()) / 3)
    with pytest.raises(ValueError, match="rank"):
        plan_devices(model.config, WORKLOAD, "zero3", 3, rank=3)


def test_zero3_adds_fsdp2_root_unit_and_one_all_gather_output():
    config = make_config("tiny", num_experts=4)
    model = build_model("tiny", num_experts=4, device="meta")
    total = sum(p.numel() for p in model.parameters())
    # FSDP2 as this project wraps it: each T5 block a unit, the root the rest (embedding, final norms, router,
    # the four expert heads). The root stays gathered for the whole step, and at FSDPMemTracker's peak one
    # all-gather output of the largest unit (here the root again) is alive: fp32, 2 × root × 4 bytes.
    blocks = [block for stack in (model.backbone.encoder, model.backbone.decoder) for block in stack.block]
    in_blocks = sum(p.numel() for block in blocks for p in block.parameters())
    root = total - in_blocks
    assert root > max(sum(p.numel() for p in block.parameters()) for block in blocks)
    plan = plan_devices(config, WORKLOAD, "zero3", 4)
    # tiny's dims all divide by 4 (no FSDP2 padding); AdamW's 4-byte step per parameter tensor.
    tensors = sum(1 for _ in model.parameters())
    assert plan.gathered_layer_bytes == 2 * root * 4
    assert plan.model_states_bytes == 16 * math.ceil(total / 4) + 8 * root + 4 * tensors
    # DeepSpeed's layout keeps its largest-layer rule: the largest module's own tensors (tiny's tied embedding,
    # V·D = 4096·256), fp16 weights and gradients (2 + 2 bytes).
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    assert largest == 4096 * 256
    assert plan_devices(config, WORKLOAD, "zero3", 4, precision="mixed_fp16").gathered_layer_bytes == 4 * largest


def test_expert_parallel_keeps_its_share_of_experts():
    config = make_config("small", num_experts=16)
    model = build_model("small", num_experts=16, device="meta")
    one_expert = sum(p.numel() for p in model.experts[0].parameters())
    plan = plan_devices(config, WORKLOAD, "expert_parallel", 8)
    # 16 experts over 8 devices: each holds 2, and every shared part (and AdamW's 4-byte step per held tensor)
    held = sum(p.numel() for p in model.parameters()) - (16 - 2) * one_expert
    held_tensors = sum(1 for name, _ in model.named_parameters()
                       if not name.startswith("experts.") or name.split(".")[1] in ("0", "1"))
    assert plan.weights_bytes == 4 * held and plan.model_states_bytes == 16 * held + 4 * held_tensors
    with pytest.raises(ValueError, match="expert_parallel needs experts"):
        plan_devices(make_config("small"), WORKLOAD, "expert_parallel", 8)


# A model small enough to derive by hand (the per-block terms are those of tests/test_activations.py, here with
# two blocks per stack): D 8, F 16, H 2 × Dk 4 (A 8), V 16; one series, context 3 and prediction 1 give S = 4
# encoder and T = 2 decoder tokens; fp32 on CPU, where dropout masks take 4 bytes an element.
CHECKPOINT_HAND = dict(d_model=8, d_ff=16, d_kv=4, num_heads=2, num_layers=2, vocab_size=16)
CHECKPOINT_WORKLOAD = Workload(batch_size=1, context_length=3, prediction_length=1)


def test_checkpointed_activations_hand_derived():
    from planner.measure import measure_saved_activation_bytes

    def norm(tokens):  # T5LayerNorm: input and normalised (D each, fp32), rsqrt per token
        return tokens * 8 * (4 + 4) + tokens * 4

    # Encoder block, S = 4: attention (norm, q/k/v input, q kᵀ v copies, softmax H·S·S, its dropout mask and
    # output, o input, residual mask), then FFN (norm, wi input, ReLU output + mask + wo input F wide, mask).
    encoder_block = (norm(4) + 4 * 8 * 4 + 3 * 4 * 8 * 4 + 2 * 4 * 4 * 4 + 2 * 4 * 4 * (4 + 4) + 4 * 8 * 4 + 4 * 8 * 4
                     + norm(4) + 4 * 8 * 4 + 4 * 16 * (4 + 4 + 4) + 4 * 8 * 4)
    assert encoder_block == 1424 + 1296
    # + embedding dropout mask, final norm and mask, int64 position buckets S×S (computed once, block 0)
    encoder = 2 * encoder_block + 4 * 8 * 4 + norm(4) + 4 * 8 * 4 + 4 * 4 * 8
    # Decoder block, T = 2: self-attention as above; cross-attention with q over T and kᵀ, v over S; FFN.
    decoder_block = (norm(2) + 2 * 8 * 4 + 3 * 2 * 8 * 4 + 2 * 2 * 2 * 4 + 2 * 2 * 2 * 8 + 2 * 8 * 4 + 2 * 8 * 4
                     + norm(2) + 2 * 8 * 4 + (2 + 2 * 4) * 8 * 4 + 2 * 2 * 4 * 4 + 2 * 2 * 4 * 8 + 2 * 8 * 4 + 2 * 8 * 4
                     + norm(2) + 2 * 8 * 4 + 2 * 16 * 12 + 2 * 8 * 4)
    assert decoder_block == 616 + 840 + 648
    # + stack ends, position buckets T×T, and the encoder output the cross-attention k/v keep (once)
    decoder = 2 * decoder_block + 2 * 8 * 4 + norm(2) + 2 * 8 * 4 + 2 * 2 * 8 + 4 * 8 * 4
    outside = (4 + 2 + 2) * 8 + 2 * 8 * 4 + (2 * 16 * 4 + 4)  # int64 ids and targets; lm-head input; loss
    full = outside + encoder + decoder
    config = make_config("custom", **CHECKPOINT_HAND)
    model = build_model("custom", **CHECKPOINT_HAND)
    ids, labels = torch.randint(2, 16, (1, 4)), torch.randint(2, 16, (1, 2))
    assert measure_saved_activation_bytes(model, ids, torch.ones_like(ids), labels) == full == 10_988
    # Checkpointing per block: the blocks' tensors go; each block keeps its input (B·tokens·D fp32), and one
    # block's tensors live again while it is recomputed: the larger stack's per-block share (blocks equal).
    block_inputs = (2 * 4 + 2 * 2) * 1 * 8 * 4
    expected = full - encoder - decoder + block_inputs + max(encoder / 2, decoder / 2)
    assert estimate_checkpointed_activation_bytes(config, CHECKPOINT_WORKLOAD, device="cpu") == expected == 3_692


def test_checkpointing_keeps_less_and_fits_decides():
    config = make_config("base", num_experts=8)
    workload = Workload(batch_size=16)
    full = estimate_activation_bytes(config, workload)
    checkpointed = estimate_checkpointed_activation_bytes(config, workload)
    d, blocks_tokens = 768, 12 * 16 * 513 + 12 * 16 * 65
    assert blocks_tokens * d * 4 < checkpointed < full  # at least every block's input
    rows = plan_all_strategies(config, workload, 4, device_memory_bytes=GPU_MEMORY_BYTES["T4 16GB"])
    assert {r["fits"] for r in rows} == {True, False}
    # Fitting leaves room beside the plan's bytes (planner.headroom; its rule is derived by hand in
    # tests/test_headroom.py): nothing fits that only just holds its tensors.
    assert all(r["fits"] == (r["headroom_bytes"] >= 0) and r["needed_bytes"] > r["total_bytes"] for r in rows)


def test_bad_parallel_input_names_the_field():
    config = make_config("tiny")
    with pytest.raises(ValueError, match="strategy"):
        plan_devices(config, WORKLOAD, "pipeline", 2)
    with pytest.raises(ValueError, match="num_devices"):
        plan_devices(config, WORKLOAD, "zero2", 0)


@pytest.mark.parametrize("devices", [1, 4, 8])
@pytest.mark.parametrize("architecture", ["shared_then_expert", "token_ffn"])
def test_model_states_match_deepspeed_estimators(devices, architecture):
    # The numbers behind DeepSpeed's estimate_zero{2,3}_model_states_mem_needs_all_live (which only print).
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params

    model = build_model("tiny", architecture=architecture, num_experts=4)
    config = model.config
    total, largest = model_to_params(model)
    assert total == count_params(config).total_params
    assert largest == count_largest_layer_params(config)

    _, ds_zero2 = estimate_zero2_model_states_mem_needs(total, devices, 1, cpu_offload=False, additional_buffer_factor=1)
    ours_zero2 = plan_devices(config, WORKLOAD, "zero2", devices, precision="mixed_fp16").model_states_bytes
    # DeepSpeed: 2 (fp16 params) + 18/n; ours shards whole parameters, so at most 18 bytes of rounding.
    assert abs(ours_zero2 - ds_zero2) <= 18

    _, ds_zero3, ds_largest = estimate_zero3_model_states_mem_needs(
        total, largest, devices, 1, cpu_offload=False, additional_buffer_factor=1)
    ours_zero3 = plan_devices(config, WORKLOAD, "zero3", devices, precision="mixed_fp16").model_states_bytes
    # DeepSpeed's ZeRO-3 estimate leaves out the resident fp16 parameter shard (2 bytes ÷ n per parameter),
    # which ours counts; with one device nothing is gathered, but DeepSpeed still adds the largest layer.
    gathered = ds_largest if devices > 1 else 0
    expected_gap = 2 * total / devices - (ds_largest - gathered)
    assert abs((ours_zero3 - ds_zero3) - expected_gap) <= 20


@pytest.mark.parametrize("moe", [
    {},  # the shared embedding
    {"vocab_size": 64},  # an FFN matrix
    {"architecture": "shared_then_expert", "num_experts": 8, "router_hidden_dim": 4096},  # the router's hidden layer
    {"architecture": "shared_then_expert", "num_experts": 2, "vocab_size": 64},  # an expert head's fc1 with its bias
    {"architecture": "expert_only", "num_experts": 4},
    {"architecture": "token_ffn", "num_experts": 1024, "vocab_size": 64},
])
@pytest.mark.parametrize("size", ["debug", "tiny", "base"])
def test_largest_layer_is_the_largest_module_of_the_real_model(size, moe):
    """ZeRO-3 gathers one module's own tensors at a time: the largest, found by walking the instantiated model.
    A small vocabulary or a wide router moves the largest module off the embedding."""
    model = build_model(size, device="meta", **moe)
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    assert count_largest_layer_params(make_config(size, **moe)) == largest


def _learning(size: str, trainable: str, **moe) -> int:
    """Parameters that require grad in the built model (meta device)."""
    model = build_model(size, device="meta", trainable=trainable, **moe)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_sharded_gradients_and_moments_count_only_trainable_parameters():
    """ZeRO-2 over 4 devices with the backbone frozen: weights whole (every parameter), gradients and AdamW
    moments a quarter of what requires grad."""
    moe = dict(architecture="token_ffn", num_experts=8)
    workload = Workload(batch_size=2, context_length=64, prediction_length=16, trainable="experts_and_router")
    plan = plan_devices(make_config("tiny", **moe), workload, "zero2", 4)
    learning = _learning("tiny", "experts_and_router", **moe)
    model = build_model("tiny", device="meta", trainable="experts_and_router", **moe)
    learning_tensors = sum(p.requires_grad for p in model.parameters())
    # FSDP2's ZeRO-2: the resident shard of every weight (tiny's dims divide by 4), gradients and moments of
    # what learns, AdamW's step per learning tensor
    assert plan.weights_bytes == instantiated_params("tiny", **moe)
    assert (plan.gradients_bytes, plan.optimizer_states_bytes) == (4 * math.ceil(learning / 4),
                                                                   8 * math.ceil(learning / 4) + 4 * learning_tensors)


def test_expert_parallel_trains_its_own_experts_and_the_shared_trainable_parts():
    """8 experts on 4 devices: each holds 2; under `experts` it trains those 2 experts' parameters only."""
    moe = dict(architecture="shared_then_expert", num_experts=8)
    model = build_model("tiny", device="meta", trainable="experts", **moe)
    two_experts = sum(p.numel() for name, p in model.named_parameters()
                      if p.requires_grad and name.split(".")[:2] in (["experts", "0"], ["experts", "1"]))
    workload = Workload(batch_size=2, context_length=64, prediction_length=16, trainable="experts")
    plan = plan_devices(make_config("tiny", **moe), workload, "expert_parallel", 4)
    two_experts_tensors = sum(1 for name, p in model.named_parameters()
                              if p.requires_grad and name.split(".")[:2] in (["experts", "0"], ["experts", "1"]))
    assert plan.gradients_bytes == 4 * two_experts
    assert plan.optimizer_states_bytes == 8 * two_experts + 4 * two_experts_tensors


def test_gradient_all_reduce_carries_only_trainable_gradients():
    from planner.communication import step_collectives

    moe = dict(architecture="expert_only", num_experts=4)
    workload = Workload(batch_size=2, context_length=64, prediction_length=16, trainable="router")
    all_reduce, used_map = step_collectives(make_config("tiny", **moe), workload, "data_parallel", 8, "fp32")
    assert all_reduce.buffer_bytes == 4 * _learning("tiny", "router", **moe)
    # an MoE model runs DDP with find_unused_parameters: its used-parameter map, an int32 per learning tensor
    model = build_model("tiny", device="meta", trainable="router", **moe)
    assert used_map.buffer_bytes == 4 * sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("size", ["debug", "tiny"])
@pytest.mark.parametrize("moe", [{}, {"architecture": "token_ffn", "num_experts": 4},
                                 {"architecture": "shared_then_expert", "num_experts": 4}])
def test_ddp_bucket_count_is_torchs_assignment(size, moe):
    """DDP's steady-state buckets: torch's own `_compute_bucket_assignment_by_size` with its 1 MiB first bucket
    and 25 MiB after, over the real model's parameters in the order DDP uses (dense: rebuilt in gradient-ready
    order, the reverse of registration; MoE, find_unused_parameters: registration order)."""
    import torch.distributed as dist

    from planner.communication import ddp_buckets

    model = build_model(size, device="meta", **moe)
    parameters = [torch.empty(p.shape) for p in model.parameters()]
    ordered = parameters if moe else parameters[::-1]
    expected, _ = dist._compute_bucket_assignment_by_size(ordered, [dist._DEFAULT_FIRST_BUCKET_BYTES, 25 * 2**20])
    buckets = ddp_buckets(model.config, WORKLOAD, "fp32")
    assert len(buckets) == len(expected)
    assert sorted(buckets) == sorted(sum(ordered[i].numel() * 4 for i in bucket) for bucket in expected)


def test_loss_backward_transient_is_what_torch_holds_at_the_step_peak():
    """debug dense, fp32 on CPU, batch 8, context 32, prediction 32 (T 33, V 4096: the loss's B·T·V tensors
    dwarf the debug model's weights, so the step peaks at the loss's backward). Under torch's own MemTracker,
    one training forward and backward: after the forward the step holds, beside the weights, what autograd
    saved (the planner's activations, equal to the saved-tensor hooks' count) and the (B, T, V) logits the
    output keeps; at the peak also log-softmax's backward's two fp32 B·T·V gradients. The planner's term is
    logits + those two gradients."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from planner.activations import estimate_loss_backward_transient_bytes
    from planner.measure import measure_saved_activation_bytes, token_batch

    config = make_config("debug")
    workload = Workload(batch_size=8, context_length=32, prediction_length=32)
    torch.manual_seed(0)
    model = build_model("debug").train()
    batch = token_batch(config, workload)
    saved = measure_saved_activation_bytes(model, *batch)
    assert saved == estimate_activation_bytes(config, workload, device="cpu")
    logits = 8 * 33 * 4096 * 4
    tracker = MemTracker()
    tracker.track_external(model, *batch)
    with tracker:
        output = model(*batch[:2], labels=batch[2])
        after_forward = tracker.get_tracker_snapshot("current")[torch.device("cpu")]["Total"]
        output.loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    weights = sum(p.numel() * 4 for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    # After the forward: the weights, the saved tensors (token ids and labels among them), the logits, the
    # attention mask (an input no op saves) and the fp32 loss.
    mask, loss = batch[1].nbytes, 4
    assert after_forward == weights + saved + logits + mask + loss
    # The peak: that, and log-softmax's backward's fp32 gradients of the log-probs and of the logits.
    assert peak == after_forward + 2 * logits
    transient = estimate_loss_backward_transient_bytes(config, workload, device="cpu")
    assert transient == 3 * logits
    assert peak == weights + saved + transient + mask + loss


@pytest.mark.parametrize("size,experts,n,most", [("debug", 4, 2, 2.0), ("debug", 4, 4, 2.0), ("small", 16, 8, 8.0),
                                                 ("debug", 4, 3, 3.0)])
def test_expert_load_is_bounded_by_every_row_of_every_device(size, experts, n, most):
    # Top-2: each of the n devices' rows sends min(K, c) of its K slots to device 0's c = ceil(E/n) experts:
    # debug E=4 on 2 (c=2): 2·2/2; on 4 (c=1): 4·1/2; small E=16 on 8 (c=2): 8·2/2; debug on 3 (c=2): 3·2/2.
    config = make_config(size, architecture="shared_then_expert", num_experts=experts)
    assert max_expert_load_factor(config, n) == most
    plan_devices(config, WORKLOAD, "expert_parallel", n, expert_load_factor=most)
    for bad in (most + 0.01, -0.5, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="expert_load_factor"):
            plan_devices(config, WORKLOAD, "expert_parallel", n, expert_load_factor=bad)
    with pytest.raises(ValueError, match="expert_load_factor"):
        plan_all_strategies(make_config(size), WORKLOAD, n, device_memory_bytes=GPU_MEMORY_BYTES["T4 16GB"],
                            expert_load_factor=1.5)


def test_expert_load_scales_the_heads_saved_activations():
    """shared_then_expert debug on 2 devices: each extra balanced share of slots (B·K series) runs B·K more rows
    through the rank's expert heads; what one head saves for B·K rows is measured here with saved-tensor hooks.
    The plan adds exactly that per unit of load (the weighting of the outputs stays with the rows' own batch)."""
    workload = Workload(batch_size=4, context_length=16, prediction_length=4)
    model = build_model("debug", architecture="shared_then_expert", num_experts=4)
    rows, tokens, width = workload.batch_size * model.config.top_k, workload.decoder_tokens, model.config.dims.d_model
    storages, weights = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):  # the saved activations: every saved storage but the parameters
        if tensor.untyped_storage().data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.experts[0](torch.randn(rows, tokens, width, requires_grad=True))
    head_bytes = sum(storages.values())
    plans = [plan_devices(model.config, workload, "expert_parallel", 2, device="cpu", expert_load_factor=load)
             for load in (0.0, 1.0, 2.0)]
    per_share = plans[1].activations_bytes - plans[0].activations_bytes
    assert plans[2].activations_bytes - plans[1].activations_bytes == per_share
    assert per_share == head_bytes
    assert plans[1] == plan_devices(model.config, workload, "expert_parallel", 2, device="cpu")  # the default


@pytest.mark.parametrize("architecture,held_experts", [("shared_then_expert", 2), ("expert_only", 2),
                                                       ("shared_then_expert", 1)])
def test_expert_exchange_transient_scales_with_the_load_and_competes_with_the_loss(architecture, held_experts):
    """The heads' exchange at the end of the forward (measured on the exchange itself in
    tests/test_expert_parallel.py): per received (T, V) fp32 row three copies (two when the rank holds one
    expert: no concatenation), per sent row the weighted outputs, per series the zeros and the sum, less the
    loss's log-probabilities. The peak holds the larger of it and the loss's backward temporaries."""
    from planner.parallel_terms import estimate_expert_exchange_transient_bytes

    n = 4 // held_experts  # E = 4 over n devices
    config = make_config("debug", architecture=architecture, num_experts=4)
    workload = Workload(batch_size=4, context_length=128, prediction_length=32)
    row, b, sent = 33 * 4096 * 4, 4, 4 * 2
    copies = 3 if held_experts > 1 else 2
    for load in (0.0, 1.0, 1.75, 2.0):
        plan = plan_devices(config, workload, "expert_parallel", n, device="cpu", expert_load_factor=load)
        received = round(load * sent)
        assert plan.exchange_transient_bytes == row * (copies * received + sent + 2 * b) - b * row
        assert plan.exchange_transient_bytes == estimate_expert_exchange_transient_bytes(
            config, workload, n, 0, load, device="cpu")
        assert plan.peak_bytes == plan.total_bytes + max(plan.loss_transient_bytes, plan.exchange_transient_bytes)
    # balanced on 2 devices it already outgrows the loss's B·T·V × 12 bytes: 3·8 + 8 + 8 rows against 4 + 3·4
    if held_experts > 1:
        assert plan_devices(config, workload, "expert_parallel", n, device="cpu").exchange_transient_bytes \
            > plan.loss_transient_bytes
    # only V-wide heads' exchanges, only under expert parallel
    for other, strategy in ((make_config("debug", architecture="token_ffn", num_experts=4), "expert_parallel"),
                            (config, "data_parallel"), (config, "zero3")):
        assert plan_devices(other, workload, strategy, 2, device="cpu").exchange_transient_bytes == 0
