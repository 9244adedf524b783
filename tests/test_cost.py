"""Whole runs in hours and money: a run's hours, cost and MFU derived by hand from the time model's pieces,
each strategy's collectives in bytes by hand (parameters counted on the real modules), their time on a link
by the α-β ring formulas, the search against brute force, a forecasting service by hand, config import."""

import math

import pytest
import torch
import torch.distributed as dist

from model.build import build_model
from model.config import make_config
from planner.communication import (Collective, Link, bytes_sent_per_step, collective_time_s, sharding_units,
                                   step_collectives)
from planner.cost.links import run_link
from planner.cost.prices import PRICES
from planner.cost.search import SearchSpace, micro_batches, search_plans
from planner.cost.service import STOP_GAIN, ForecastService, plan_service
from planner.cost.training import TrainingRun, global_batch_split, price_training_run, steps_for
from planner.flops import count_flops
from planner.steptime import gpu_preset, predict_step_time
from planner.steptime.ops import StepTrace
from planner.steptime.trace import trace_step
from planner.workload import Workload


@pytest.fixture(autouse=True, scope="module")
def _shared_trace_cache(shared_cache_dir):
    """The cost tests' shared cache: the runs below share their traces."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHRONOS_MOE_PLANNER_CACHE_DIR", str(shared_cache_dir))
        yield


def modules_params(size: str, **moe) -> tuple[int, int]:
    """(all parameters, expert parameters) of the real modules, counted on the meta device."""
    model = build_model(size, device="meta", **moe)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in f".{name}")
    return total, experts


def phase_times(config, workload, gpu, tf32):
    trace = trace_step(config, workload, "train", "fp32", foreach_optimizer=True)
    return {phase: predict_step_time(StepTrace(tuple((op, n) for op, n in trace.ops if op.phase == phase)),
                                     gpu_preset(gpu), tf32=tf32) for phase in ("forward", "backward", "optimizer")}


def test_run_hours_cost_and_mfu_by_hand():
    """One A100 40GB, micro-batch 4, 3 accumulation steps, 1000 steps, TF32: a step is three forwards and
    backwards and one AdamW step; no communication; hours, cost at p4d's $21.957642/8 an hour, and MFU on
    the A100's 156 TFLOP/s TF32 peak from three forwards' FLOPs of the 12 series."""
    config = make_config("tiny")
    run = TrainingRun(config, "a100-40gb", per_device_batch=4, gradient_accumulation=3, steps=1000,
                      context_length=64, prediction_length=16, precision="tf32")
    estimate = price_training_run(run)
    pieces = phase_times(config, Workload(batch_size=4, context_length=64, prediction_length=16), "a100-40gb", True)
    step = 3 * (pieces["forward"].total_s + pieces["backward"].total_s) + pieces["optimizer"].total_s
    assert estimate.step_time_s == pytest.approx(step)
    assert estimate.communication_s == 0 and run.global_batch == 12
    assert estimate.hours == pytest.approx(1000 * step / 3600)
    assert estimate.cost_usd == pytest.approx(1000 * step / 3600 * 21.957642 / 8)
    forward_flops = count_flops(config, Workload(batch_size=12, context_length=64, prediction_length=16)).forward_flops
    assert estimate.mfu == pytest.approx(3 * forward_flops / (step * 156e12))
    assert estimate.bound in ("compute", "memory traffic", "overhead")


def test_checkpointing_recomputes_a_forward_and_zero_shards_the_optimizer():
    config = make_config("tiny")
    common = dict(per_device_batch=2, context_length=64, prediction_length=16, precision="fp32", num_devices=4)
    pieces = phase_times(config, Workload(batch_size=2, context_length=64, prediction_length=16), "h100-sxm", False)
    plain = price_training_run(TrainingRun(config, "h100-sxm", **common))
    checkpointed = price_training_run(TrainingRun(config, "h100-sxm", activation_checkpointing=True, **common))
    assert checkpointed.compute_s - plain.compute_s == pytest.approx(pieces["forward"].total_s)
    zero = price_training_run(TrainingRun(config, "h100-sxm", strategy="zero2", **common))
    optimizer = pieces["optimizer"]
    assert zero.optimizer_s == pytest.approx((optimizer.matmul_s + optimizer.memory_s) / 4 + optimizer.overhead_s
                                             + optimizer.sync_s)
    assert plain.optimizer_s == pytest.approx(optimizer.total_s)


def test_collective_bytes_by_hand_for_each_strategy():
    """tiny dense on 4 devices in fp32: P parameters counted on the modules; a gradient is 4 bytes.

    DDP's buckets by hand: torch fills a bucket with gradients until it holds at least its limit, the first
    bucket's limit 1 MiB (dist._DEFAULT_FIRST_BUCKET_BYTES), then 25 MiB (bucket_cap_mb); after the first step
    a dense model's buckets are rebuilt in the order the gradients become ready, the reverse of registration:
    the decoder's final norm (D), its last block's FFN norm (D) and FFN output weight wo (F·D = 1 MiB) close
    the first bucket; the rest (31 MiB) fills one 25 MiB bucket and, since even without the last tensor (the
    4 MiB embedding) it holds over 25 MiB, leaves under 25 MiB for a third: 3 calls, not ⌈32 MiB / 25 MiB⌉ = 2."""
    config = make_config("tiny")
    params, _ = modules_params("tiny")
    workload = Workload(batch_size=2, context_length=64, prediction_length=16)
    mib = 2**20

    def shape(strategy):
        return [(c.kind, c.phase, c.buffer_bytes, c.per_micro_step, c.calls) for c in
                step_collectives(config, workload, strategy, 4, "fp32")]

    ready = [(name, 4 * p.numel()) for name, p in build_model("tiny", device="meta").named_parameters()][::-1]
    first = ["backbone.decoder.final_layer_norm.weight", "backbone.decoder.block.3.layer.2.layer_norm.weight",
             "backbone.decoder.block.3.layer.2.DenseReluDense.wo.weight"]
    assert [name for name, _ in ready[:3]] == first
    assert [size for _, size in ready[:3]] == [4 * 256, 4 * 256, 4 * 256 * 1024]
    first_bucket = sum(size for _, size in ready[:3])
    assert sum(size for _, size in ready[:2]) < mib <= first_bucket  # the third tensor closes it
    rest = 4 * params - first_bucket
    assert ready[-1] == ("backbone.shared.weight", 4 * 4096 * 256)
    assert rest - ready[-1][1] >= 25 * mib  # the second bucket closes before the last tensor...
    assert rest - 25 * mib < 25 * mib  # ...and what it leaves fits one more
    ddp_buckets = 3
    # What DDP itself calls to make them (its Reducer's assignment), on the same sizes in the same order.
    tensors = [torch.empty(size // 4) for _, size in ready]
    assignment, _ = dist._compute_bucket_assignment_by_size(tensors, [dist._DEFAULT_FIRST_BUCKET_BYTES, 25 * mib])
    assert len(assignment) == ddp_buckets
    # ZeRO-1 (the flat layout, no PyTorch engine) keeps ⌈bytes / 25 MiB⌉ buckets; ZeRO-2/3 (FSDP2) one call
    # per unit: tiny's 4 + 4 blocks and the root, no padding at n = 4 (every dim 0 divides by 4).
    flat_buckets, units = math.ceil(4 * params / (25 * mib)), 4 + 4 + 1
    assert shape("data_parallel") == [("all_reduce", "backward", 4 * params, False, ddp_buckets)]
    assert shape("zero1") == [("reduce_scatter", "backward", 4 * params, False, flat_buckets),
                              ("all_gather", "optimizer", 4 * params, False, flat_buckets)]
    assert shape("zero2") == [("reduce_scatter", "backward", 4 * params, True, units),
                              ("all_gather", "optimizer", 4 * params, False, units)]
    assert shape("zero3") == [("all_gather", "forward", 4 * params, True, units),
                              ("all_gather", "backward", 4 * params, True, units),
                              ("reduce_scatter", "backward", 4 * params, True, units)]
    assert sharding_units(make_config("tiny", architecture="expert_only", num_experts=4)) == 4 * 4 + 4 + 1
    (all_reduce,) = step_collectives(config, workload, "data_parallel", 4, "fp32")
    assert all_reduce.bytes_sent() == 2 * 3 * 4 * params // 4  # 2(n−1)/n of the buffer


def test_bytes_sent_per_step_by_hand_with_accumulation():
    """tiny dense, fp32, 4 devices, 3 micro-steps: DDP all-reduces once per optimizer step, 2(n−1)/n of the
    4P gradient bytes; ZeRO-3 gathers the weights in the forward and the backward and reduce-scatters the
    gradients every micro-step, (n−1)/n of 4P each: 3 × 3 × 3P; ZeRO-2 reduce-scatters every micro-step and
    gathers the updated weights once: (3 + 1) × 3P. n = 4 pads nothing on tiny."""
    config = make_config("tiny")
    params, _ = modules_params("tiny")
    workload = Workload(batch_size=2, context_length=64, prediction_length=16)

    def sent(strategy, micro_steps):
        return bytes_sent_per_step(step_collectives(config, workload, strategy, 4, "fp32"), micro_steps)

    assert sent("data_parallel", 3) == sent("data_parallel", 1) == 2 * 3 * params
    assert sent("zero3", 3) == 3 * 3 * 3 * params and sent("zero3", 1) == 3 * 3 * params
    assert sent("zero2", 3) == (3 + 1) * 3 * params
    assert bytes_sent_per_step([], 5) == 0


def test_expert_parallel_all_to_all_bytes_by_hand():
    """tiny token_ffn, E 4, K 2, micro-batch 2, context 64 (S 65), prediction 16 (T 17), amp_bf16 (2-byte
    activations): MoE blocks 1 and 3 of the encoder and of the decoder; each sends B·S·K = 260 encoder rows
    (or B·T·K = 68 decoder rows) of D = 256 out and back, forward and backward; the shared gradients (all
    but the experts', counted on the modules) are all-reduced in fp32."""
    config = make_config("tiny", architecture="token_ffn", num_experts=4, top_k=2)
    total, experts = modules_params("tiny", architecture="token_ffn", num_experts=4, top_k=2)
    collectives = step_collectives(config, Workload(batch_size=2, context_length=64, prediction_length=16),
                                   "expert_parallel", 4, "amp_bf16")
    assert collectives[0].kind == "all_reduce" and collectives[0].buffer_bytes == 4 * (total - experts)
    all_to_all = [c for c in collectives if c.kind == "all_to_all"]
    encoder, decoder = 260 * 256 * 2, 68 * 256 * 2
    assert sorted(c.buffer_bytes for c in all_to_all) == sorted([encoder] * 8 + [decoder] * 8)
    assert {c.phase for c in all_to_all} == {"forward", "backward"} and all(c.per_micro_step for c in all_to_all)
    # shared_then_expert: the decoder states out (B·T·K·D) and the K heads' logits back (B·T·K·V).
    config = make_config("tiny", num_experts=4, top_k=2)
    routed = sorted(c.buffer_bytes for c in step_collectives(
        config, Workload(batch_size=2, context_length=64, prediction_length=16), "expert_parallel", 4, "fp32")
        if c.kind == "all_to_all")
    assert routed == sorted([68 * 256 * 4] * 2 + [68 * 4096 * 4] * 2)


def test_ring_time_on_a_link_by_hand():
    """8 A100s in one node: NVLink 3 at 300 GB/s × 0.77, 3.4 µs a step; 16 over two p4d nodes: the slower of
    that and EFA's 6.25 GB/s per GPU × 0.60 × 8 GPUs = 30 GB/s, 14 µs a step."""
    inside = run_link("a100-40gb", 8, 8)
    assert inside.bytes_per_s == pytest.approx(300e9 * 0.77) and inside.latency_s == pytest.approx(3.4e-6)
    across = run_link("a100-40gb", 16, 8)
    assert across.bytes_per_s == pytest.approx(30e9) and across.latency_s == pytest.approx(14e-6)
    gradients = Collective("all_reduce", "gradients", "backward", 10**9, 16, False)
    assert collective_time_s(gradients, across) == pytest.approx(2 * 15 / 16 * 1e9 / 30e9 + 30 * 14e-6)
    gather = Collective("all_gather", "weights", "forward", 10**9, 8, True, calls=13)
    assert collective_time_s(gather, inside) == pytest.approx(7 / 8 * 1e9 / (300e9 * 0.77) + 13 * 7 * 3.4e-6)
    assert collective_time_s(gradients, Link(1.0, 1.0)) > 0 and collective_time_s(
        Collective("all_reduce", "x", "backward", 10**9, 1, False), inside) == 0


def test_overlap_hides_the_gradient_all_reduce_behind_the_backward():
    """16 A100s over two p4d nodes: the gradient all-reduce (2·15/16 of small's fp32 gradients at 30 GB/s,
    30 ring steps of 14 µs in each of DDP's 25 MiB buckets) overlaps the backward; only what exceeds the
    backward shows."""
    config = make_config("small")
    params, _ = modules_params("small")
    common = dict(num_devices=16, per_device_batch=1, context_length=64, prediction_length=16, precision="tf32")
    overlapped = price_training_run(TrainingRun(config, "a100-40gb", **common))
    serial = price_training_run(TrainingRun(config, "a100-40gb", overlap_communication=False, **common))
    all_reduce_s = 2 * 15 / 16 * 4 * params / 30e9 + math.ceil(4 * params / (25 * 2**20)) * 30 * 14e-6
    assert serial.communication_s == pytest.approx(all_reduce_s) == overlapped.communication_s
    assert serial.exposed_communication_s == pytest.approx(all_reduce_s)
    backward_s = phase_times(config, Workload(batch_size=1, context_length=64, prediction_length=16), "a100-40gb",
                             True)["backward"].total_s
    assert overlapped.exposed_communication_s == pytest.approx(max(0.0, all_reduce_s - backward_s))
    assert overlapped.step_time_s == pytest.approx(serial.step_time_s - min(all_reduce_s, backward_s))


def test_data_ceiling_bounds_the_step():
    config = make_config("tiny")
    run = TrainingRun(config, "h100-sxm", per_device_batch=8, context_length=64, prediction_length=16,
                      data_series_per_s=10.0)
    estimate = price_training_run(run)
    assert estimate.step_time_s == pytest.approx(0.8) and estimate.bound == "data"


def brute_force(template, global_batch, space):
    plans = []
    for gpu in space.gpus:
        for count in space.device_counts:
            for strategy in space.strategies:
                for checkpointing in space.checkpointing:
                    for batch in micro_batches(global_batch, count):
                        run = TrainingRun(template.config, gpu, num_devices=count, per_device_batch=batch,
                                          gradient_accumulation=global_batch // (count * batch),
                                          steps=template.steps, context_length=template.context_length,
                                          prediction_length=template.prediction_length, strategy=strategy,
                                          activation_checkpointing=checkpointing, precision=template.precision)
                        estimate = price_training_run(run)
                        if estimate.headroom.fits:
                            plans.append(estimate)
    return plans


def test_search_equals_brute_force():
    """tiny at context 1024 on T4 and L4, 1 or 2 devices, global batch 64: the larger micro-batches do not
    fit a T4, so the search's early stop is exercised. Fastest, cheapest and the Pareto front (by its
    definition: no plan at most as slow and as costly, better in one; of equal plans the roomiest) equal
    exhaustive enumeration's."""
    template = TrainingRun(make_config("tiny"), "t4", steps=10_000, context_length=1024, prediction_length=64,
                           precision="fp32")
    space = SearchSpace(("t4", "l4"), (1, 2), ("data_parallel", "zero3"), (False, True))
    result = search_plans(template, 64, space)
    everything = brute_force(template, 64, space)
    key = lambda e: (e.run.gpu, e.run.num_devices, e.run.strategy, e.run.activation_checkpointing,  # noqa: E731
                     e.run.per_device_batch)
    assert sorted(map(key, result.plans)) == sorted(map(key, everything))
    assert 0 < len(everything) < result.tried  # some plans do not fit
    assert key(result.fastest) == key(min(everything, key=lambda e: (e.hours, -e.headroom.headroom_bytes)))
    assert key(result.cheapest) == key(min(everything, key=lambda e: (e.cost_usd, -e.headroom.headroom_bytes)))
    front = {(e.hours, e.cost_usd) for e in everything if not any(
        o.hours <= e.hours and o.cost_usd <= e.cost_usd and (o.hours < e.hours or o.cost_usd < e.cost_usd)
        for o in everything)}
    assert {(e.hours, e.cost_usd) for e in result.pareto_front} == front  # one plan per point: the roomiest
    for e in result.pareto_front:
        assert e.headroom.headroom_bytes == max(o.headroom.headroom_bytes for o in everything
                                                if (o.hours, o.cost_usd) == (e.hours, e.cost_usd))


def test_forecasting_service_by_hand():
    """tiny on an L4 at batch 8, N 4, horizon 16: latency is the predicted forecast; a million series a day;
    devices = ceil(10⁶ / (series/s × 86,400)); cost per million at GCP's $0.7068 an hour."""
    config = make_config("tiny")
    service = ForecastService(config, "l4", series=1_000_000, deadline_hours=24, num_samples=4, context_length=64,
                              prediction_length=16, dtype="bf16", batch_size=8)
    estimate = plan_service(service)
    trace = trace_step(config, Workload(batch_size=8, context_length=64, prediction_length=16, num_samples=4,
                                        dtype="bf16"), "forecast", "bf16", foreach_optimizer=True)
    latency = predict_step_time(trace, gpu_preset("l4")).total_s
    throughput = 8 / latency
    assert estimate.chosen.latency_s == pytest.approx(latency)
    assert estimate.devices_needed == math.ceil(1_000_000 / (throughput * 86_400))
    assert estimate.cost_per_million_usd == pytest.approx(0.7068 / (throughput * 3600) * 1e6)
    assert PRICES["l4"].usd_per_device_hour == 0.7068


def test_service_batch_search_stops_where_throughput_levels_off():
    """Batches double from 1 while the throughput gains at least 3% (or up to max_batch); the best is chosen.
    On an H100 a tiny model's forecast is dispatch-bound, so every doubling pays off up to the cap."""
    service = ForecastService(make_config("tiny"), "h100-sxm", num_samples=4, context_length=64,
                              prediction_length=16, max_batch=32)
    estimate = plan_service(service)
    options = estimate.options
    assert [o.batch_size for o in options] == [1, 2, 4, 8, 16, 32]
    assert estimate.chosen is max(options, key=lambda o: o.series_per_s)
    assert all(o.headroom.fits for o in options)
    gains = [b.series_per_s / a.series_per_s - 1 for a, b in zip(options, options[1:])]
    assert all(g >= STOP_GAIN for g in gains)  # it went on while doubling paid off


def test_steps_from_tokens_or_epochs_and_batch_split():
    assert steps_for(256, tokens=256 * 578 * 10) == 10  # 513 + 65 tokens a series
    assert steps_for(256, epochs=2, series=1000) == 8  # ceil(2000 / 256)
    assert global_batch_split(256, 8, 2) == 16
    with pytest.raises(ValueError, match="global_batch 100 is not divisible by devices × accumulation"):
        global_batch_split(100, 8)


@pytest.mark.parametrize("changes, field", [
    (dict(num_devices=0), "num_devices"), (dict(steps=-1), "steps"), (dict(per_device_batch=0), "per_device_batch"),
    (dict(price_per_device_hour=float("nan")), "price_per_device_hour"), (dict(gpu="b200"), "gpu"),
    (dict(num_devices=2, devices_per_node=4), "devices_per_node"), (dict(data_series_per_s=0.0), "data_series_per_s"),
    (dict(strategy="expert_parallel"), "expert_parallel"), (dict(precision="amp_bf16", gpu="t4"), "precision"),
])
def test_bad_run_input_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        TrainingRun(make_config("tiny"), **{"gpu": "a100-40gb", **changes})


def test_fine_tuning_run_prices_fewer_gradients_and_a_smaller_optimizer_step():
    """Frozen backbone: the traced step computes only the gradients the regime needs and AdamW steps only the
    trainable parameters, so the step is faster and the optimizer's share shrinks; the whole-run memory holds
    moments only for what learns."""
    config = make_config("tiny", architecture="token_ffn", num_experts=8)
    full = price_training_run(TrainingRun(config, "h100-sxm", steps=100))
    frozen = price_training_run(TrainingRun(config, "h100-sxm", steps=100, trainable="experts_and_router"))
    assert frozen.compute_s < full.compute_s and frozen.optimizer_s < full.optimizer_s
    with pytest.raises(ValueError, match="trainable router leaves nothing to train in dense"):
        TrainingRun(make_config("tiny"), "h100-sxm", trainable="router")
