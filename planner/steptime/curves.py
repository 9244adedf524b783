"""The shapes of a probed device's measurements: kernel seconds by bytes moved (`SizeCurve`) and GEMM rates
on a grid of shapes (`GemmGrid`), with how each is read between and beyond its measured points. Torch-free."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Optional


def _interpolate(points: list[float], values: list[float], x: float) -> float:
    """Linear interpolation of `values` at `x` over ascending `points`, clamped at both ends."""
    if x <= points[0]:
        return values[0]
    if x >= points[-1]:
        return values[-1]
    i = bisect.bisect_right(points, x) - 1
    t = (x - points[i]) / (points[i + 1] - points[i])
    return values[i] + t * (values[i + 1] - values[i])


@dataclass(frozen=True)
class SizeCurve:
    """Kernel seconds of an op class measured at sizes (bytes moved, ascending): log-log interpolation inside,
    the largest size's throughput beyond it, the smallest size's time below it."""

    sizes: tuple[float, ...]
    seconds: tuple[float, ...]
    busy_threads: tuple[float, ...] = ()  # at each size, the threads the kernel kept busy (kernel_probes.Timed)

    def busy_at(self, size: float) -> Optional[float]:
        """Threads kept busy at `size` bytes: linear in log size between the measured sizes, the nearest
        end outside them; None where the curve has no busy threads measured."""
        if not self.busy_threads:
            return None
        logs = [math.log(s) for s in self.sizes]
        return _interpolate(logs, list(self.busy_threads), math.log(max(size, 1.0)))

    def __call__(self, size: float) -> float:
        if size <= 0:
            return 0.0
        if size >= self.sizes[-1]:
            return self.seconds[-1] * size / self.sizes[-1]
        if size <= self.sizes[0]:
            return self.seconds[0] * size / self.sizes[0]
        logs = [math.log(s) for s in self.sizes]
        return math.exp(_interpolate(logs, [math.log(t) for t in self.seconds], math.log(size)))


@dataclass(frozen=True)
class GemmGrid:
    """GEMM kernel FLOP/s measured at every (m, n, k) of three ascending axes; `rates[i][j][l]` at
    (m_values[i], n_values[j], k_values[l]). Between points, trilinear in log2 of the shape and of the rate;
    outside, the nearest edge (a GEMM larger than the grid runs at the largest measured shape's rate)."""

    m_values: tuple[int, ...]
    n_values: tuple[int, ...]
    k_values: tuple[int, ...]
    rates: tuple[tuple[tuple[float, ...], ...], ...]

    def rate(self, m: int, n: int, k: int) -> float:
        axes = [[math.log2(v) for v in values] for values in (self.m_values, self.n_values, self.k_values)]
        x = [math.log2(max(v, 1)) for v in (m, n, k)]
        log_rates = [[[math.log2(r) for r in row] for row in plane] for plane in self.rates]
        over_k = [[_interpolate(axes[2], row, x[2]) for row in plane] for plane in log_rates]
        over_n = [_interpolate(axes[1], column, x[1]) for column in over_k]
        return 2 ** _interpolate(axes[0], over_n, x[0])
