"""The Benchmark tab: measure chosen variants on this machine beside the planner's predictions (planner.bench).

A run happens only behind the button: each variant runs in a fresh subprocess with a time limit, one
benchmark at a time across every browser session and CLI (the package's lock; a waiting run says what it
waits for). When anything reruns the page while a run goes (the Cancel button, a changed setting), Streamlit
starts the new script run beside the old one; the new run sets the old one's cancel event and the runner
kills its subprocess within a tenth of a second. Finished runs stay in the session.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import threading
import time
from typing import Any, Optional, Sequence

import pandas as pd
import streamlit as st

from model.config import ARCHITECTURES, DISPATCH_MODES
from model.presets import PRESETS
from planner.bench import (DEVICES, bench_grid, DTYPES, MODES, PREDICTION_DEVICES, BenchProgress, BenchResult, BenchSpec,
                           compare_to_dense, export_results, lock_holder, predict_row, run_benchmark)
from planner.export import export_metadata, render
from planner.steptime import TERMS
from planner.units import format_bytes, format_count, format_ratio, format_seconds
from ui.bench_figures import measured_figure, ratio_figure, time_split_figure, usage_figure
from ui.compute import PlanTable, parse_expert_counts
from ui.sidebar import BIND, Settings

STOP_WAIT_S = 10.0  # a stopped run kills its subprocess within the runner's 0.1 s poll; this is a ceiling
STAGES = {"waiting": "waiting for another benchmark", "starting": "starting a fresh Python process",
          "preflight": "checking the predicted memory", "build": "importing torch and building the model",
          "warmup": "warm-up step", "measure": "timed step",
          "predict": "tracing the step's ops and probing this device (first time only)", "done": "done"}
# Shown column -> (row key, formatter, help).
RESULT_COLUMNS = {
    "Median": ("median_s", format_seconds, "Median wall time of a step over the repeats"),
    "p95": ("p95_s", format_seconds, "95th percentile of the repeats"),
    "CPU median": ("cpu_median_s", format_seconds, "Process CPU time of the median step, every thread, at the "
                   "threads busy over all repeats (threads asleep during serial kernels, such as dropout's "
                   "draws, add none)"),
    "Predicted": ("predicted_time_s", format_seconds, "Op-level model: every op the step dispatches, priced by "
                  "this device's probed GEMM rate, memory-bound time and per-op host time"),
    "Time ×pred": ("time_ratio", format_ratio, "Measured median ÷ predicted time"),
    "CPU ×pred": ("cpu_time_ratio", format_ratio, "Median CPU time ÷ predicted CPU time (each op's time × the "
                  "threads it keeps busy, as probed; CPU only): steadier than wall time when other processes "
                  "share the cores"),
    "Peak memory": ("peak_memory_bytes", format_bytes, "Measured peak (CUDA max_memory_allocated, or the "
                    "subprocess's peak RSS above its baseline on CPU)"),
    "Predicted peak": ("predicted_peak_bytes", format_bytes, "The planner's memory of one step"),
    "Memory ×pred": ("memory_ratio", format_ratio, "Measured peak ÷ predicted peak"),
    "Series/s": ("series_per_s", lambda v: format_count(v), "Series per second at the median time"),
    "Tokens/s": ("tokens_per_s", lambda v: format_count(v), "Tokens per second at the median time"),
    "Achieved FLOP/s": ("achieved_flops_per_s", lambda v: format_count(v, "FLOP/s"),
                        "The planner's FLOPs ÷ the median time"),
    "Usage entropy": ("usage_entropy_nats", "{:.3f}".format, "Entropy of the expert usage in nats (ln E when "
                      "balanced)"),
    "Balance loss": ("balance_loss", "{:.3f}".format, "Switch balance loss summed over MoE layers (1 per layer "
                     "when balanced)"),
}


def _draw_inputs(settings: Settings) -> dict[str, Any]:
    columns = st.columns([1, 3, 1, 1])
    sizes = columns[0].multiselect("Sizes", list(PRESETS), default=["debug"], key="bench_sizes", bind=BIND,
                                   help="debug runs in about a second once torch is imported; large ones take long")
    architectures = columns[1].multiselect("Architectures", list(ARCHITECTURES), default=["token_ffn"],
                                           key="bench_architectures", bind=BIND)
    experts = columns[2].text_input("Expert counts E", value="0, 4", key="bench_experts", bind=BIND,
                                    help="Comma-separated; 0 runs the dense model, the baseline of the ratios")
    top_k = columns[3].number_input("Top-k K", min_value=1, value=2, step=1, key="bench_top_k", bind=BIND)
    columns = st.columns(4)
    modes = columns[0].multiselect("Modes", list(MODES), default=["forward"], key="bench_modes", bind=BIND,
                                   help="forward: teacher-forced inference; forecast: N sample paths; train: "
                                   "forward, backward and AdamW step with the balance loss, training the "
                                   "sidebar's Trainable parameters")
    dispatch = columns[1].multiselect("Dispatch", list(DISPATCH_MODES), default=["sparse"], key="bench_dispatch",
                                      bind=BIND, help="dense runs every expert and masks: the reference cost")
    device = columns[2].selectbox("Device", list(DEVICES), key="bench_device", bind=BIND)
    dtype = columns[3].selectbox("Dtype", list(DTYPES), key="bench_dtype", bind=BIND,
                                 help="fp16 is refused on CPU; training in bf16/fp16 runs AMP")
    columns = st.columns(7)
    numbers = {}
    for column, (name, label, default) in zip(columns, (
            ("batch_size", "Batch", 2), ("context_length", "Context", 64), ("prediction_length", "Prediction", 16),
            ("num_samples", "Sample paths", 4), ("warmup", "Warm-up", 1), ("repeats", "Repeats", 3),
            ("time_limit_s", "Time limit (s)", 120))):
        numbers[name] = int(column.number_input(label, min_value=1, value=default, step=1, key=f"bench_{name}",
                                                bind=BIND))
    return dict(sizes=sizes, architectures=architectures, experts=experts, top_k=int(top_k), modes=modes,
                dispatch=dispatch, device=device, dtype=dtype, **numbers)


def build_specs(inputs: dict[str, Any], settings: Settings) -> list[BenchSpec]:
    """The grid of runs (the CLI's, dense first), at the sidebar's router width and training regime (train runs
    a regime trains nothing in are left out); ValueError naming the field."""
    for name in ("sizes", "modes", "dispatch"):
        if not inputs[name]:
            raise ValueError(f"{name}: choose at least one")
    experts = list(parse_expert_counts(inputs["experts"]))
    if any(experts) and not inputs["architectures"]:
        raise ValueError("architectures: choose at least one architecture for the MoE variants")
    return bench_grid(
        inputs["sizes"], inputs["modes"], inputs["architectures"], experts, inputs["dispatch"],
        settings.expert_capacity, top_k=inputs["top_k"], router_hidden_dim=settings.router_hidden_dim,
        batch_size=inputs["batch_size"], context_length=inputs["context_length"],
        prediction_length=inputs["prediction_length"], num_samples=inputs["num_samples"], device=inputs["device"],
        dtype=inputs["dtype"], warmup=inputs["warmup"], repeats=inputs["repeats"],
        time_limit_s=float(inputs["time_limit_s"]), trainable=settings.trainable,
    )


def _reporter(bar, index: int, count: int, spec: BenchSpec):
    def report(update: BenchProgress) -> None:
        step = f" {update.done} of {update.total}" if update.stage in ("warmup", "measure") else ""
        text = update.message if update.stage == "waiting" else STAGES[update.stage] + step
        bar.progress((index + update.fraction) / count, text=f"Run {index + 1} of {count}, {spec.label}: {text}")
    return report


def _stop(running: tuple[threading.Event, threading.Event]) -> None:
    """Stop this session's run: Streamlit starts the new script run while the old one is still going, so
    tell it (the runner polls the event) and wait until it has killed its subprocess and left the lock."""
    cancel_event, finished = running
    cancel_event.set()
    finished.wait(STOP_WAIT_S)


def _cancel() -> None:
    """Cancel button callback."""
    running = st.session_state.get("bench_running")
    if running:
        _stop(running)
        st.session_state.update(bench_running=None, bench_notice="Cancelled: the run in progress was killed; "
                                "finished runs are kept.")


def _run(specs: Sequence[BenchSpec]) -> None:
    cancel_event, finished = threading.Event(), threading.Event()
    cancel = st.empty()  # shown only while the runs go
    cancel.button("Cancel", key="bench_cancel", icon=":material/cancel:", on_click=_cancel,
                  help="Kills the run in progress; finished runs are kept")
    bar = st.progress(0.0, text="Starting…")
    results: list[BenchResult] = []
    st.session_state.update(bench_results=results, bench_running=(cancel_event, finished), bench_notice=None)
    try:
        for index, spec in enumerate(specs):
            if cancel_event.is_set():
                break
            results.append(run_benchmark(spec, progress=_reporter(bar, index, len(specs), spec),
                                         cancel_event=cancel_event))
    finally:
        finished.set()
    st.session_state["bench_running"] = None
    cancel.empty()
    bar.progress(1.0, text=f"Finished {len(results)} run(s)")


def _draw_busy() -> None:
    holder = lock_holder()
    if holder is None:
        return
    since = time.time() - holder.get("since", time.time())
    # No button to stop it: it belongs to another session or shell, and only its owner may cancel it.
    st.info(f"Another benchmark is running ({holder.get('label', 'unknown')}, for {since:.0f} s): one runs at a "
            "time on this machine, so a run started here waits for it (at most its time limit).",
            icon=":material/hourglass_top:")


def results_frame(results: Sequence[BenchResult]) -> pd.DataFrame:
    """One row per finished run: settings, measured beside predicted (seconds, bytes, exact)."""
    rows = []
    for result in results:
        if not result.ok:
            continue
        row = result.row()
        rows.append({"Run": result.spec.label, "Device": f"{row['device_name']}, {result.spec.dtype}",
                     **{name: row[key] for name, (key, _, _) in RESULT_COLUMNS.items()},
                     "Bound by": row["predicted_bound"], "Expert usage": row["usage_counts"]})
    return pd.DataFrame(rows)


def calibration_text(results: Sequence[BenchResult], today: Optional[datetime.date] = None) -> Optional[str]:
    """Where the predictions come from: the device model's source and age, the machine's load now, and the
    threads' speedup and the host's time per op during the runs beside the probe's, and how fast GEMMs ran
    during the timed steps against when they were priced (planner.steptime.host_state, probe.remeasure_state)."""
    described = [r for r in results if r.ok and r.device_model]
    if not described:
        return None
    model = described[-1].device_model
    text = f"Predicted with {model['name']}'s {model['source']}"
    if model.get("measured_on"):
        age = ((today or datetime.date.today()) - datetime.date.fromisoformat(model["measured_on"])).days
        text += f" of {model['measured_on']} ({age} day{'s' if age != 1 else ''} old)"
    speedups = [r.parallel_speedup for r in described if r.parallel_speedup]
    probe = described[-1].probe_parallel_speedup
    if speedups and probe:
        text += (f"; threads ran {min(speedups):.2f}–{max(speedups):.2f}× one thread's rate during the runs and "
                 f"{probe:.2f}× when probed")
    hosts = [r.host_s_per_op for r in described if r.host_s_per_op]
    probe_host = described[-1].probe_host_s_per_op
    if hosts and probe_host:
        text += (f"; the host dispatched an op in {min(hosts) * 1e6:.1f}–{max(hosts) * 1e6:.1f} µs at the runs "
                 f"(re-timed at each run) and {probe_host * 1e6:.1f} µs when probed")
    states = [r.gemm_state_ratio for r in described if r.gemm_state_ratio]
    if states:
        text += (f"; a reference GEMM took {min(states):.2f}–{max(states):.2f}× as long during the timed steps "
                 f"as when their prediction was timed")
    return text + f"; load now {os.getloadavg()[0]:.2f} (1-minute average). Re-probe when they differ."


def _draw_calibration(results: Sequence[BenchResult]) -> None:
    text = calibration_text(results)
    if text:
        st.caption(f":material/tune: {text}")


def _draw_results(results: Sequence[BenchResult]) -> None:
    for result in results:
        if not result.ok:
            show = st.warning if result.status in ("refused", "cancelled") else st.error
            show(f"{result.spec.label}: {result.status}: {result.message}", icon=":material/error:")
    frame = results_frame(results)
    if frame.empty:
        return
    st.dataframe(
        frame.style.format({name: fmt for name, (_, fmt, _) in RESULT_COLUMNS.items()}, na_rep="—"),
        hide_index=True, key="bench_table",
        column_config={
            "Run": st.column_config.TextColumn(pinned=True),
            **{name: st.column_config.NumberColumn(help=text) for name, (_, _, text) in RESULT_COLUMNS.items()},
            "Expert usage": st.column_config.BarChartColumn(help="Routed slots per expert (MoE)"),
        })
    st.plotly_chart(measured_figure(results), key="bench_measured")
    predicted = [r for r in results if r.ok and r.predicted]
    if predicted:
        st.plotly_chart(time_split_figure([r.spec.label for r in predicted], [r.predicted.split() for r in predicted],
                                          [r.timing.median_s for r in predicted]), key="bench_split")
    _draw_calibration(results)
    for note in sorted({note for r in results for note in r.notes}):
        st.info(note, icon=":material/info:")
    comparison = compare_to_dense(results)
    if comparison:
        st.plotly_chart(ratio_figure(comparison), key="bench_ratio")
    else:
        st.caption("Run E = 0 beside MoE counts (same size and mode) to compare MoE time with dense time.")
    if any(r.ok and r.usage_counts for r in results):
        st.plotly_chart(usage_figure(results), key="bench_usage")
    columns = st.columns(4)
    for column, fmt, mime in ((columns[0], "csv", "text/csv"), (columns[1], "json", "application/json")):
        column.download_button(fmt.upper(), export_results(results, fmt), file_name=f"benchmark.{fmt}", mime=mime,
                               key=f"bench_{fmt}", on_click="ignore", icon=":material/download:", width="stretch")


def prediction_rows(specs: Sequence[BenchSpec], device: str, compiled: bool, tf32: bool) -> list[dict[str, Any]]:
    """The grid predicted on `device` without running (planner.bench.predict_row); ValueError says why not."""
    return [predict_row(spec, device, compiled=compiled, tf32=tf32) for spec in specs]


def _draw_prediction(specs: Sequence[BenchSpec]) -> None:
    """Predict the grid on a chosen device without running it: the split, a chart, and a CSV with the workload."""
    with st.expander("Predict without running, on this machine or a GPU you do not have"):
        columns = st.columns([2, 1, 1, 1], vertical_alignment="bottom")
        device = columns[0].selectbox("Device", PREDICTION_DEVICES, key="bench_predict_device", bind=BIND,
                                      help="this-machine: this CPU's probed model (probed once, a few seconds); "
                                      "the others: GPU presets from datasheets and published measurements")
        compiled = columns[1].checkbox("Compiled", key="bench_predict_compiled", bind=BIND,
                                       help="torch.compile what-if: elementwise ops fused into their neighbours")
        tf32 = columns[2].checkbox("TF32", key="bench_predict_tf32", bind=BIND,
                                   help="fp32 matmuls in TF32 (GPUs that have it)")
        if not columns[3].button("Predict", key="bench_predict", icon=":material/online_prediction:"):
            return
        try:
            with st.spinner("Tracing each step (once per variant and workload, then cached) and, the first time "
                            "on this machine, probing it (about 10 s)…"):
                rows = prediction_rows(specs, device, compiled, tf32)
        except ValueError as error:
            st.error(str(error), icon=":material/error:")
            return
        frame = pd.DataFrame([{"Run": row["label"], "Device": row["device_name"], "Predicted": row["predicted_time_s"],
                               "Bound by": row["predicted_bound"], "Matmul": row["predicted_matmul_s"],
                               "Memory-bound": row["predicted_memory_bound_s"],
                               "Overhead": row["predicted_overhead_s"], "Sync": row["predicted_sync_s"],
                               "Peak memory": row["predicted_peak_bytes"]} for row in rows])
        seconds = ("Predicted", "Matmul", "Memory-bound", "Overhead", "Sync")
        st.dataframe(frame.style.format({**dict.fromkeys(seconds, format_seconds), "Peak memory": format_bytes}),
                     hide_index=True, key="bench_predicted_table")
        st.plotly_chart(time_split_figure([row["label"] for row in rows],
                                          [dict(zip(TERMS, (row["predicted_matmul_s"], row["predicted_memory_bound_s"],
                                                            row["predicted_overhead_s"], row["predicted_sync_s"])))
                                           for row in rows]), key="bench_predicted_split")
        for note in sorted({row["notes"] for row in rows if row["notes"]}):
            st.info(note, icon=":material/info:")
        st.download_button("Predictions CSV", render(rows, "csv", export_metadata({"predicted_for": device})),
                           file_name=f"predicted-{device}.csv", mime="text/csv", key="bench_predicted_csv",
                           on_click="ignore", icon=":material/download:")


def draw_bench(table: PlanTable, settings: Settings) -> None:
    st.markdown("Measure variants on this machine beside the planner's predictions: synchronised timing after "
                "warm-up (median, p95), peak memory in a fresh subprocess, and the op-level time model: every op "
                "a step dispatches, priced on this machine's probed model (or a GPU preset, without running). "
                "Each run starts its own Python process (a few seconds to import torch). Router width and capacity "
                "are the sidebar's.")
    inputs = _draw_inputs(settings)
    _draw_busy()
    try:
        specs = build_specs(inputs, settings)
    except ValueError as error:
        st.error(str(error), icon=":material/error:")
        return
    _draw_prediction(specs)
    left, right = st.columns([1, 3], vertical_alignment="center")
    run = left.button(f"Run {len(specs)} benchmark(s)", key="bench_run", type="primary", icon=":material/speed:")
    recalibrate = right.checkbox("Re-probe this machine first", key="bench_recalibrate",
                                 help="Measure this CPU's device model again before the first run (about half a "
                                 "minute): after a hardware or load change, or when the probe is old.")
    if recalibrate and specs:
        specs = [dataclasses.replace(specs[0], recalibrate=True), *specs[1:]]
    running = st.session_state.get("bench_running")
    if running and not run:  # the page reran (a setting changed) while this session's benchmark ran
        _stop(running)
        st.session_state.update(bench_running=None, bench_notice="Stopped: the page reran while the benchmark "
                                "ran (a setting changed), so its run was killed; finished runs are kept.")
    if run:
        _run(specs)
    if st.session_state.get("bench_notice"):
        st.warning(st.session_state["bench_notice"], icon=":material/cancel:")
    if st.session_state.get("bench_results"):
        _draw_results(st.session_state["bench_results"])
