"""A device model with round numbers, so a test can price ops by hand."""

from planner.steptime.curves import GemmGrid, SizeCurve
from planner.steptime.devices import MEMORY_CLASSES
from planner.steptime.measured import MeasuredDevice

FLOPS_PER_S = 1e10  # every GEMM shape
BYTES_PER_S = 1e10  # every memory-bound class
STREAMED_BYTES_PER_S = 1e9  # operands streamed from memory (an optimizer's first touches)
HOST_S = {"forward": 1e-5, "forecast": 1e-5, "backward": 5e-6, "optimizer": 2e-6}
VIEW_S = 1e-6
SCATTER_S_PER_ROW = 1e-8
FRESH_S_PER_BYTE = 1e-10
PARALLEL_SPEEDUP = 1.8
# Threads kept busy: every memory-bound class 2 below 1 MB and 1 above (a serial kernel at large sizes), the
# scatter 1, fresh pages 1.5, the host per phase.
MEMORY_BUSY = (2.0, 1.0)
SCATTER_BUSY = 1.0
FRESH_PAGE_BUSY = 1.5
HOST_BUSY = {"forward": 1.25, "forecast": 1.25, "backward": 1.5, "optimizer": 1.0}


def simple_measured_device(name: str = "test CPU", dtype: str = "fp32") -> MeasuredDevice:
    flat = ((FLOPS_PER_S,) * 2,) * 2
    grid = GemmGrid((1, 1024), (64, 4096), (64, 4096), (flat, flat))
    curve = SizeCurve((1e3, 1e9), (1e3 / BYTES_PER_S, 1e9 / BYTES_PER_S), MEMORY_BUSY)
    return MeasuredDevice(name, dtype, "2026-01-01", grid, grid, dict.fromkeys(MEMORY_CLASSES, curve),
                          SCATTER_S_PER_ROW, FRESH_S_PER_BYTE, 32 * 2**20, {"forward": 1.0}, dict(HOST_S), VIEW_S,
                          PARALLEL_SPEEDUP, scatter_busy=SCATTER_BUSY, fresh_page_busy=FRESH_PAGE_BUSY,
                          host_busy=dict(HOST_BUSY),
                          streamed_memory=SizeCurve((1e3, 1e9), (1e3 / STREAMED_BYTES_PER_S, 1e9 / STREAMED_BYTES_PER_S),
                                                     (1.0, 1.0)))
