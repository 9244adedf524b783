"""The distributed training benchmark on 2 real gloo ranks (planner.bench.distributed), against the planner.

One run per strategy (debug, batch 2, context 16, prediction 4, one thread per rank, 1 warm-up + 1 timed
step + the counted step), plus expert parallel with only the routers learning. Per rank: parameter, gradient
and optimizer-state bytes equal plan_devices(rank=r) exactly, and each is derived here by hand from the
built model (torch.chunk for FSDP2's shards, AdamW's 4-byte step per tensor); collective counts and bytes
equal step_collectives' exactly (all_to_all bytes summed over the ranks).
"""

from __future__ import annotations

import os
import tempfile

import psutil
import pytest

from model import build_model
from planner.__main__ import main as planner_main
from planner.bench.distributed import DistributedSpec, _run_launcher, check_distributed, run_distributed
from planner.bench.rank_memory import peak_step
from planner.bench.spec import BenchSpec
from tests.fsdp_fixtures import fsdp2_shards

RANKS = 2
WORKLOAD = dict(mode="train", batch_size=2, context_length=16, prediction_length=4, warmup=1, repeats=1, threads=1,
                device="cpu", time_limit_s=120)
S, T, B = 17, 5, 2  # encoder tokens (context + 1), decoder tokens (prediction + 1), series per rank
VARIANTS = {"dense": {}, "token_ffn": dict(architecture="token_ffn", num_experts=4)}
RUNS = {"data_parallel": ("dense", "all"), "zero2": ("dense", "all"), "zero3": ("dense", "all"),
        "expert_parallel": ("token_ffn", "all"), "expert_parallel_router": ("token_ffn", "router")}


def _spec(strategy: str, ranks: int = RANKS, **settings) -> DistributedSpec:
    variant, trainable = RUNS[strategy]
    bench = BenchSpec(size="debug", trainable=trainable, **{**WORKLOAD, **VARIANTS[variant], **settings})
    return DistributedSpec(bench, strategy.removesuffix("_router"), ranks)


@pytest.fixture(scope="module")
def runs():
    return {strategy: run_distributed(_spec(strategy)) for strategy in RUNS}


def _rows(runs, strategy):
    result = runs[strategy]
    assert result.ok, f"{strategy}: {result.status}: {result.message}\n{result.traceback[-2000:]}"
    assert [row["rank"] for row in result.rows] == list(range(RANKS))
    return result.rows


def _assert_exact(row):
    """Measured = the rank's plan, every model state and every kind of collective."""
    for state in ("param", "grad", "optimizer"):
        assert row[f"measured_{state}_bytes"] == row[f"predicted_{state}_bytes"], state
    assert row["states_exact"] and row["collectives_exact"]
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        assert row[f"{kind}_count"] == row[f"predicted_{kind}_count"], kind
        if kind != "all_to_all":
            assert row[f"{kind}_bytes"] == row[f"predicted_{kind}_bytes"], kind


DENSE = build_model("debug")
P = sum(p.numel() for p in DENSE.parameters())
TENSORS = sum(1 for _ in DENSE.parameters())
BLOCKS = ["encoder.block", "decoder.block"]
UNITS = sum(len(getattr(DENSE.backbone, stack).block) for stack in ("encoder", "decoder")) + 1  # blocks + root


def test_data_parallel_holds_and_sends_what_the_planner_says(runs):
    for row in _rows(runs, "data_parallel"):
        _assert_exact(row)
        # weights and gradients whole; AdamW's two fp32 moments and its fp32 `step` per parameter tensor
        assert (row["measured_param_bytes"], row["measured_grad_bytes"]) == (4 * P, 4 * P)
        assert row["measured_optimizer_bytes"] == 8 * P + 4 * TENSORS
        # DDP's buckets: the 1 MiB first bucket closes only with the embedding (the rest is 0.92 MB), so one
        assert 4 * (P - DENSE.backbone.shared.weight.numel()) < 2**20
        assert (row["all_reduce_count"], row["all_reduce_bytes"]) == (1, 4 * P)
        assert row["all_gather_count"] == row["reduce_scatter_count"] == row["all_to_all_count"] == 0
        # the peak includes DDP's bucket copy of the gradients
        assert row["predicted_peak_bytes"] > 4 * P * 5 and row["peak_memory_bytes"] > 0 and row["step_time_s"] > 0


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_fsdp2_shards_hold_and_send_what_the_planner_says(runs, strategy):
    for row in _rows(runs, strategy):
        _assert_exact(row)
        padded, held = fsdp2_shards(DENSE, RANKS, row["rank"])
        assert row["measured_param_bytes"] == row["measured_grad_bytes"] == 4 * padded  # zero2: the resident shard
        assert row["measured_optimizer_bytes"] == 8 * held + 4 * TENSORS
        # reduce-scatter of the gradients, one per unit, n padded chunks each
        assert (row["reduce_scatter_count"], row["reduce_scatter_bytes"]) == (UNITS, 4 * RANKS * padded)
        # all-gathers: zero2 once per unit, zero3 in forward and in backward
        gathers = 1 if strategy == "zero2" else 2
        assert (row["all_gather_count"], row["all_gather_bytes"]) == (gathers * UNITS, gathers * 4 * RANKS * padded)
        assert row["all_reduce_count"] == row["all_to_all_count"] == 0


