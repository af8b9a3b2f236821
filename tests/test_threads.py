"""Torch threads for the updates (training/threads.py): auto takes the CPUs free of other work
and gives threads back when other processes take CPUs; an explicit count is kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from training import threads as T
from training.threads import ThreadPolicy


@contextmanager
def every_cpu_busy() -> Iterator[None]:
    """A real process spinning on each CPU this process may use, stopped on the way out."""
    spin = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"
    procs = [
        subprocess.Popen([sys.executable, "-c", spin, str(cpu)])
        for cpu in sorted(os.sched_getaffinity(0))
    ]
    try:
        time.sleep(0.3)  # running
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_an_explicit_count_is_kept_and_never_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "RECHECK_S", 0.0)
    policy = ThreadPolicy(3, log=False)
    assert (policy.threads, torch.get_num_threads(), policy.auto) == (3, 3, False)
    with every_cpu_busy():
        policy.check()
    assert policy.threads == torch.get_num_threads() == 3


def test_auto_takes_omp_num_threads_where_it_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    policy = ThreadPolicy(0, log=False)
    assert (policy.threads, torch.get_num_threads(), policy.auto) == (2, 2, False)


def test_auto_takes_one_thread_when_every_cpu_is_busy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with every_cpu_busy():
        policy = ThreadPolicy(0)
    assert policy.auto and policy.threads == torch.get_num_threads() == 1
    assert "torch threads: 1 (auto: CPUs free of other work)" in capsys.readouterr().err
    quiet = ThreadPolicy(0, log=False)  # whatever else runs here: between 1 and the cap
    assert 1 <= quiet.threads <= min(T.MAX_AUTO, len(os.sched_getaffinity(0)))


def test_auto_gives_threads_back_when_other_work_takes_the_cpus(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As if auto had started with two on a quiet machine: once every CPU is busy with other
    processes, the next check drops to one thread; with them gone it does not climb back."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(T, "RECHECK_S", 0.5)
    policy = ThreadPolicy(0)
    policy.threads = 2
    torch.set_num_threads(2)
    with every_cpu_busy():
        policy._mark = policy._now()
        policy.check()  # too soon: nothing changes
        assert policy.threads == 2
        time.sleep(0.6)
        policy.check()
    assert policy.threads == torch.get_num_threads() == 1
    assert "torch threads: 2 -> 1 (other processes are using CPUs" in capsys.readouterr().err
    time.sleep(0.6)
    policy.check()
    assert policy.threads == 1
