"""Child processes of the ``ddpg`` commands: start, watch, stop with a grace period, output.

The launcher and the benchmarks both run a node and its bridges as separate processes (their
command lines: ``control_node.argv``); this is how they start them, wait for the node to answer
its admin socket, stop them (SIGTERM, then SIGKILL if one hangs) and read the JSON summary each
printed last.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_node.admin import AdminError, request

STOP_TIMEOUT_S = 10.0
"""How long a child gets to stop cleanly after SIGTERM before it is killed."""

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LIBC = (
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None
)


def _die_with(parent: int) -> None:
    """In the child, before exec: SIGTERM when the parent dies, however it dies (kill -9 too),
    so a killed launcher leaves no node or bridge behind; they stop as on Ctrl-C. If the
    parent is already gone (it died during the fork), stop now."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Child:
    """One child process, which can be started again after it exits (a bridge's restart).

    By default its stdout comes back through a pipe when it is stopped or collected, and its
    log lines (stderr) go to our stderr. With ``stdout``/``stderr`` paths they go to those files
    instead: a pipe nobody reads while the child runs would stall it once full."""

    name: str
    argv: list[str]
    stdout: Path | None = None
    stderr: Path | None = None
    env: dict[str, str] | None = None
    """None: ours, with MUJOCO_GL defaulting to egl (a bridge renders off-screen)."""
    cwd: Path | None = None
    new_session: bool = True
    """Its own session and process group, so a Ctrl-C at the terminal reaches only us, and we
    stop the children in order."""
    die_with_parent: bool = True
    """SIGTERM when the process that started it dies (Linux: PR_SET_PDEATHSIG)."""
    proc: subprocess.Popen[str] | None = None
    restarts: int = 0
    outputs: list[str] = field(default_factory=list)
    """The stdout of each run that has ended, in order."""

    def start(self) -> None:
        env = self.env
        if env is None:
            env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
        with ExitStack() as files:
            out = files.enter_context(self.stdout.open("w")) if self.stdout else subprocess.PIPE
            err = files.enter_context(self.stderr.open("w")) if self.stderr else None
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                text=True,
                start_new_session=self.new_session,
                env=env,
                cwd=self.cwd,
                preexec_fn=functools.partial(_die_with, os.getpid())
                if self.die_with_parent
                else None,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM if it runs: the node and the bridges then stop cleanly."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    def reap(self, grace_s: float = STOP_TIMEOUT_S) -> int | None:
        """Wait ``grace_s`` for it to exit, SIGKILL if it hangs; keep its stdout."""
        if self.proc is None:
            return None
        try:
            out, _ = self.proc.communicate(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self._keep(out)
        return self.proc.returncode

    def stop(self, grace_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait, SIGKILL if it hangs; keep its stdout."""
        self.terminate()
        return self.reap(grace_s)

    def collect(self, timeout_s: float | None = None) -> int | None:
        """Take the output of a process that exits by itself (subprocess.TimeoutExpired if it
        is still running after ``timeout_s``); its return code."""
        if self.proc is None:
            return None
        out, _ = self.proc.communicate(timeout=timeout_s)
        self._keep(out)
        return self.proc.returncode

    def _keep(self, out: str | None) -> None:
        if self.stdout is not None:
            out = self.stdout.read_text(errors="replace")
        self.outputs.append(out or "")


def last_json(text: str) -> dict[str, Any] | None:
    """The last top-level JSON object in ``text`` (printed with ``indent``, so it starts with a
    line that is exactly ``{``); anything printed before it is ignored. None if there is none."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.rstrip() == "{"]
    for i in reversed(starts):
        try:
            data = json.loads("\n".join(lines[i:]))
        except json.JSONDecodeError:
            continue
        return data if isinstance(data, dict) else None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


class NotReady(RuntimeError):
    """The node did not answer its admin socket: it exited (``returncode``) or stayed silent
    (``returncode`` None)."""

    def __init__(self, returncode: int | None) -> None:
        super().__init__("exited" if returncode is not None else "silent")
        self.returncode = returncode


def wait_for_admin(node: Child, admin: str, timeout_s: float) -> None:
    """Wait until the node answers a status request on ``admin``: it is serving then."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not node.alive():
            raise NotReady(node.proc.returncode if node.proc is not None else None)
        try:
            request(admin, "status", timeout_s=1.0)
            return
        except AdminError:
            if time.monotonic() > deadline:
                raise NotReady(None) from None
            time.sleep(0.05)
