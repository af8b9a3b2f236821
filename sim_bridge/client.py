"""The robot client: the robot's side of the wire (``docs/protocol.md``), for code that runs on
or beside a real robot. The MuJoCo bridge (:mod:`sim_bridge.bridge`) is this client plus a
simulator, so a real robot and the simulated one speak through one code path.

It says hello with the robot's :class:`~models.spec.RobotSpec`, sends each observation with the
reward and episode flags of the step that produced it and the action really applied, takes in
the node's actions (sequence number, model id), applies the watchdog (the node's safe action
once no action has come for ``watchdog_ms``), says hello again after a node restart, and says
goodbye. Two ways to drive it, as the wire has two modes:

- ``realtime``: the robot steps on its own clock; each period it calls :meth:`poll` until the
  period's deadline, applies :meth:`command` (the newest action, or the safe one) and sends the
  result with :meth:`send_step`.
- ``lockstep``: it sends an observation and waits for its answer with :meth:`answer` (which
  re-announces and resends while the node is away).

Imports numpy, pyzmq and msgpack only (no gymnasium, MuJoCo or torch): it installs with the
base package on a robot computer. Errors are :class:`ClientError` subclasses.
"""

from __future__ import annotations

import os
import select
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import zmq

from control_node import protocol as P
from models.spec import RobotSpec

HELLO_RETRY_S = 0.25
"""Seconds between hellos while no node has welcomed the robot (docs/protocol.md §5.1)."""
HELLO_FAST_RETRY_S = 0.01
"""After a hello that could not be sent (no TCP connection yet), the next try comes this soon."""
SAMPLES = 200_000
"""Latency samples kept (the newest): over three minutes at 1 kHz, about 7 MB each."""
CLOSE_LINGER_MS = 200
"""At most this long :meth:`RobotClient.close` waits for the goodbye to be sent."""
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class ClientError(RuntimeError):
    """Base of the robot client's errors."""


class RefusedError(ClientError):
    """The node refused this robot for good: its spec does not match the model the node
    serves (``spec_mismatch``). ``code`` and ``reason`` are the node's."""

    def __init__(self, code: str, reason: str, bridge_id: str) -> None:
        super().__init__(f"node refused robot {bridge_id} ({code}): {reason}")
        self.code, self.reason = code, reason


class NodeUnavailable(ClientError):
    """No node welcomed the robot, or answered it, within the time asked."""


class Stopped(ClientError):
    """A wait ended because :meth:`RobotClient.request_stop` was called (e.g. on SIGTERM)."""


class UsageError(ClientError):
    """A call out of order: a step before its episode began, a closed client."""


class Action(NamedTuple):
    """One action to apply: the node's answer, or the safe action (``seq`` -1)."""

    action: np.ndarray
    """float32 (act_dim,), already within the robot's bounds."""
    seq: int
    """The node's sequence number (from 1 per node process); -1: the robot's safe action."""
    safe: bool
    """True for a safe action: the watchdog's, or the node's answer to a non-finite value."""
    model_id: str
    """The model that chose it ("" for the robot's own safe action)."""
    episode: int
    """The observation it answers (-1 for the robot's safe action)."""
    step: int
    t_recv_ns: int
    """When the client received it (CLOCK_MONOTONIC ns; 0 for the safe action)."""


