"""CPU thread count: chosen by timing steps, since other processes' load decides the fastest."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch


class OtherLoad:
    """How many cores other processes kept busy since the last call (Linux /proc/stat; None
    elsewhere): system busy time minus this process's CPU time, over the wall time."""

    def __init__(self) -> None:
        self.last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0.0)) / os.sysconf("SC_CLK_TCK")
        return busy, time.process_time(), time.perf_counter()

    def cores(self) -> float | None:
        now, last = self._sample(), self.last
        self.last = now
        if now is None or last is None or now[2] - last[2] < 0.05:
            return None
        return max(0.0, (now[0] - last[0]) - (now[1] - last[1])) / (now[2] - last[2])


def available_cores() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


QUIET_BELOW = 0.5
"""Other processes' load (cores) below which a 2-core machine counts as quiet."""


def decode_workers(cores: int | None = None, busy: float | None = None, sample_s: float = 0.1) -> int:
    """Decoding worker processes: one per core beyond the adaptation's, at most 8, except on a
    quiet machine with two cores or fewer, where images are decoded in the main process.

    There a worker takes a core from torch's threads, and every parallel region then waits for the
    thread that lost its core (the issue measured `tta adapt` at 522-576 img/s against the method's
    850 alone); decoding in line costs its own time only. When other processes keep the cores busy
    a worker is kept: it gets a share of the CPU of its own (docs/PERFORMANCE.md). ``busy`` (cores
    other processes use) is sampled over ``sample_s`` when not given.
    """
    cores = available_cores() if cores is None else cores
    if cores > 2:
        return min(8, cores - 1)
    if cores < 2:
        return 0
    if busy is None:
        load = OtherLoad()
        time.sleep(sample_s)
        busy = load.cores()
    return 0 if busy is not None and busy < QUIET_BELOW else 1


class ThreadTuner:
    """Chooses torch's intra-op thread count on the CPU by timing steps.

    When another process keeps a core busy, every parallel region waits for the thread that lost
    its core: on a 2-core machine with one busy core, 2 threads ran SAR 20x slower than 1
    (docs/PERFORMANCE.md). After a warm-up batch on one thread, one batch is timed at each
    candidate count and the fastest kept; the trial is repeated after ``period`` batches, the
    period doubling while the choice holds, and at once when two batches in a row run 3x slower
    than the choice's trial (another process started). Different thread counts may sum in a
    different order (last-bit differences); set OMP_NUM_THREADS to pin the count instead.
    Counts above the cores other processes left free are not tried (they cannot win, and one
    batch at them costs as much as twenty), and on a quiet machine (other processes use less than
    ``QUIET_BELOW`` cores) nothing is tried: all threads win there, and a trial batch on fewer
    threads only costs time.
    """

    SLOWER = 3.0

    def __init__(self, period: int = 32) -> None:
        self.initial = torch.get_num_threads()
        self.candidates = list(dict.fromkeys([self.initial, max(1, self.initial // 2), 1]))
        self.base_period = period
        self.period = period
        self.trial: list[int] = list(self.candidates)
        self.times: dict[int, float] = {}
        self.chosen = 1
        self.next_trial = 1
        self.batch = 0
        self.reference = math.inf  # the chosen count's time per image in its trial
        self.slow_batches = 0
        self.load = OtherLoad()

    @property
    def active(self) -> bool:
        return len(self.candidates) > 1

    def before_step(self) -> int:
        """Set and return the thread count for the next batch."""
        if self.batch == self.next_trial and len(self.trial) == len(self.candidates):
            self._drop_hopeless()
        trying = self.batch >= self.next_trial and self.trial
        threads = self.trial[0] if trying else self.chosen
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def after_step(self, seconds: float, images: int) -> None:
        if images and self.batch >= self.next_trial and self.trial:
            self.times[self.trial.pop(0)] = seconds / images
            if not self.trial:
                self._decide()
        elif images:
            if math.isnan(self.reference):  # chosen without a trial: its first batch is the reference
                self.reference = seconds / images
            self.slow_batches = self.slow_batches + 1 if seconds / images > self.SLOWER * self.reference else 0
            if self.slow_batches >= 2:
                self.next_trial = self.batch + 1
        self.batch += 1
        if self.batch != self.next_trial:
            self.load.cores()  # so that a trial looks at the load during the batch just before it

    def _drop_hopeless(self) -> None:
        """Before a trial: keep the counts that fit the cores left free during the last batch."""
        busy = self.load.cores()
        if busy is None:
            return
        if busy < QUIET_BELOW:
            self._choose(self.initial, math.nan, first_batch=self.batch)
            return
        free = max(1, round(available_cores() - busy))
        self.trial = [n for n in self.trial if n <= free] or [1]

    def _decide(self) -> None:
        best = min(self.times, key=self.times.__getitem__)
        self._choose(best, self.times[best], first_batch=self.batch + 1)

    def _choose(self, threads: int, reference: float, first_batch: int) -> None:
        """Run ``threads`` from ``first_batch`` until the next trial (``reference``: its time per
        image, NaN when unknown yet)."""
        self.period = self.period * 2 if threads == self.chosen else self.base_period
        self.chosen = threads
        self.reference = reference
        self.slow_batches = 0
        self.next_trial = first_batch + self.period
        self.trial = list(self.candidates)
        self.times = {}

    def restore(self) -> None:
        torch.set_num_threads(self.initial)
