"""Whether a plan fits: its bytes plus the CUDA context, the allocator's reserve and communication buffers,
derived by hand here for each kind of strategy; the Devices tab, `plan --strategies` and `run` agree."""

import pytest

from model.config import make_config
from planner.headroom import DOES_NOT_FIT, FITS, TIGHT, check_headroom
from planner.parallel import GPU_MEMORY_BYTES, plan_all_strategies
from planner.parallel_terms import count_largest_layer_params
from planner.params import count_params
from planner.workload import Workload

MIB = 2**20
NCCL = 4 * MIB * 16 * 2  # NCCL_BUFFSIZE × channels × both ring neighbours


def test_single_device_needs_context_and_reserve():
    headroom = check_headroom(10 * 2**30, 16 * 2**30)
    assert headroom.needed_bytes == 10 * 2**30 + 512 * MIB + 2**30  # 10% reserve of the 10 GiB peak
    assert headroom.headroom_bytes == 16 * 2**30 - headroom.needed_bytes and headroom.status == FITS


@pytest.mark.parametrize("peak_gib, status", [(12.0, FITS), (13.0, TIGHT), (14.0, TIGHT), (14.5, DOES_NOT_FIT)])
def test_tight_within_ten_percent(peak_gib, status):
    """On 16 GiB (tight below 1.6 GiB left), peak × 1.1 + 0.5 GiB: 12 → 13.7 (2.3 left: fits); 13 → 14.8
    (1.2 left: tight); 14 → 15.9 (0.1 left: tight); 14.5 → 16.45 (does not fit)."""
    headroom = check_headroom(int(peak_gib * 2**30), 16 * 2**30)
    assert headroom.needed_bytes == pytest.approx(peak_gib * 2**30 * 1.1 + 512 * MIB, abs=1)
    assert headroom.status == status


def test_every_strategy_row_adds_its_buffers():
    """Data parallel holds DDP's bucket copy of every gradient; ZeRO one layer's gradients; expert parallel
    the shared gradients' buckets and all-to-all send and receive buffers of its largest routed tensor
    (shared_then_expert: the K expert heads' logits, B·T·K·V fp32 values)."""
    config = make_config("small", num_experts=8)
    workload = Workload(batch_size=4, context_length=512, prediction_length=64)
    device = GPU_MEMORY_BYTES["A100 40GB"]
    params = count_params(config)
    shared = params.total_params - params.num_experts * params.params_per_expert
    logits = 4 * 65 * 2 * 4096 * 4
    expected_buffers = {"data_parallel": NCCL + params.total_params * 4,
                        "zero1": NCCL + count_largest_layer_params(config) * 4,
                        "zero2": NCCL + count_largest_layer_params(config) * 4,
                        "zero3": NCCL + count_largest_layer_params(config) * 4,
                        "expert_parallel": NCCL + shared * 4 + 2 * logits}
    for row in plan_all_strategies(config, workload, 4, device_memory_bytes=device):
        buffers = expected_buffers[row["strategy"]]
        assert row["communication_buffer_bytes"] == buffers
        needed = row["total_bytes"] + 512 * MIB + round(0.1 * row["total_bytes"]) + buffers
        assert row["needed_bytes"] == needed and row["headroom_bytes"] == device - needed
        assert row["fits"] == (needed <= device)


def test_one_device_has_no_communication_buffers():
    rows = plan_all_strategies(make_config("tiny"), Workload(), 1, device_memory_bytes=GPU_MEMORY_BYTES["T4 16GB"])
    assert {row["communication_buffer_bytes"] for row in rows} == {0}
