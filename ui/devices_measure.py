"""The Devices tab's measurement: the chosen variant trained on N local processes with torch.distributed,
per rank beside the planner (planner.bench.distributed, the run `python -m planner bench --modes train
--strategy S --ranks N` makes).

Guarded as the Benchmark tab's runs are: behind a button, one benchmark at a time on this machine (the
package's lock, waited for at most the time limit), a time limit that kills every rank, progress and a Cancel
button; a rerun of the page while it runs (a changed setting) kills it. The result stays in the session with
the settings it was measured at, and says so when they have changed since.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Optional, Sequence

import pandas as pd
import streamlit as st

from planner.bench import BenchProgress, BenchSpec, bench_grid
from planner.bench.distributed import STRATEGIES, DistributedResult, DistributedSpec, distributed_specs, run_distributed
from planner.units import format_bytes, format_seconds
from ui.compute import Variant
from ui.exports import draw_downloads
from ui.sidebar import BIND, Settings

MEASURABLE_SIZES = ("debug", "tiny")  # seconds to a minute on a laptop's cores; larger sizes take long and GiBs
STOP_WAIT_S = 10.0  # the runner kills the launcher's process group within its 0.1 s poll; this is a ceiling
STAGES = {"waiting": "waiting for another benchmark", "starting": "starting the launcher",
          "build": "spawning the ranks: each imports torch, builds the model, trains and counts one step",
          "done": "done"}
# Model-state pairs measured_X / predicted_X, in this order; other pairs the rows carry follow, named by X.
STATE_LABELS = {"param_bytes": "Parameters", "grad_bytes": "Gradients", "optimizer_bytes": "Optimizer states"}


def bench_spec_for(variant: Variant, settings: Settings, precision: str, repeats: int,
                   time_limit_s: float) -> BenchSpec:
    """The benchmark run of the chosen variant at the sidebar's workload (batch per rank), built by the grid
    the CLI builds (planner.bench.grid). ValueError, one line, for what the distributed benchmark cannot run."""
    config, size = variant.plan.config, variant.plan.size
    if size not in MEASURABLE_SIZES:
        raise ValueError(f"Measuring on local processes runs {' and '.join(MEASURABLE_SIZES)} only, not {size}: "
                         "choose a debug or tiny variant (add the size under the sidebar's Sizes)")
    if precision != "fp32":
        raise ValueError(f"training precision: the distributed benchmark trains in fp32, not {precision}; "
                         "choose fp32 above to measure")
    if settings.optimizer != "adamw":
        raise ValueError(f"optimizer: the distributed benchmark trains with adamw, not {settings.optimizer}; "
                         "choose adamw in the sidebar to measure")
    if settings.trainable != "all":
        raise ValueError(f"trainable: the distributed benchmark trains every parameter, not {settings.trainable}; "
                         "set Trainable to all in the sidebar to measure")
    (spec,) = bench_grid(
        [size], ["train"], [config.architecture] if config.is_moe else [], [config.num_experts], [config.dispatch],
        config.expert_capacity, top_k=config.top_k, router_hidden_dim=config.router_hidden_dim,
        batch_size=settings.batch_size, context_length=settings.context_length,
        prediction_length=settings.prediction_length, repeats=repeats, time_limit_s=time_limit_s)
    built = spec.model_config()
    if built != config:
        differ = [name for name in ("vocab_size", "d_model", "d_ff", "num_layers", "num_decoder_layers")
                  if getattr(built.dims, name) != getattr(config.dims, name)]
        differ += [f.name for f in dataclasses.fields(config) if f.name != "dims"
                   and getattr(built, f.name) != getattr(config, f.name)]
        raise ValueError(f"The benchmark builds {size} from its preset, and this variant differs in "
                         f"{', '.join(differ) or 'its dimensions'}: set the sidebar back to the preset's values "
                         "to measure")
    return spec


def _stop(running: tuple[threading.Event, threading.Event]) -> None:
    """Tell this session's run to stop (the runner polls the event) and wait until its ranks are killed."""
    cancel_event, finished = running
    cancel_event.set()
    finished.wait(STOP_WAIT_S)


def _cancel() -> None:
    """Cancel button callback."""
    running = st.session_state.get("devices_measure_running")
    if running:
        _stop(running)
        st.session_state.update(devices_measure_running=None,
                                devices_measure_notice="Cancelled: every rank of the run was killed.")