@dataclass(frozen=True)
class Welcome:
    """What the node said when it accepted the robot."""

    model_id: str
    rate_hz: float
    """The node's tick rate."""
    watchdog_ms: float
    """The node's watchdog (informational: the robot applies its own)."""
    pid: int
    safe_action: np.ndarray
    """The node's safe action, clipped to the robot's bounds."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class RobotClient:
    """One robot's connection to a control node (a ZeroMQ DEALER; the node binds).

    ``rate_hz`` is the robot's true step rate in realtime mode (the node phase-locks to it);
    ``watchdog_ms`` how long an action is held before the safe action replaces it (realtime),
    or how long to wait for an answer before re-announcing and resending (lockstep);
    ``spin_us`` how long :meth:`answer` busy-polls before sleeping (saves a wake-up per step,
    costs a core while it spins). Bad arguments raise ValueError naming them.
    """

    def __init__(
        self,
        spec: RobotSpec,
        node: str = "tcp://127.0.0.1:5555",
        bridge_id: str = "robot0",
        mode: str = "realtime",
        rate_hz: float = 0.0,
        watchdog_ms: float = 100.0,
        spin_us: float = 0.0,
        log: Callable[[str], None] = _stderr,
    ) -> None:
        if mode not in P.MODES:
            raise ValueError(f"mode = {mode!r}: choose realtime or lockstep")
        if mode == "realtime" and not rate_hz > 0:
            raise ValueError(f"rate_hz = {rate_hz!r}: a realtime robot declares its step rate")
        if not watchdog_ms > 0:
            raise ValueError(f"watchdog_ms = {watchdog_ms!r}: must be > 0")
        if not spin_us >= 0:
            raise ValueError(f"spin_us = {spin_us!r}: must be >= 0")
        if not bridge_id or not set(bridge_id) <= _ID_CHARS:
            raise ValueError(f"bridge_id = {bridge_id!r}: use letters, digits, '-' and '_'")
        if spec.obs_dtype not in P.DTYPES:
            raise ValueError(f"spec obs_dtype {spec.obs_dtype!r}: the wire takes float32 or uint8")
        self.spec, self.node, self.bridge_id, self.mode = spec, node, bridge_id, mode
        self.rate_hz = 0.0 if mode == "lockstep" else float(rate_hz)
        self.watchdog_ns = round(watchdog_ms * 1e6)
        self.spin_ns = round(spin_us * 1e3)
        self.log = log
        self.session = os.urandom(8).hex()
        self.obs_dtype = np.dtype(spec.obs_dtype)
        self.obs_shape = spec.obs_shape
        self._act_shape = (spec.act_dim,)
        self._pixels = None if spec.pixels is None else spec.pixels.to_dict()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue observations for a node not there
        try:
            self.sock.connect(node)
        except zmq.ZMQError as e:
            self.sock.close(linger=0)
            self.ctx.term()
            raise ValueError(f"node = {node!r}: not a ZeroMQ endpoint ({e})") from None
        self.fd = self.sock.getsockopt(zmq.FD)
        P.set_timer_slack()
        self._stop = False
        self._closed = False
        self.connected = False
        self.welcome: Welcome | None = None
        self._last_hello = 0
        self.safe = self._safe_action(np.zeros(spec.act_dim, np.float32))
        self.newest = self.safe  # the newest action received
        self._last_step = 0
        self.episode, self.step = 0, 0
        self._in_episode = False
        self._waiting_for: tuple[int, int] | None = None
        self._answer: Action | None = None
        self._obs_sent_ns = 0
        self._last_obs: list[bytes | memoryview] | None = None
        # counters and samples, for summaries
        self.transitions_sent = 0  # observations with step > 0 sent on this connection
        self.transitions_sent_total = 0
        self.unsent = 0
        self.errors: dict[str, int] = {}
        # latency samples (ns), the newest SAMPLES: a robot runs for days
        self.delivery: deque[int] = deque(maxlen=SAMPLES)  # node sent action -> received
        self.round_trip: deque[int] = deque(maxlen=SAMPLES)  # lockstep: obs sent -> its answer

    @property
    def model_id(self) -> str:
        """The model the node served when it last welcomed the robot ("" before)."""
        return "" if self.welcome is None else self.welcome.model_id

    @property
    def stopped(self) -> bool:
        return self._stop

    def request_stop(self) -> None:
        """Make every wait return (:meth:`poll`) or raise :class:`Stopped`; safe in a signal
        handler."""
        self._stop = True

    def _safe_action(self, action: np.ndarray) -> Action:
        clipped = np.clip(action, self.spec.act_low, self.spec.act_high).astype(np.float32)
        return Action(clipped, -1, True, "", -1, -1, 0)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"robot client {self.bridge_id} is closed")

    # -- connecting ---------------------------------------------------------------------------
    def connect(self, timeout_s: float | None = None) -> Welcome:
        """Say hello until a node welcomes the robot; :class:`NodeUnavailable` after
        ``timeout_s`` (None: until welcomed or stopped), :class:`RefusedError` if the node
        refuses the spec, :class:`Stopped` on :meth:`request_stop`."""
        self._check_open()
        end = None if timeout_s is None else P.now_ns() + round(timeout_s * 1e9)
        self._connect(end)
        if self.connected:
            assert self.welcome is not None
            return self.welcome
        if self._stop:
            raise Stopped(f"robot client {self.bridge_id} stopped before a node welcomed it")
        raise NodeUnavailable(
            f"no node at {self.node} welcomed robot {self.bridge_id} within {timeout_s:g} s"
        )

    def _connect(self, end: int | None) -> None:
        """Say hello until welcomed (or stopped, or ``end`` passes)."""
        self._hello()
        while not self.connected and not self._stop and (end is None or P.now_ns() < end):
            t = P.now_ns() + round(HELLO_RETRY_S * 1e9)
            self.poll(t if end is None else min(t, end))

    def _hello(self) -> None:
        """Announce the robot. With IMMEDIATE, a send before the TCP connection is up fails;
        then the next try comes after HELLO_FAST_RETRY_S instead of HELLO_RETRY_S."""
        self._last_hello = P.now_ns()
        spec = self.spec
        sent = self._send(
            P.hello(
                self.bridge_id,
                self.session,
                spec.env_id,
                spec.obs_shape,
                self.obs_dtype.name,
                spec.act_low,
                spec.act_high,
                self.mode,
                self.rate_hz,  # the actual step rate (0.0 in lockstep)
                os.getpid(),
                self._pixels,
            )
        )
        if not sent:
            self.unsent -= 1  # not an observation lost: the connection is not up yet
            self._last_hello -= round((HELLO_RETRY_S - HELLO_FAST_RETRY_S) * 1e9)

    # -- receiving ----------------------------------------------------------------------------
    def _send(self, frames: list[bytes | memoryview]) -> bool:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:  # no node connected (IMMEDIATE) or its queue is full
            self.unsent += 1
            return False

    def _drain(self) -> None:
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
            t_recv = P.now_ns()
            try:
                msg = P.decode(frames)
            except P.ProtocolError as e:
                self._count_error(e.code, f"bad message from node: {e.reason}")
                continue
            self._on_message(msg, t_recv)

    def _on_message(self, msg: P.Message, t_recv: int) -> None:
        if msg.type == P.ACTION:
            action = msg.arrays["action"]
            if action.shape != self._act_shape or msg["seq"] <= self.newest.seq:
                return  # a stale or malformed answer: the newest action wins
            got = Action(
                action,
                msg["seq"],
                msg["safe"],
                msg["model_id"],
                msg["episode"],
                msg["step"],
                t_recv,
            )
            self.newest = got
            self.delivery.append(t_recv - msg["t_send_ns"])
            if got.safe:
                self.errors["safe_action_from_node"] = (
                    self.errors.get("safe_action_from_node", 0) + 1
                )
            if self._waiting_for == (got.episode, got.step):
                self._answer = got
                self.round_trip.append(t_recv - self._obs_sent_ns)
        elif msg.type == P.WELCOME:
            self.connected = True
            self.safe = self._safe_action(msg.arrays["safe_action"])
            self.newest = self.safe  # a new node numbers its actions from 1 again
            self.welcome = Welcome(
                msg["model_id"], msg["rate_hz"], msg["watchdog_ms"], msg["pid"], self.safe.action
            )
            self.transitions_sent = 0
            self.log(f"bridge {self.bridge_id}: connected to node (model {self.model_id})")
        elif msg.type == P.ERROR:
            code = msg["code"]
            if code == "spec_mismatch":
                raise RefusedError(code, msg["reason"], self.bridge_id)
            if code == "duplicate_bridge":  # our predecessor's entry has not gone stale
                self._count_error(code, f"node: {msg['reason']}; retrying")
                self.connected = False
                return
            if code in ("unknown_bridge", "stopping"):  # node restarted, or is stopping
                if self.connected:
                    self.log(f"bridge {self.bridge_id}: node does not know us; saying hello again")
                self.connected = False
                return
            self._count_error(code, f"node error: {msg['reason']}")
        elif msg.type == P.BYE:
            self.log(f"bridge {self.bridge_id}: node said bye ({msg['reason']}); will reconnect")
            self._bye("node stopping")
            self.connected = False

    def _count_error(self, code: str, line: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        if self.errors[code] <= 3:
            self.log(f"bridge {self.bridge_id}: {line}")

    def poll(self, until_ns: int, spin_ns: int = 0) -> None:
        """Take in messages until ``until_ns`` (CLOCK_MONOTONIC ns, ``time.monotonic_ns()``);
        return early when a node welcomes the robot, or when the answer :meth:`answer` waits
        for arrives, or on :meth:`request_stop`. Says hello while no node has welcomed it.
        ``spin_ns``: busy-poll the last stretch before ``until_ns`` instead of sleeping in it,
        yielding between looks, so a realtime robot's next step starts on time (a wake-up from
        sleep comes tens of microseconds late)."""
        was_connected = self.connected
        if self._waiting_for is not None and self.spin_ns > 0:
            spin_end = min(until_ns, P.now_ns() + self.spin_ns)
            while self._answer is None and P.now_ns() < spin_end:
                self._drain()
        while not self._stop:
            self._drain()
            if self._waiting_for is not None and self._answer is not None:
                return
            if self.connected and not was_connected:
                return
            now = P.now_ns()
            if not self.connected and now - self._last_hello > HELLO_RETRY_S * 1e9:
                self._hello()
            remaining = until_ns - now
            if remaining <= 0:
                return
            if remaining <= spin_ns:
                os.sched_yield()
                continue
            retry = HELLO_FAST_RETRY_S if not self.connected else HELLO_RETRY_S
            select.select([self.fd], [], [], min((remaining - spin_ns) / 1e9, retry))

    # -- realtime -----------------------------------------------------------------------------
    def command(self) -> Action:
        """What to apply now (realtime): the newest action if it came since the previous call
        or within ``watchdog_ms``, else the safe action (also while no node is connected). An
        action that came since the previous step answers the newest observation, so a robot
        slower than its watchdog applies it all the same."""
        now, newest = P.now_ns(), self.newest
        fresh = self.connected and (
            newest.t_recv_ns > self._last_step or now - newest.t_recv_ns <= self.watchdog_ns
        )
        self._last_step = now
        return newest if fresh else self.safe

    # -- observations -------------------------------------------------------------------------
    def begin_episode(self, obs: np.ndarray, t_obs_ns: int | None = None) -> None:
        """Send the first observation of an episode (step 0, after the robot's reset). An
        episode left unfinished moves the count on, so the node never sees it continue."""
        self._check_open()
        before = self.episode, self.step, self._in_episode
        self.episode += self._in_episode
        self.step, self._in_episode = 0, True
        try:
            self._send_obs(
                obs, 0.0, False, False, None, P.now_ns() if t_obs_ns is None else t_obs_ns
            )
        except ValueError:  # a bad observation changes nothing
            self.episode, self.step, self._in_episode = before
            raise

    def send_step(
        self,
        obs: np.ndarray,
        reward: float,
        terminated: bool,
        truncated: bool,
        applied: Action,
        applied_action: np.ndarray | None = None,
        t_obs_ns: int | None = None,
    ) -> None:
        """Send the observation after one step, with that step's reward and flags and the
        action that produced it: ``applied`` (from :meth:`command` or :meth:`answer`), or
        ``applied_action`` where the robot applied something else (its own clipping). A
        terminated or truncated step ends the episode: :meth:`begin_episode` starts the next."""
        if not self._in_episode:
            self._check_open()
            raise UsageError("send_step before begin_episode: start each episode with its obs")
        action = applied.action if applied_action is None else applied_action
        self.step += 1
        try:
            self._send_obs(
                obs,
                reward,
                terminated,
                truncated,
                (applied.seq, applied.safe, action),
                P.now_ns() if t_obs_ns is None else t_obs_ns,
            )
        except ValueError:  # a bad observation or action changes nothing
            self.step -= 1
            raise
        if terminated or truncated:
            self._in_episode = False
            self.episode += 1

    def _send_obs(
        self,
        obs: np.ndarray,
        reward: float,
        terminated: bool,
        truncated: bool,
        applied: tuple[int, bool, np.ndarray] | None,
        t_obs: int,
    ) -> None:
        a = np.asarray(obs, dtype=self.obs_dtype)
        if a.shape != self.obs_shape:
            raise ValueError(f"observation shape {a.shape} != the spec's {self.obs_shape}")
        arrays = {"obs": a}
        seq, safe = -1, False
        if applied is not None:
            seq, safe, action = applied
            act = np.asarray(action, dtype=np.float32)
            if act.shape != self._act_shape:
                raise ValueError(f"applied action shape {act.shape} != {self._act_shape}")
            arrays["action"] = act
        fields = {
            "bridge_id": self.bridge_id,
            "episode": self.episode,
            "step": self.step,
            "reward": float(reward),
            "terminated": bool(terminated),
            "truncated": bool(truncated),
            "applied_seq": seq,
            "applied_safe": bool(safe),
            "t_obs_ns": t_obs,
            "t_send_ns": P.now_ns(),
        }
        self._last_obs = P.encode(P.OBS, fields, arrays)
        self._obs_sent_ns = P.now_ns()  # the round trip starts as the message leaves
        if self.connected and self._send(self._last_obs) and self.step > 0:
            self.transitions_sent += 1
            self.transitions_sent_total += 1

    # -- lockstep -----------------------------------------------------------------------------
    def answer(self, timeout_s: float | None = None) -> Action:
        """The node's answer to the last observation sent (lockstep). With none within
        ``watchdog_ms`` it counts a ``timeout``, says hello again (until welcomed) and resends
        that observation unchanged; :class:`NodeUnavailable` once ``timeout_s`` passes without
        an answer (None: wait until stopped), :class:`Stopped` on :meth:`request_stop`."""
        self._check_open()
        end = None if timeout_s is None else P.now_ns() + round(timeout_s * 1e9)
        while True:
            if end is not None and P.now_ns() >= end:
                raise NodeUnavailable(
                    f"no answer from a node at {self.node} for robot {self.bridge_id} "
                    f"within {timeout_s:g} s"
                )
            self._waiting_for, self._answer = (self.episode, self.step), None
            self.poll(P.now_ns() + self.watchdog_ns)
            answer = self._answer
            self._waiting_for = None
            if answer is not None:
                return answer
            if self._stop:
                raise Stopped(f"robot client {self.bridge_id} stopped waiting for an answer")
            self.errors["timeout"] = self.errors.get("timeout", 0) + 1
            self._connect(end)
            self._resend_current()

    def _resend_current(self) -> None:
        """Send the last observation again after a reconnect (a node that never saw it starts
        a new transition chain there; one that did counts a gap and logs nothing twice)."""
        if self._last_obs is not None and self.connected:
            self._send(self._last_obs)

    # -- goodbye ------------------------------------------------------------------------------
    def _bye(self, reason: str) -> None:
        self._send(P.encode(P.BYE, {"reason": reason, "transitions_sent": self.transitions_sent}))

    def goodbye(self, reason: str = "bridge stopping") -> None:
        """Tell the node the robot leaves (with how many transitions it sent), if connected."""
        if self.connected and not self._closed:
            self._bye(reason)
            self.connected = False

    def close(self) -> None:
        """Say goodbye (if connected) and close the socket; the client cannot be used after."""
        if self._closed:
            return
        self.goodbye()
        self._closed = True
        # a moment for the bye to leave; nothing else waits (IMMEDIATE queues nothing for a
        # node that is not there)
        self.sock.close(linger=CLOSE_LINGER_MS)
        self.ctx.term()

    def __enter__(self) -> RobotClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
