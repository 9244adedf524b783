"""Chronos-MoE capacity planner: the browser front end (it draws; the planner computes)."""

import streamlit as st

st.set_page_config(page_title="Chronos-MoE capacity planner", layout="wide")
st.title("Chronos-MoE capacity planner")
st.write(
    "Parameters, FLOPs, memory and time of Mixture-of-Experts variants of Chronos-T5, checked against the "
    "real modules. The comparison grid, breakdowns, charts, exports and verification are on their way; "
    "the model package (`model/`) is ready to build and forecast."
)
