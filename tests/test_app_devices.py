"""The Devices tab's communication per step and its measurement on local processes (AppTest).

Expected numbers are derived by hand next to each check: the debug model's parameters counted by
instantiating it, gradients in fp32 (4 B each), ring all-reduce 2(n−1)/n of the buffer, the interconnect
presets' rates and latencies. The measurement runs for real (2 gloo ranks, debug, about 15 s) and waits for
any other benchmark on this machine (the shared lock).
"""

from __future__ import annotations

import math
import os

import pytest
from streamlit.testing.v1 import AppTest

import ui.devices_tab
from model import build_model
from model.config import make_config
from planner.cost.interconnects import INTERCONNECTS
from planner.parallel import plan_devices
from planner.workload import Workload
from tests.test_app import APP, error_texts
from ui.exports import export_bytes

DEBUG = build_model("debug")
P = sum(p.numel() for p in DEBUG.parameters())  # the debug model's parameters, counted on the module
TENSORS = sum(1 for _ in DEBUG.parameters())
SMALL_WORKLOAD = dict(context_length=16, prediction_length=4, batch_size=2)


def devices_app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in {"tab": "Devices", "experts": "0", **query}.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


TABLE_COLUMNS = {"comm": ["Strategy", "Collective", "Purpose", "Phase", "When", "Calls", "Devices", "Buffer",
                           "Sent per device", "Time"],
                 "totals": ["Strategy", "Calls", "Sent per device", "Time"],
                 "measured": ["Quantity", "Predicted", "Rank 0"]}


def frame(at: AppTest, table: str):
    """The Devices tab's table (dataframes in AppTest carry no key): told apart by their columns."""
    (shown,) = [df.value for df in at.dataframe if list(df.value.columns[:len(TABLE_COLUMNS[table])])
                == TABLE_COLUMNS[table]]
    return shown


def ring_all_reduce_s(buffer_bytes: int, n: int, preset: str, calls: int = 1) -> float:
    link = INTERCONNECTS[preset]
    return 2 * (n - 1) / n * buffer_bytes / (link.bytes_per_s * link.efficiency) + calls * 2 * (n - 1) * link.latency_s


