"""The distributed training benchmark on 2 real gloo ranks (planner.bench.distributed), against the planner.

One run per strategy (debug, batch 2, context 16, prediction 4, one thread per rank, 1 warm-up + 1 timed
step + the counted step). Per rank: model-state bytes equal plan_devices' exactly, or with the documented
difference; collectives equal step_collectives' where both count the same thing (README, "Distributed
benchmark").
"""

from __future__ import annotations

import math
import os
import tempfile

import psutil
import pytest

from model import build_model
from planner.__main__ import main as planner_main
from planner.bench.distributed import DistributedSpec, _run_launcher, check_distributed, run_distributed
from planner.bench.spec import BenchSpec
from planner.communication import sharding_units
from planner.params import count_params

RANKS = 2
WORKLOAD = dict(mode="train", batch_size=2, context_length=16, prediction_length=4, warmup=1, repeats=1, threads=1,
                device="cpu", time_limit_s=120)
VARIANTS = {"dense": {}, "token_ffn": dict(architecture="token_ffn", num_experts=4)}
RUNS = {"data_parallel": "dense", "zero2": "dense", "zero3": "dense", "expert_parallel": "token_ffn"}


def _spec(strategy: str, ranks: int = RANKS, **settings) -> DistributedSpec:
    bench = BenchSpec(size="debug", **{**WORKLOAD, **VARIANTS[RUNS[strategy]], **settings})
    return DistributedSpec(bench, strategy, ranks)


@pytest.fixture(scope="module")
def runs():
    return {strategy: run_distributed(_spec(strategy)) for strategy in RUNS}


def _rows(runs, strategy):
    result = runs[strategy]
    assert result.ok, f"{strategy}: {result.status}: {result.message}\n{result.traceback[-2000:]}"
    assert [row["rank"] for row in result.rows] == list(range(RANKS))
    return result.rows


def _tensors(model) -> int:
    return sum(1 for _ in model.parameters())


DENSE = build_model("debug")
P = count_params(DENSE.config).total_params
UNITS = sharding_units(DENSE.config)  # every T5 block and the root: FSDP2's units as fully_shard'ed here


def test_data_parallel_holds_what_the_planner_says(runs):
    for row in _rows(runs, "data_parallel"):
        assert row["measured_param_bytes"] == row["predicted_param_bytes"] == 4 * P
        assert row["measured_grad_bytes"] == row["predicted_grad_bytes"] == 4 * P
        # AdamW's step counter: one fp32 scalar per parameter tensor, not in the planner
        assert row["measured_optimizer_bytes"] == row["predicted_optimizer_bytes"] + 4 * _tensors(DENSE)
        assert row["states_exact"]
        # one all-reduce of every gradient, in DDP's buckets (one bucket: 1.9 MB < 25 MiB): exactly the planner's
        assert row["all_reduce_bytes"] == row["predicted_all_reduce_bytes"] == 4 * P
        assert row["all_reduce_count"] == row["predicted_all_reduce_count"] == 1
        assert row["all_gather_count"] == row["reduce_scatter_count"] == row["all_to_all_count"] == 0
        assert row["peak_memory_bytes"] > 0 and row["step_time_s"] > 0


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_fsdp2_shards_hold_what_the_planner_says(runs, strategy):
    for row in _rows(runs, strategy):
        assert row["padding_params"] == 0  # every dim 0 of debug divides by 2: no FSDP2 padding
        shard = math.ceil(P / RANKS)
        assert row["measured_param_bytes"] == 4 * shard
        if strategy == "zero3":
            assert row["measured_param_bytes"] == row["predicted_param_bytes"]
        else:  # the planner's ZeRO-2 keeps the weights whole; FSDP2 keeps the 1/n shard resident between steps
            assert row["predicted_param_bytes"] == 4 * P == RANKS * row["measured_param_bytes"]
        assert row["measured_grad_bytes"] == row["predicted_grad_bytes"] == 4 * shard
        assert row["measured_optimizer_bytes"] == row["predicted_optimizer_bytes"] + 4 * _tensors(DENSE)
        assert row["states_exact"]
        # reduce-scatter of the gradients, one per unit: count and bytes exactly the planner's
        assert row["reduce_scatter_count"] == row["predicted_reduce_scatter_count"] == UNITS
        assert row["reduce_scatter_bytes"] == row["predicted_reduce_scatter_bytes"] == 4 * P
        # all-gathers: zero2 once per unit (the planner's "updated weights"), zero3 in forward and in backward
        gathers = 1 if strategy == "zero2" else 2
        assert row["all_gather_count"] == row["predicted_all_gather_count"] == gathers * UNITS
        assert row["all_gather_bytes"] == row["predicted_all_gather_bytes"] == gathers * 4 * P
        assert row["all_reduce_count"] == row["all_to_all_count"] == 0


def test_expert_parallel_holds_what_the_planner_says(runs):
    rows = _rows(runs, "expert_parallel")
    config = _spec("expert_parallel").bench.model_config()
    breakdown = count_params(config)
    moe = build_model("debug", **VARIANTS["token_ffn"])
    expert_tensors = sum(1 for name, _ in moe.named_parameters() if ".experts." in name)
    held_tensors = _tensors(moe) - expert_tensors // RANKS
    shared_tensors = _tensors(moe) - expert_tensors
    moe_layers = len(config.token_moe_encoder_blocks) + len(config.token_moe_decoder_blocks)
    for row in rows:
        assert row["held_experts"] == ("0,1" if row["rank"] == 0 else "2,3")
        assert row["measured_param_bytes"] == row["predicted_param_bytes"] == 4 * breakdown.with_experts(2)
        assert row["measured_grad_bytes"] == row["predicted_grad_bytes"]  # every held expert got tokens
        assert row["measured_optimizer_bytes"] == row["predicted_optimizer_bytes"] + 4 * held_tensors
        assert row["states_exact"]
        # all_to_all: out and back in forward, both reversed in backward, per MoE layer: the planner's count
        assert row["all_to_all_count"] == row["predicted_all_to_all_count"] == 4 * moe_layers
        # average_gradients: the shared gradients (the planner's bytes) and a has-gradient flag per shared tensor
        assert row["all_reduce_bytes"] == row["predicted_all_reduce_bytes"] + 4 * shared_tensors
        assert (row["all_reduce_count"], row["predicted_all_reduce_count"]) == (2, 1)
        # one all_gather of the per-expert row counts per MoE layer: not in the planner
        assert (row["all_gather_count"], row["predicted_all_gather_count"]) == (moe_layers, 0)
    # per rank the routed bytes depend on the routing; over the ranks they are the planner's balanced total
    assert sum(row["all_to_all_bytes"] for row in rows) == RANKS * rows[0]["predicted_all_to_all_bytes"]


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