def _run(spec: DistributedSpec) -> None:
    cancel_event, finished = threading.Event(), threading.Event()
    cancel = st.empty()  # shown only while the run goes
    cancel.button("Cancel", key="devices_measure_cancel", icon=":material/cancel:", on_click=_cancel,
                  help="Kills the launcher and every rank")
    bar = st.progress(0.0, text="Starting…")

    def report(update: BenchProgress) -> None:
        text = update.message if update.stage == "waiting" else STAGES.get(update.stage, update.stage)
        bar.progress(update.fraction, text=f"{spec.label}: {text}")

    st.session_state.update(devices_measure_running=(cancel_event, finished), devices_measure_notice=None)
    try:
        result = run_distributed(spec, progress=report, cancel_event=cancel_event)
    finally:
        finished.set()
    st.session_state.update(devices_measure_running=None, devices_measured=result)
    cancel.empty()
    bar.empty()


def _pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, Optional[str], str]]:
    """(quantity, measured key, predicted key or None, format) of every measured-beside-predicted figure the
    rows carry, read from their keys (columns come and go as the benchmark grows)."""
    keys = rows[0].keys()
    states = [key.removeprefix("measured_") for key in keys
              if key.startswith("measured_") and "predicted_" + key.removeprefix("measured_") in keys]
    states.sort(key=lambda name: list(STATE_LABELS).index(name) if name in STATE_LABELS else len(STATE_LABELS))
    pairs = [(STATE_LABELS.get(name, name.replace("_", " ")), f"measured_{name}", f"predicted_{name}", "exact")
             for name in states]
    if "peak_memory_bytes" in keys:
        pairs.append(("Peak memory", "peak_memory_bytes", "predicted_peak_bytes" if "predicted_peak_bytes" in keys
                      else None, "bytes"))
    if "step_time_s" in keys:
        pairs.append(("Step time (median)", "step_time_s", None, "seconds"))
    if "collective_bytes" in keys:
        pairs.append(("Collective bytes, all kinds", "collective_bytes", "predicted_collective_bytes"
                      if "predicted_collective_bytes" in keys else None, "exact"))
    kinds = [key.removeprefix("predicted_").removesuffix("_count") for key in keys
             if key.startswith("predicted_") and key.endswith("_count")]
    for kind in kinds:
        if not any(row.get(f"{kind}_count") or row.get(f"predicted_{kind}_count") for row in rows):
            continue  # a kind neither side has
        pairs.append((f"{kind} calls", f"{kind}_count", f"predicted_{kind}_count", "count"))
        if f"{kind}_bytes" in keys:
            pairs.append((f"{kind} bytes", f"{kind}_bytes", f"predicted_{kind}_bytes"
                          if f"predicted_{kind}_bytes" in keys else None, "exact"))
    return pairs


FORMATS = {"exact": lambda v: f"{v:,.0f} B", "bytes": format_bytes, "seconds": format_seconds,
           "count": lambda v: f"{v:,.0f}"}


def _agreement(rows: Sequence[dict[str, Any]], measured: str, predicted: Optional[str], fmt: str) -> str:
    """Equal, or by how much each rank's measurement differs; peak memory as the run's ratios."""
    if predicted is None:
        return "not predicted"
    if measured == "peak_memory_bytes" and all(row.get("memory_ratio") is not None for row in rows):
        ratios = [row["memory_ratio"] for row in rows]
        return f"×{min(ratios):.2f}" + (f"–{max(ratios):.2f}" if max(ratios) - min(ratios) >= 0.005 else "")
    differences = {row["rank"]: row[measured] - row[predicted] for row in rows}
    if not any(differences.values()):
        return "equal on every rank"
    unit = "" if fmt == "count" else " B"
    if len(set(differences.values())) == 1:
        return f"measured {next(iter(differences.values())):+,}{unit} on every rank"
    return "measured " + ", ".join(f"{value:+,}{unit} on rank {rank}" for rank, value in differences.items())


def measured_frame(rows: Sequence[dict[str, Any]]) -> tuple[pd.DataFrame, list[str]]:
    """One row per quantity: the planner's per-device figure, each rank's measurement, whether they agree;
    and each row's format (FORMATS)."""
    records, formats = [], []
    for quantity, measured, predicted, fmt in _pairs(rows):
        records.append({"Quantity": quantity, "Predicted": rows[0][predicted] if predicted else float("nan"),
                        **{f"Rank {row['rank']}": row[measured] for row in rows},
                        "Measured vs predicted": _agreement(rows, measured, predicted, fmt)})
        formats.append(fmt)
    return pd.DataFrame(records), formats