def test_communication_of_dense_data_parallel_equals_a_hand_derivation(monkeypatch):
    exports, original = {}, ui.devices_tab.draw_downloads

    def recorded(rows, settings, what, key, extra=None):  # the tab's downloads, kept to read back
        exports[key] = (rows, settings, what, extra)
        original(rows, settings, what, key, extra)

    monkeypatch.setattr(ui.devices_tab, "draw_downloads", recorded)
    at = devices_app(sizes="debug", batch_size=3)
    at.number_input(key="devices_count").set_value(4).run()
    assert not at.exception and not at.error
    assert at.selectbox(key="devices_link").value == "nvlink4"  # H100's own link inside a node, the default
    assert at.selectbox(key="devices_measure_strategy").options == ["data_parallel", "zero2", "zero3"]  # dense
    n, gradients_bytes = 4, 4 * P  # fp32: 4 B per gradient
    assert gradients_bytes < 25 * 2**20  # one DDP bucket
    table = frame(at, "comm")
    (dp,) = table[table["Strategy"] == "data_parallel"].to_dict("records")
    assert (dp["Collective"], dp["Purpose"], dp["Phase"], dp["When"]) == ("all_reduce", "gradients", "backward",
                                                                          "per optimizer step")
    assert (dp["Calls"], dp["Devices"], dp["Buffer"]) == (1, n, gradients_bytes)
    assert dp["Sent per device"] == 2 * (n - 1) * gradients_bytes // n  # ring all-reduce: 6P bytes at n = 4
    assert dp["Time"] == pytest.approx(ring_all_reduce_s(gradients_bytes, n, "nvlink4"), rel=1e-12)
    # ZeRO-3: weights gathered forward and backward, gradients reduce-scattered, one call per unit each
    # (2 encoder blocks + 2 decoder blocks + the rest = 5 units), (n − 1)/n of 4P sent by each.
    zero3 = table[table["Strategy"] == "zero3"]
    assert list(zero3["Collective"]) == ["all_gather", "all_gather", "reduce_scatter"]
    assert list(zero3["Calls"]) == [5, 5, 5] and list(zero3["Buffer"]) == [gradients_bytes] * 3
    assert list(zero3["Sent per device"]) == [(n - 1) * gradients_bytes // n] * 3
    totals = frame(at, "totals").set_index("Strategy")["Sent per device"]
    assert totals.to_dict() == {"data_parallel": 6 * P, "zero1": 6 * P, "zero2": 6 * P, "zero3": 9 * P}
    assert any(info.value.startswith("data_parallel, zero1, zero2 send least") for info in at.info)
    rows, settings, what, extra = exports["devices_comm"]
    assert [row["bytes_sent_per_device"] for row in rows] == list(table["Sent per device"])
    csv = export_bytes(rows, "csv", settings, what, extra).decode()
    assert "# setting_batch_size: 3" in csv and "# link: NVLink 4" in csv  # the workload and the link travel along

    at.selectbox(key="devices_link").set_value("pcie4").run()  # another interconnect: the same bytes, slower
    dp = frame(at, "comm").iloc[0]
    assert dp["Sent per device"] == 6 * P
    assert dp["Time"] == pytest.approx(ring_all_reduce_s(gradients_bytes, n, "pcie4"), rel=1e-12)


def test_expert_parallel_is_offered_for_moe_and_its_all_to_all_is_listed():
    at = devices_app(sizes="debug", experts="4", architectures="token_ffn")
    assert at.selectbox(key="devices_measure_strategy").options[-1] == "expert_parallel"
    table = frame(at, "comm")
    assert "all_to_all" in set(table[table["Strategy"] == "expert_parallel"]["Collective"])


def test_expert_load_scales_expert_parallel_and_out_of_bounds_is_one_error_line():
    # debug token_ffn E=4, K=2 on the tab's 8 devices: device 0 holds c = ceil(4/8) = 1 expert, so it receives at
    # most 8·min(2, 1)/2 = 4 balanced shares.
    at = devices_app(sizes="debug", experts="4", architectures="token_ffn")
    assert at.number_input(key="devices_expert_load").value == 1.0
    at.number_input(key="devices_expert_load").set_value(4.5).run()
    (message,) = error_texts(at)
    assert message.startswith("expert_load_factor must be between 0 and 4 ") and "\n" not in message
    at.number_input(key="devices_expert_load").set_value(4.0).run()
    assert not error_texts(at) and not at.exception


def test_measuring_a_small_variant_is_refused_in_one_line():
    at = devices_app(sizes="small")
    at.button(key="devices_measure").click().run()
    assert not at.exception
    (message,) = error_texts(at)
    assert "debug and tiny only, not small" in message
    assert "devices_measured" not in at.session_state


def test_measuring_more_processes_than_the_machine_holds_is_the_preflights_line():
    too_many = 2 * (os.cpu_count() or 1) + 1
    at = devices_app(sizes="debug", devices_measure_ranks=too_many, **SMALL_WORKLOAD)
    at.button(key="devices_measure").click().run()
    (message,) = error_texts(at)
    assert message.startswith("argument --ranks:") and "per core" in message
    assert "devices_measured" not in at.session_state


def test_measure_on_two_processes_puts_each_rank_beside_the_planner():
    at = devices_app(sizes="debug", **SMALL_WORKLOAD)
    assert at.selectbox(key="devices_measure_strategy").value == "data_parallel"
    at.button(key="devices_measure").click().run(timeout=150)
    assert not at.exception and not at.error, error_texts(at)
    shown = frame(at, "measured").set_index("Quantity")
    assert [column for column in shown.columns if column.startswith("Rank")] == ["Rank 0", "Rank 1"]
    # DDP keeps every parameter and gradient whole on each rank: 4 B × P, all-reduced in one call.
    for quantity, expected in (("Parameters", 4 * P), ("Gradients", 4 * P), ("all_reduce calls", 1),
                               ("all_reduce bytes", 4 * P)):
        assert shown.loc[quantity, "Predicted"] == expected, quantity
        assert shown.loc[quantity, "Rank 0"] == shown.loc[quantity, "Rank 1"] == expected, quantity
        assert shown.loc[quantity, "Measured vs predicted"] == "equal on every rank"
    # AdamW: two fp32 moments per parameter and an fp32 `step` per tensor; predicted: plan_devices'.
    optimizer = shown.loc["Optimizer states"]
    assert optimizer["Rank 0"] == optimizer["Rank 1"] == 8 * P + 4 * TENSORS
    assert optimizer["Predicted"] == plan_devices(make_config("debug"), Workload(**SMALL_WORKLOAD), "data_parallel",
                                                  2, device="cpu").optimizer_states_bytes
    difference = optimizer["Rank 0"] - optimizer["Predicted"]
    assert optimizer["Measured vs predicted"] == ("equal on every rank" if difference == 0
                                                  else f"measured {difference:+,.0f} B on every rank")
    assert shown.loc["Peak memory", "Rank 0"] > 0 and shown.loc["Step time (median)", "Rank 1"] > 0
    assert math.isnan(shown.loc["Step time (median)", "Predicted"])
    assert {"all_gather calls", "all_to_all calls"}.isdisjoint(shown.index)  # kinds neither side has
    assert any(button.proto.id.endswith("devices_measured_csv") for button in at.get("download_button"))

    at.run()  # a rerun keeps the result, and it still matches the settings
    assert frame(at, "measured").equals(shown.reset_index())
    assert not any("have changed since" in info.value for info in at.info)
    at.number_input(key="devices_measure_ranks").set_value(3).run()
    assert any("data_parallel on 2 processes" in info.value and "have changed since" in info.value
               for info in at.info)
