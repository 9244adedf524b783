"""The Streamlit app's pieces: the sidebar returns plain values, `compute` calls the planner (cached),
`tables` and `charts` turn its results into frames and figures. None of them counts anything."""