def _expert_parallel_model(trainable):
    moe = build_model("debug", trainable=trainable, **VARIANTS["token_ffn"])
    layers = len(moe.config.token_moe_encoder_blocks), len(moe.config.token_moe_decoder_blocks)
    return moe, layers


def _held(moe, rank):
    """This rank's parameters under expert parallel: the shared ones and experts [2r, 2r + 2)."""
    mine = {str(j) for j in range(2 * rank, 2 * rank + 2)}
    return [(name, p) for name, p in moe.named_parameters()
            if ".experts." not in name or name.split(".experts.")[1].split(".")[0] in mine]


def test_expert_parallel_holds_and_sends_what_the_planner_says(runs):
    rows = _rows(runs, "expert_parallel")
    moe, (encoder_layers, decoder_layers) = _expert_parallel_model("all")
    shared = [p for name, p in moe.named_parameters() if ".experts." not in name]
    d, e, k = moe.config.dims.d_model, 4, 2
    for row in rows:
        _assert_exact(row)
        held = _held(moe, row["rank"])
        numel = sum(p.numel() for _, p in held)
        assert row["held_experts"] == ("0,1" if row["rank"] == 0 else "2,3")
        # every held expert runs in a training step (on zero rows if no token reached it): every held tensor
        # has its gradient
        assert (row["measured_param_bytes"], row["measured_grad_bytes"]) == (4 * numel, 4 * numel)
        assert row["measured_optimizer_bytes"] == 8 * numel + 4 * len(held)
        # average_gradients: one flat all-reduce of the shared gradients and one of a 4-byte flag per shared tensor
        assert (row["all_reduce_count"], row["all_reduce_bytes"]) == (2, 4 * sum(p.numel() for p in shared)
                                                                      + 4 * len(shared))
        # one all_gather per MoE layer of each rank's E counts, its row width and a need-gradient flag (int64)
        layers = encoder_layers + decoder_layers
        assert (row["all_gather_count"], row["all_gather_bytes"]) == (layers, layers * RANKS * (e + 1 + 1) * 8)
        # out and back in forward, both reversed in backward, per MoE layer
        assert row["all_to_all_count"] == 4 * layers
    # every rank's tokens leave K times, D fp32 wide, out and back, forward and backward: summed over the ranks
    slots = RANKS * B * k * (S * encoder_layers + T * decoder_layers)
    assert sum(row["all_to_all_bytes"] for row in rows) == 4 * slots * d * 4
    # the routing slots: each rank sends its own tokens' K slots per MoE layer (the balanced load); what the
    # ranks' experts receive sums to the same, and each rank's peak is predicted at its own received share
    assert [row["expert_slots_sent"] for row in rows] == [slots // RANKS] * RANKS
    per_step = [list(map(int, row["expert_slots_received_steps"].split(","))) for row in rows]
    assert [sum(step) for step in zip(*per_step)] == [slots] * 2  # the warm-up and the timed step
    for row, steps in zip(rows, per_step):
        # predicted at the load of the step that set the rank's peak (each step's peak measured on its own)
        peaks = list(map(int, row["peak_memory_bytes_steps"].split(",")))
        assert len(peaks) == 2 and row["peak_memory_bytes"] >= max(peaks)
        assert row["peak_step"] == peaks.index(max(peaks))
        assert row["expert_slots_received"] == steps[row["peak_step"]]
    for row in rows:
        assert row["expert_load_factor"] == row["expert_slots_received"] / row["expert_slots_sent"]
        if row["expert_load_factor"] != 1:
            assert row["predicted_peak_bytes"] != row["predicted_peak_bytes_balanced"]


def test_the_load_predicted_is_the_step_that_set_the_peak():
    """tiny expert_only ×4, rank 2 (docs/measurements/cpu-2core-distributed.csv): its experts received 16, 10
    and 10 slots of its 16 sent; the first step peaks lowest (AdamW's moments do not exist yet at its peak), so
    the rank is predicted at a later step's 10 slots, not at the most loaded step's 16."""
    routed = [(16, 16), (10, 16), (10, 16)]
    assert peak_step(routed, [200 * 2**20, 240 * 2**20, 239 * 2**20]) == 1
    assert peak_step(routed, [250 * 2**20, 240 * 2**20, 240 * 2**20]) == 0
    assert peak_step(routed, [240 * 2**20, 240 * 2**20, 240 * 2**20]) == 0  # equal peaks: the first
    assert peak_step(routed, None) == 0  # no per-step peaks: the most loaded step
    assert peak_step([(2, 8), (6, 8), (4, 8)], None) == 1


def test_frozen_experts_send_no_backward_all_to_all_where_nothing_upstream_learns(runs):
    """Only the routers learn: the encoder MoE layer's input (embedding, block 0, block 1's attention and norm)
    is frozen and so are the experts, so its exchanges stay out of the graph (forward only); the decoder MoE
    layer's input depends on the encoder's router, so its exchanges run backward too."""
    rows = _rows(runs, "expert_parallel_router")
    moe, (encoder_layers, decoder_layers) = _expert_parallel_model("router")
    routers = [p for p in moe.parameters() if p.requires_grad]
    d, k = moe.config.dims.d_model, 2
    assert (encoder_layers, decoder_layers) == (1, 1)
    for row in rows:
        _assert_exact(row)
        assert row["measured_grad_bytes"] == 4 * sum(p.numel() for p in routers)
        assert row["measured_optimizer_bytes"] == 8 * sum(p.numel() for p in routers) + 4 * len(routers)
        assert row["all_to_all_count"] == 2 + 4
        assert (row["all_reduce_count"], row["all_reduce_bytes"]) == (2, 4 * sum(p.numel() for p in routers)
                                                                      + 4 * len(routers))
    assert sum(row["all_to_all_bytes"] for row in rows) == (2 * S + 4 * T) * RANKS * B * k * d * 4


def _cli(capsys, *flags):
    status = planner_main(["bench", "--modes", "train", "--sizes", "debug", "--experts", "0", *flags])
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("flags, named", [
    (["--strategy", "zero2"], "argument --ranks"),
    (["--strategy", "zero2", "--ranks", "1"], "argument --ranks"),
    (["--ranks", "2"], "argument --ranks"),
    (["--strategy", "zero3", "--ranks", str(2 * (os.cpu_count() or 1) + 1)], "argument --ranks"),
    (["--strategy", "expert_parallel", "--ranks", "2"], "argument --strategy"),
    (["--strategy", "zero2", "--ranks", "2", "--modes", "forward"], "argument --modes"),
])
def test_bad_settings_are_refused_with_one_line(capsys, flags, named):
    status, lines = _cli(capsys, *flags)
    assert status == 2
    assert len(lines) == 1 and named in lines[0], lines


def test_preflight_refuses_too_many_ranks_for_cores_or_memory():
    with pytest.raises(ValueError, match="argument --ranks: 5 ranks is more than 2 per core"):
        check_distributed(_spec("zero2", ranks=5), cores=2, available_bytes=2**40)
    with pytest.raises(ValueError, match="argument --ranks: 4 ranks .* need a predicted .*at most 1 fit|not even 2"):
        check_distributed(_spec("zero2", ranks=4), cores=8, available_bytes=2**30)
    check_distributed(_spec("zero2", ranks=4), cores=2, available_bytes=2**40)  # 4 ranks on 2 cores: allowed


def test_a_failing_rank_ends_the_run_with_its_message_and_nothing_is_left():
    spec = _spec("zero2")
    broken = DistributedSpec(spec.bench, "expert_parallel", RANKS)  # past the checks: dense under expert parallel
    with tempfile.TemporaryFile() as lock:
        outcome, final, _ = _run_launcher(broken, lambda p: None, None, lock.fileno(), float("inf"))
    assert outcome == "error"
    assert final["message"].startswith("rank ") and "num_experts" in final["message"], final["message"]
    assert "\n" not in final["message"]
    assert psutil.Process().children(recursive=True) == []


def test_the_time_limit_kills_every_rank():
    result = run_distributed(_spec("zero3", time_limit_s=2))
    assert result.status == "timeout" and "every rank" in result.message
    assert psutil.Process().children(recursive=True) == []
