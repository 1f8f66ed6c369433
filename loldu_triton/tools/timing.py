"""Timing for the benchmarks: samples long enough to mean something, phases timed on their own, ratios paired
per round, and the spread of every ratio (a row whose range holds another method's median is not ranked)."""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

# Each timed sample lasts at least this long in each of its phases: far above the clock's resolution (1 ns for
# perf_counter, ~0.5 us for CUDA events) and several scheduler ticks of a shared machine, so a small layer's
# sample is many calls. Tests lower it to run in seconds.
SAMPLE_MS = {"cpu": 25.0, "cuda": 50.0}
MAX_CALLS = 100_000


class Clock:
    """Marks on the device's timeline: perf_counter on the CPU, CUDA events on a GPU (read after one
    synchronize, as do_bench does). A duration is a later mark less an earlier one, so it is never negative."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else 1e3 * (end - start)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


def time_calls(phases, calls: int, clock: Clock, reset: Optional[Callable[[], None]] = None) -> List[float]:
    """Milliseconds per call of each phase, summed over `calls` calls of the phases in order (a phase gets what
    the one before returned; the first gets nothing); `reset` runs after each call, outside the timed spans.
    So backward is timed on its own, its forward just before it but outside its span."""
    if len(phases) == 1 and reset is None:  # one span around the loop: no mark inside it
        start = clock.mark()
        for _ in range(calls):
            phases[0]()
        end = clock.mark()
        clock.sync()
        totals = [clock.ms(start, end)]
    else:
        marks = []
        for _ in range(calls):
            row = [clock.mark()]
            out = phases[0]()
            row.append(clock.mark())
            for phase in phases[1:]:
                out = phase(out)
                row.append(clock.mark())
            marks.append(row)
            if reset is not None:
                reset()
        clock.sync()
        totals = [sum(clock.ms(row[k], row[k + 1]) for row in marks) for k in range(len(phases))]
    per_call = [t / calls for t in totals]
    if not all(t > 0 for t in per_call):  # spans between marks of a monotonic clock: a broken clock otherwise
        raise RuntimeError(f"a measured time is not positive: {per_call} ms")
    return per_call


def calibrate(phases, clock: Clock, reset=None, target_ms: Optional[float] = None) -> int:
    """Calls per chunk of a sample, after two warm-up calls (compiles, autotuning, caches). On the CPU one: the
    sample reads the clock after every call. CUDA events are read after a synchronize, so there a chunk is as
    many calls as make each phase last target_ms (the faster of two tries: one stall does not shorten it)."""
    time_calls(phases, 2, clock, reset)
    if not clock.cuda:
        return 1
    target = SAMPLE_MS[clock.device.type] if target_ms is None else target_ms
    calls = 1
    while True:
        shortest = calls * min(min(time_calls(phases, calls, clock, reset)) for _ in range(2))
        if shortest >= target or calls >= MAX_CALLS:
            return calls
        calls = min(MAX_CALLS, max(2 * calls, math.ceil(1.2 * calls * target / shortest)))


def sample(phases, calls: int, clock: Clock, reset=None, target_ms: Optional[float] = None):
    """One timed sample: chunks of `calls` calls (see calibrate) until each phase has lasted target_ms in all,
    whether the machine runs slower or faster than at calibration. Returns (ms per call of each phase, calls)."""
    target = SAMPLE_MS[clock.device.type] if target_ms is None else target_ms
    totals, count = [0.0] * len(phases), 0
    while True:
        per_call = time_calls(phases, calls, clock, reset)
        totals = [t + calls * p for t, p in zip(totals, per_call)]
        count += calls
        if min(totals) >= target or count >= MAX_CALLS:
            return [t / count for t in totals], count


def spread(values: List[float]) -> Tuple[float, float, float]:
    """Median, min and max of per-round values."""
    return statistics.median(values), min(values), max(values)


def unranked(ratios: Dict[str, List[float]]) -> Dict[str, bool]:
    """Per method: whether the range (min to max) of its per-round ratios holds another method's median ratio
    (the floor's is 1), so that this run cannot tell which of the two is faster."""
    medians = {name: statistics.median(v) for name, v in ratios.items()}
    return {name: any(min(v) <= medians[other] <= max(v) for other in ratios if other != name)
            for name, v in ratios.items()}


def machine(device: torch.device) -> str:
    """What the times were measured on, for the line above each table: on a shared CPU the load average next to
    the core count says why rows are noisy."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"CPU: {torch.get_num_threads()} torch threads, {os.cpu_count()} cores{load}, "
            f"torch {torch.__version__}")


def ratio_cell(median: float, low: float, high: float) -> str:
    """A ratio and its range over rounds, as every table prints it: 1.130 (1.051-1.302)."""
    return f"{median:.3f} ({low:.3f}-{high:.3f})"
