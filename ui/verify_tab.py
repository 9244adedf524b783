"""The Verify tab: run planner.verify on chosen variants behind a button, with a progress bar, and show
analytic beside measured with the difference and its reason.

Verification builds and runs the real modules (torch, seconds per variant), so it runs only when asked;
each variant's checks are cached, and the last run's results stay in the session until settings change.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import streamlit as st

from model.config import ChronosMoEConfig
from planner.verify import verification_metadata
from planner.workload import Workload
from ui.compute import PlanTable, Variant, workload_of
from ui.exports import draw_downloads
from ui.sidebar import BIND, Settings

COUNTERS = {"verify_fvcore": "fvcore", "verify_forecast": "forecast", "verify_activations": "activations"}
TABLE_HEIGHT_PX = 21 * 35 + 3  # 20 rows and the header
RESULT_COLUMNS = {
    "size": "Size", "architecture": "Architecture", "num_experts": "E", "quantity": "Quantity",
    "counter": "Counter", "analytic": "Analytic", "measured": "Measured", "difference": "Difference",
    "relative_difference": "Relative", "ok": "Agrees", "reason": "Reason",
}


@st.cache_data(max_entries=256, show_spinner=False)
def verify_checks(size: str, config: ChronosMoEConfig, workload: Workload, options: dict[str, bool]) -> list[dict]:
    """planner.verify on one variant, as flat rows (torch loads on the first call only)."""
    from planner.verify import verify_variant

    return [check.row() for check in verify_variant(size, config, workload, **options)]


def _default_selection(variants: tuple[Variant, ...]) -> list[str]:
    """The smallest size's dense model and its first MoE variant per architecture: a quick check."""
    smallest = min(variants, key=lambda v: v.row["total_params"]).plan.size
    chosen, architectures = [], set()
    for v in variants:
        if v.plan.size == smallest and v.plan.architecture not in architectures:
            chosen.append(v.label)
            architectures.add(v.plan.architecture)
    return chosen


REASON_SHOWN_CHARS = 160  # fvcore's reasons name every module it skipped: the exports keep them whole


def _short(reason: str) -> str:
    return reason if len(reason) <= REASON_SHOWN_CHARS else reason[:REASON_SHOWN_CHARS] + "… (whole in the exports)"


def _results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Disagreements first (stable, so each variant's checks keep their order); long reasons cut short."""
    ordered = sorted(rows, key=lambda row: row["ok"])
    frame = pd.DataFrame(ordered)[list(RESULT_COLUMNS)].rename(columns=RESULT_COLUMNS)
    frame["Reason"] = frame["Reason"].map(lambda text: _short(str(text)) if text else text)
    return frame


def _run(variants: list[Variant], workload: Workload, options: dict[str, bool]) -> tuple[list[dict[str, Any]], dict]:
    """The checks' rows and how they were made (the export's metadata, as `python -m planner verify` writes)."""
    progress = st.progress(0.0, text="Loading torch and building the modules…")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for i, variant in enumerate(variants):
        progress.progress(i / len(variants), text=f"Verifying {variant.label} ({i + 1} of {len(variants)})")
        rows += verify_checks(variant.plan.size, variant.plan.config, workload, options)
    progress.progress(1.0, text=f"Verified {len(variants)} variant(s)")
    return rows, {**verification_metadata(), "elapsed_s": round(time.perf_counter() - start, 1),
                  "failed_checks": sum(not row["ok"] for row in rows)}


def draw_verify(table: PlanTable, settings: Settings) -> None:
    st.markdown("Build the real modules and measure them: parameters on the meta device, FLOPs with "
                "FlopCounterMode and fvcore, a counted forecast, activation bytes saved for backward (CPU, fp32). "
                "Every analytic number should match exactly; activations within 3 %. It runs at the sidebar's "
                "workload: a shorter context and fewer sample paths make it faster.")
    labels = [v.label for v in table.variants]
    chosen = st.multiselect("Variants to verify", labels, default=_default_selection(table.variants),
                            key="verify_variants", bind=BIND,
                            help="Seconds per variant at Chronos shapes on a laptop CPU; large ones take longer.")
    columns = st.columns(len(COUNTERS) + 1)
    options = {name: column.checkbox(name, value=True, key=key)
               for column, (key, name) in zip(columns, COUNTERS.items())}
    run = columns[-1].button("Run verification", key="verify_run", type="primary", disabled=not chosen)

    run_key = (settings, tuple(chosen), tuple(options.items()))
    if run:
        variants = [table.variants[labels.index(label)] for label in chosen]
        st.session_state["verify_result"] = (run_key, *_run(variants, workload_of(settings), options))
    last_key, rows, how = st.session_state.get("verify_result", (None, None, None))
    if rows is None:
        return
    if last_key != run_key:
        st.info("Settings changed since the last run: run the verification again.")
        return
    disagreeing = [row for row in rows if not row["ok"]]
    if disagreeing:
        st.warning(f"{len(disagreeing)} of {len(rows)} checks disagree beyond tolerance (listed first; see Reason).")
    else:
        st.success(f"All {len(rows)} checks agree.")
    st.dataframe(
        _results_frame(rows), hide_index=True, height=TABLE_HEIGHT_PX, key="verify_table",
        column_config={
            "Architecture": st.column_config.TextColumn(width="medium"),
            "Counter": st.column_config.TextColumn(width="medium"),
            "Analytic": st.column_config.NumberColumn(format="localized", help="The planner's count"),
            "Measured": st.column_config.NumberColumn(format="localized", help="What the real modules did"),
            "Difference": st.column_config.NumberColumn(format="localized", help="Measured − analytic"),
            "Relative": st.column_config.NumberColumn(format="percent", help="Difference over analytic"),
            "Agrees": st.column_config.CheckboxColumn(help="Exact, or within the stated tolerance"),
            "Reason": st.column_config.TextColumn(width="large", help="Why a difference is expected, or that "
                                                  "it is not explained"),
        },
    )
    draw_downloads(rows, settings, "verification: analytic vs measured", key="verify", extra=how)
