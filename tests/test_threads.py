"""The CPU thread tuner: keeps the fastest count, retries when slowed, skips counts that cannot win."""

from __future__ import annotations

import os

import torch

from tta_cli.threads import ThreadTuner


def test_thread_tuner_keeps_the_fastest_count_and_retries_when_slowed() -> None:
    torch.set_num_threads(2)
    tuner = ThreadTuner(period=4)
    tuner.load.cores = lambda: None  # type: ignore[method-assign]  # no load reading: try every count
    assert tuner.active and tuner.candidates == [2, 1]
    per_image = {2: 1.0, 1: 0.1}  # a busy machine: two threads wait for each other
    seen = []
    for _ in range(3):  # warm-up on one thread, then one batch at each count
        threads = tuner.before_step()
        seen.append(threads)
        tuner.after_step(per_image[threads] * 8, 8)
    assert seen == [1, 2, 1] and tuner.chosen == 1
    assert tuner.before_step() == 1
    tuner.after_step(0.1 * 8, 8)
    for _ in range(2):  # another process starts: 5x slower than the trial
        assert tuner.before_step() == 1
        tuner.after_step(0.5 * 8, 8)
    assert tuner.before_step() == 2  # a new trial at once
    tuner.restore()
    assert torch.get_num_threads() == 2


def test_thread_counts_beyond_the_free_cores_are_not_tried() -> None:
    torch.set_num_threads(2)
    tuner = ThreadTuner()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    tuner.load.cores = lambda: cores - 1.0  # type: ignore[method-assign]  # all but one core busy
    seen = []
    for _ in range(3):
        threads = tuner.before_step()
        seen.append(threads)
        tuner.after_step(0.1, 8)
    assert seen == [1, 1, 1] and tuner.chosen == 1
    tuner.restore()


def test_a_quiet_machine_runs_every_thread_without_trials_until_it_slows() -> None:
    torch.set_num_threads(2)
    tuner = ThreadTuner(period=4)
    load = {"busy": 0.1}
    tuner.load.cores = lambda: load["busy"]  # type: ignore[method-assign]
    seen = []
    for _ in range(10):  # a warm-up batch on one thread, then two threads throughout
        threads = tuner.before_step()
        seen.append(threads)
        tuner.after_step(0.1 * 8, 8)
    assert seen == [1] + [2] * 9 and tuner.chosen == 2
    load["busy"] = 1.0  # another process takes a core: two threads now wait for each other
    assert tuner.before_step() == 2
    tuner.after_step(1.0 * 8, 8)
    assert tuner.before_step() == 2
    tuner.after_step(1.0 * 8, 8)  # two slow batches in a row: a trial at once, on the free core only
    assert tuner.before_step() == 1
    tuner.after_step(0.2 * 8, 8)
    assert tuner.chosen == 1 and tuner.before_step() == 1
    tuner.restore()


def test_decode_workers_decode_in_line_on_a_quiet_two_core_machine() -> None:
    from tta_cli.threads import decode_workers

    assert decode_workers(cores=2, busy=0.1) == 0  # a worker would take a core from torch's threads
    assert decode_workers(cores=2, busy=1.5) == 1  # a loaded machine: the worker gets a CPU share
    assert decode_workers(cores=1, busy=0.0) == 0
    assert decode_workers(cores=4, busy=0.0) == 3
    assert decode_workers(cores=64, busy=0.0) == 8
    assert decode_workers() in range(9)  # sampled from this machine
