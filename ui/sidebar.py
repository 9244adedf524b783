"""The sidebar: every planner knob, Chronos defaults preselected, returned as one plain `Settings`.

Every widget has a `key` and is bound to the page's query parameters, so the address bar always holds
the current view and reopening it restores the view. An upload fills the widgets through session state
(in the uploader's callback, which runs before the widgets are drawn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import streamlit as st

from model.components import COMPONENTS
from model.config import ARCHITECTURES, DISPATCH_MODES
from model.presets import DIMENSION_FIELDS, PRESETS, PUBLISHED_SIZES
from model.trainable import REGIMES
from planner.workload import (CONTEXT_LENGTH, DTYPE_BYTES, NUM_SAMPLES, OPTIMIZERS, PRECISION_REGIMES,
                              PREDICTION_LENGTH)
from ui.uploads import MAX_UPLOAD_MB, read_upload

DEFAULT_SIZES = ("tiny", "mini", "small", "base", "large")
DEFAULT_EXPERTS = "0, 4, 8, 16"
CUSTOM_DIMENSIONS = DIMENSION_FIELDS  # the T5 dimensions a custom size sets
BIND = "query-params"
CHOSEN_COMPONENTS = "components"  # the Trainable choice that trains the components picked below it
TRAINABLE_CHOICES = (*REGIMES, CHOSEN_COMPONENTS)


@dataclass(frozen=True)
class Settings:
    """What the user asked for, as typed; the planner validates it (ui.compute)."""

    sizes: tuple[str, ...]
    custom_dims: Optional[tuple[tuple[str, int], ...]]  # (name, value) pairs when a custom size is on
    architectures: tuple[str, ...]
    experts: str  # "0, 4, 8, 16": parsed and checked in ui.compute
    top_k: int
    router_hidden_dim: int
    vocab_size: int
    context_length: int
    prediction_length: int
    batch_size: int
    num_samples: int
    dtype: str
    optimizer: str
    precision: str
    dispatch: str
    expert_capacity: Optional[float]
    trainable: str = "all"  # a regime name or comma-separated components; checked by the planner (model.trainable)


def _apply_upload() -> None:
    """Uploader callback: parse the file and fill the widgets, or keep one line saying what is wrong."""
    upload = st.session_state.get("upload")
    st.session_state.pop("upload_message", None)
    if upload is None:
        return
    try:
        result = read_upload(upload.name, upload.getvalue(), num_samples=st.session_state.get("num_samples", 20))
    except ValueError as error:
        st.session_state["upload_message"] = ("error", f"{upload.name}: {error}")
        return
    fill_sidebar(result.values)
    st.session_state["upload_message"] = ("success", result.summary)


def fill_sidebar(values: dict[str, Any]) -> None:
    """Set widgets by key (an upload, a solver candidate). Call it from a widget's callback: callbacks run
    before the widgets are drawn, so the widgets then show the new values."""
    st.session_state.update(values)


def _draw_upload() -> None:
    st.file_uploader(
        "Fill from a file",
        type=["json", "yaml", "yml"],
        key="upload",
        on_change=_apply_upload,
        max_upload_size=MAX_UPLOAD_MB,
        help="A Hugging Face T5 config.json (becomes a custom size) or a Chronos training YAML "
        "(model_id, lengths, batch and MoE settings).",
    )
    if st.session_state.get("upload") is None:  # no file held (removed, or refused by the widget itself):
        st.session_state.pop("upload_message", None)  # an earlier file's message would name the wrong file
    kind, text = st.session_state.get("upload_message", (None, None))
    if kind == "error":
        st.error(text)
    elif kind == "success":
        st.success(text)


def _draw_custom_dims() -> Optional[tuple[tuple[str, int], ...]]:
    with st.expander("Custom T5 dimensions", expanded=bool(st.session_state.get("custom"))):
        custom = st.checkbox("Add a custom size", value=False, key="custom", bind=BIND)
        small = PRESETS["small"]
        left, right = st.columns(2)
        values = {}
        for i, name in enumerate(CUSTOM_DIMENSIONS):
            with (left if i % 2 == 0 else right):
                values[name] = st.number_input(
                    name, min_value=1, value=getattr(small, name), step=1, key=name, bind=BIND, disabled=not custom
                )
    return tuple(values.items()) if custom else None


def _draw_trainable() -> str:
    """Which parameters learn: a regime, or the components picked (an empty pick is refused by the planner)."""
    choice = st.selectbox(
        "Trainable", list(TRAINABLE_CHOICES), key="trainable", bind=BIND,
        help="all: pretraining or full fine-tuning. experts_and_router: a pretrained dense backbone frozen, "
        "routers and experts learn. experts / router: only those. components: the parts picked below. "
        "Frozen parameters get no gradient, no optimizer state and no weight-gradient FLOPs.")
    if choice != CHOSEN_COMPONENTS:
        return choice
    picked = st.multiselect("Trainable components", list(COMPONENTS), default=["router", "expert_head"],
                            key="trainable_components", bind=BIND)
    return ",".join(picked)


def draw_sidebar() -> Settings:
    """Draw every knob and return what is set."""
    with st.sidebar:
        _draw_upload()
        st.header("Model")
        # Plain names (no format_func): a bound multiselect writes its labels into the share link.
        published = ", ".join(f"{size} {params}" for size, params in PUBLISHED_SIZES.items())
        sizes = st.multiselect(
            "Sizes", list(PRESETS), default=list(DEFAULT_SIZES), key="sizes", bind=BIND,
            help=f"Chronos-T5 presets (published sizes: {published}); `debug` is a tiny test model.",
        )
        custom_dims = _draw_custom_dims()
        architectures = st.multiselect(
            "Architectures", list(ARCHITECTURES), default=list(ARCHITECTURES), key="architectures", bind=BIND,
            help="Where the experts go: expert heads after a shared encoder-decoder, expert encoders, "
            "or token-level expert FFNs in every second block.",
        )
        experts = st.text_input(
            "Expert counts E", value=DEFAULT_EXPERTS, key="experts", bind=BIND,
            help="Comma-separated; 0 is the dense Chronos-T5 every MoE variant is compared with.",
        )
        top_k = st.number_input("Top-k K (experts per series or token)", min_value=1, value=2, step=1,
                                key="top_k", bind=BIND)
        router_hidden_dim = st.number_input("Router hidden width R", min_value=1, value=256, step=32,
                                            key="router_hidden_dim", bind=BIND)
        vocab_size = st.number_input("Vocabulary V", min_value=4, value=4096, step=256, key="vocab_size", bind=BIND)

        st.header("Workload")
        context_length = st.number_input("Context length", min_value=1, value=CONTEXT_LENGTH, step=64,
                                         key="context_length", bind=BIND)
        prediction_length = st.number_input("Prediction length", min_value=1, value=PREDICTION_LENGTH, step=8,
                                            key="prediction_length", bind=BIND)
        batch_size = st.number_input("Batch (series)", min_value=1, value=1, step=1, key="batch_size", bind=BIND)
        num_samples = st.number_input("Sample paths N", min_value=1, value=NUM_SAMPLES, step=1, key="num_samples",
                                      bind=BIND)
        dtype = st.selectbox("Inference dtype", list(DTYPE_BYTES), key="dtype", bind=BIND,
                             help="Weights' format for forecast memory (int8 computes in fp16).")
        optimizer = st.selectbox("Optimizer", list(OPTIMIZERS), key="optimizer", bind=BIND)
        precision = st.selectbox("Training precision", list(PRECISION_REGIMES), key="precision", bind=BIND,
                                 help="fp32; AMP (fp32 weights, half activations); or pure bf16 weights.")
        trainable = _draw_trainable()

        with st.expander("Advanced"):
            dispatch = st.selectbox("Dispatch", list(DISPATCH_MODES), key="dispatch", bind=BIND,
                                    help="sparse runs only the chosen experts; dense runs all and masks "
                                    "(the reference implementation's cost).")
            expert_capacity = st.number_input(
                "Expert capacity factor (token_ffn)", min_value=0.01, value=None, step=0.25, key="expert_capacity",
                bind=BIND, placeholder="no limit", help="Each expert takes at most ceil(c·tokens·K/E) tokens.",
            )
        st.caption(":material/link: The address bar holds every setting: copy it to share this view.")

    return Settings(
        sizes=tuple(sizes), custom_dims=custom_dims, architectures=tuple(architectures), experts=experts,
        top_k=int(top_k), router_hidden_dim=int(router_hidden_dim), vocab_size=int(vocab_size),
        context_length=int(context_length), prediction_length=int(prediction_length), batch_size=int(batch_size),
        num_samples=int(num_samples), dtype=dtype, optimizer=optimizer, precision=precision, trainable=trainable,
        dispatch=dispatch,
        expert_capacity=expert_capacity,
    )