def _draw_result(result: DistributedResult, current: Optional[tuple], settings: Settings) -> None:
    spec = result.spec
    if (spec.bench, spec.strategy, spec.ranks) != current:
        bench = spec.bench
        st.info(f"Measured for {bench.size} {bench.model_config().describe()}, {spec.strategy} on {spec.ranks} "
                f"processes, batch {bench.batch_size} per rank, context {bench.context_length}, prediction "
                f"{bench.prediction_length}, {bench.repeats} timed step(s); the settings above have changed "
                "since: measure again to compare with them.", icon=":material/history:")
    if not result.ok:
        show = st.warning if result.status == "cancelled" else st.error
        show(f"{spec.label}: {result.status}: {result.message}", icon=":material/error:")
        return
    st.success(result.summary, icon=":material/check:")
    frame, formats = measured_frame(result.rows)
    ranks = [column for column in frame.columns if column.startswith("Rank ")]
    style = frame.style
    for index, fmt in enumerate(formats):
        style = style.format(FORMATS[fmt], subset=pd.IndexSlice[[index], ["Predicted", *ranks]])
    st.dataframe(style, hide_index=True, key="devices_measured_table", height=(len(frame) + 1) * 35 + 3,
                 column_config={
                     "Quantity": st.column_config.TextColumn(pinned=True),
                     "Predicted": st.column_config.NumberColumn(
                         help="The planner's per device: plan_devices (states, peak) and step_collectives "
                         "(calls and buffer bytes of one step)"),
                     **{rank: st.column_config.NumberColumn(help="Measured on this rank: states from its local "
                                                            "tensors, peak RSS above its baseline, collectives of "
                                                            "one step") for rank in ranks},
                     "Measured vs predicted": st.column_config.TextColumn(
                         help="Equal, or measured − predicted on each rank; peak memory: measured ÷ predicted "
                         "(memory_ratio)")})
    st.caption("Buffer bytes as step_collectives counts them: all-reduce and reduce-scatter their input, "
               "all-gather its output, all-to-all what it sends. Where measured and predicted differ by design, "
               "the README's \"Distributed benchmark\" says why.")
    draw_downloads(result.rows, settings, f"distributed measurement of {spec.label}", key="devices_measured",
                   extra={"strategy": spec.strategy, "ranks": spec.ranks, "device": spec.device,
                          "wall_s": result.wall_s, "summary": result.summary})


def draw_measure(variant: Variant, settings: Settings, precision: str) -> None:
    """The inputs, the button, a run in progress, and the session's last result."""
    st.subheader("Measure on N local processes")
    st.caption("Trains the chosen variant (debug and tiny only) on N local processes with torch.distributed "
               "(gloo on CPU, nccl with one GPU per rank), as `python -m planner bench --modes train --strategy S "
               "--ranks N` does: the sidebar's batch per rank, context and prediction lengths, fp32, AdamW, one "
               "warm-up step, the timed steps, then one step whose collectives are counted. One benchmark at a "
               "time on this machine.")
    strategies = [s for s in STRATEGIES if s != "expert_parallel" or variant.plan.config.is_moe]
    columns = st.columns([2, 1, 1, 1, 2], vertical_alignment="bottom")
    strategy = columns[0].selectbox("Strategy", strategies, key="devices_measure_strategy", bind=BIND,
                                    help="data_parallel: DDP; zero2 / zero3: FSDP2 fully_shard; expert_parallel: "
                                    "experts split across the ranks (MoE only)")
    ranks = int(columns[1].number_input("Processes N", min_value=2, value=2, step=1, key="devices_measure_ranks",
                                        bind=BIND, help="At most twice the cores (or one GPU each), and as many as "
                                        "the memory holds: the preflight says"))
    repeats = int(columns[2].number_input("Timed steps", min_value=1, value=2, step=1, key="devices_measure_repeats",
                                          bind=BIND))
    time_limit_s = float(columns[3].number_input("Time limit (s)", min_value=10, value=120, step=10,
                                                 key="devices_measure_time_limit", bind=BIND))
    clicked = columns[4].button(f"Measure on {ranks} local processes", key="devices_measure", type="primary",
                                icon=":material/lan:")
    running = st.session_state.get("devices_measure_running")
    if running and not clicked:  # the page reran (a setting changed) while this session's run went
        _stop(running)
        st.session_state.update(devices_measure_running=None, devices_measure_notice="Stopped: the page reran "
                                "while the measurement ran (a setting changed), so every rank was killed.")
    try:
        bench = bench_spec_for(variant, settings, precision, repeats, time_limit_s)
        current: Optional[tuple] = (bench, strategy, ranks)
    except ValueError as error:
        bench, current = None, None
        if clicked:
            st.error(str(error), icon=":material/error:")
    if clicked and bench is not None:
        try:
            (spec,) = distributed_specs([bench], strategy, ranks)  # the preflight: cores, memory, strategy
        except ValueError as error:
            st.error(str(error), icon=":material/error:")
        else:
            _run(spec)
    if st.session_state.get("devices_measure_notice"):
        st.warning(st.session_state["devices_measure_notice"], icon=":material/cancel:")
    result = st.session_state.get("devices_measured")
    if result is not None:
        _draw_result(result, current, settings)
