"""Whole runs in hours and money, priced with the step-time model (planner.steptime).

- `training`: a training run (`TrainingRun`) -> step time, hours, device-hours, cost, MFU, bound, headroom;
- `service`: a forecasting service (`ForecastService`) -> latency, throughput, devices, cost per million;
- `search`: the fastest and the cheapest training plans that fit, and the Pareto front between them;
- `links`: the link a run's collectives ride on (planner.communication prices them);
- `prices`, `interconnects`: the presets, each number with its source.
"""
