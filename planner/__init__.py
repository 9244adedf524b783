"""The analytic capacity planner for Chronos-T5 and its MoE variants: plain Python, no torch.

Parameters (`count_params`), FLOPs (`count_flops`) and memory (`estimate_memory`) of one configuration at one
workload, rolled up by `plan` / `plan_grid` into frozen plans and flat rows (`plan_row`). Verification against
the real modules lives in `planner.verify` (it imports torch); the command line in `python -m planner`.
"""

from planner.flops import FlopBreakdown, FlopCounts, count_flops
from planner.memory import MemoryBreakdown, estimate_memory
from planner.params import ParamBreakdown, count_params
from planner.plan import Plan, breakdown_rows, plan, plan_grid, plan_row
from planner.workload import Workload

__all__ = [
    "FlopBreakdown",
    "FlopCounts",
    "MemoryBreakdown",
    "ParamBreakdown",
    "Plan",
    "Workload",
    "breakdown_rows",
    "count_flops",
    "count_params",
    "estimate_memory",
    "plan",
    "plan_grid",
    "plan_row",
]
