"""Cost inputs for the planner: per-device prices (prices.py) and interconnect presets (interconnects.py)."""
