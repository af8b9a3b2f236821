"""The simulator bridge: a Gymnasium MuJoCo environment acting as the robot the node controls.

``realtime``: physics advances on the bridge's own clock whether or not an action came: by
default at the environment's own rate, 1/dt times ``real_time_factor``, so simulated time runs
at wall-clock speed (1.0); an explicit ``rate_hz`` overrides it. Each period it applies the
newest action received, or holds the last one; once no action has come for ``watchdog_ms``
(nor since its last step) it applies the node's safe action instead. It then sends the new
observation with the reward and the episode flags of the step that produced it, the sequence
number of the action it applied, and that action itself, so the node logs what really happened.

``lockstep``: it sends an observation and waits for the action that answers it, so evaluation
runs as fast as the node answers and reproduces ``ddpg eval`` exactly on the same seeds.

With ``pixels`` the robot's observation is rendered frames (``sim_bridge.pixels``, the trainer's
own pipeline): uint8 ``(3 * stack, size, size)``, oldest frame first, sent as raw bytes; one
bridge step is ``repeat`` physics steps, so the environment's own rate is 1/(dt * repeat), and
``rate_hz`` counts bridge steps.

Episode ``i`` resets with ``seed + i``. If the node stops (it says bye) or forgets the bridge
(it restarted), the bridge says hello again until a node welcomes it; a realtime bridge keeps
simulating with the safe action meanwhile, as a robot would.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from control_node import protocol as P
from control_node import realtime
from control_node.config import BridgeConfig
from sim_bridge.envs import EnvError, env_spec, make_env
from sim_bridge.pixels import make_pixel_env

HELLO_RETRY_S = 0.25
HELLO_FAST_RETRY_S = 0.01


class BridgeError(RuntimeError):
    """The node refused this bridge for good (spec mismatch, duplicate id)."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _percentiles_us(samples: list[int]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    p50, p99 = np.percentile(samples, [50, 99]) / 1e3
    return {
        "p50": round(p50, 1),
        "p99": round(p99, 1),
        "max": max(samples) / 1e3,
        "n": len(samples),
    }


def step_seconds(env: Any, repeat: int = 1) -> float | None:
    """Simulated seconds per bridge step: the environment's ``dt`` (MuJoCo: frame_skip x the
    model's timestep), else 1/render_fps, times the action repeat; None if it says neither."""
    dt = getattr(env.unwrapped, "dt", None)
    if dt is None:
        fps = env.metadata.get("render_fps")
        dt = 1.0 / fps if fps else None
    return None if dt is None else float(dt) * repeat


class Bridge:
    """One environment, one DEALER socket to the node; :meth:`run` drives it."""

    def __init__(self, cfg: BridgeConfig, log: Callable[[str], None] = _stderr) -> None:
        cfg.validate()
        self.cfg, self.log = cfg, log
        kwargs: dict[str, Any] = {}
        if cfg.max_episode_steps:
            kwargs["max_episode_steps"] = cfg.max_episode_steps
        self.pixels = cfg.pixels
        if self.pixels is None:
            self.env = make_env(cfg.env, **kwargs)
        else:  # uint8 stacked frames, sent as they are: no float conversion, no copy
            self.env = make_pixel_env(cfg.env, self.pixels, **kwargs)
        self.spec = env_spec(cfg.env, self.env)
        self.step_s = step_seconds(self.env, 1 if self.pixels is None else self.pixels.repeat)
        self.rate_hz, self.real_time_factor = self._pacing()
        self.obs_dtype = np.dtype(self.spec.obs_dtype)
        self.session = os.urandom(8).hex()
        self.safe_action = np.clip(np.zeros(self.spec.act_dim, np.float32), *self._bounds())
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue observations for a node not there
        self.sock.connect(cfg.node)
        self.fd = self.sock.getsockopt(zmq.FD)
        P.set_timer_slack()
        self._stop = False
        self.connected = False
        self.model_id = ""
        self._last_hello = 0
        # the newest action received: (seq, action, time received)
        self.action_seq, self.action, self.action_ns = -1, self.safe_action, 0
        self.action_safe = False
        self.episode, self.step = 0, 0
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.transitions_sent = 0  # observations with step > 0 sent on this connection
        self.transitions_sent_total = 0
        self.unsent = 0
        self.safe_steps = 0  # steps that applied the safe action (watchdog or node's safe flag)
        self.misses = 0
        self.steps = 0
        self.errors: dict[str, int] = {}
        self.delivery: list[int] = []  # node sent action -> bridge received it (shared clock)
        self.round_trip: list[int] = []  # lockstep: observation sent -> its action received
        self._waiting_for: tuple[int, int] | None = None
        self._obs_sent_ns = 0
        self._answer: np.ndarray | None = None
        self._last_obs: list[bytes | memoryview] | None = None
        self.realtime: dict[str, Any] | None = None  # the real-time settings in effect, once run

    def _pacing(self) -> tuple[float, float | None]:
        """Realtime steps per second and the real-time factor they make (None: the environment
        has no dt); 0.0 and None in lockstep, which steps as fast as the node answers."""
        cfg, dt = self.cfg, self.step_s
        if cfg.mode != "realtime":
            return 0.0, None
        if cfg.rate_hz is not None:
            return cfg.rate_hz, None if dt is None else cfg.rate_hz * dt
        if dt is None:
            self.env.close()
            raise EnvError(f"environment {cfg.env!r} has no dt to step it at; set rate_hz")
        return cfg.real_time_factor / dt, cfg.real_time_factor

    def pacing_line(self) -> str:
        """One line saying how fast this realtime bridge steps, and why."""
        cfg, dt = self.cfg, self.step_s
        line = f"bridge {cfg.id}: {cfg.env}"
        if dt is not None:
            line += f" dt {dt / (self.pixels.repeat if self.pixels else 1) * 1e3:g} ms"
            line += f" x {self.pixels.repeat} (action repeat)" if self.pixels else ""
        line += f": {self.rate_hz:.1f} Hz"
        if cfg.rate_hz is not None:
            line += " from rate_hz"
            line += "," if self.real_time_factor is not None else ""
        if self.real_time_factor is not None:
            line += f" at real-time factor {round(self.real_time_factor, 3)}"
        return line

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return self.spec.act_low, self.spec.act_high

    def request_stop(self) -> None:
        self._stop = True

    # -- messages -------------------------------------------------------------------------------
    def _send(self, frames: list[bytes | memoryview]) -> bool:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:  # no node connected (IMMEDIATE) or its queue is full
            self.unsent += 1
            return False

    def _hello(self) -> None:
        """Announce this bridge. With IMMEDIATE, a send before the TCP connection is up fails;
        then the next try comes after HELLO_FAST_RETRY_S instead of HELLO_RETRY_S."""
        self._last_hello = P.now_ns()
        low, high = self._bounds()
        sent = self._send(
            P.hello(
                self.cfg.id,
                self.session,
                self.cfg.env,
                self.spec.obs_shape,
                self.obs_dtype.name,
                low,
                high,
                self.cfg.mode,
                self.rate_hz,  # the actual step rate (0.0 in lockstep)
                os.getpid(),
                None if self.pixels is None else self.pixels.to_dict(),
            )
        )
        if not sent:
            self.unsent -= 1  # not an observation lost: the connection is not up yet
            self._last_hello -= round((HELLO_RETRY_S - HELLO_FAST_RETRY_S) * 1e9)

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
            if action.shape != (self.spec.act_dim,) or msg["seq"] <= self.action_seq:
                return  # a stale or malformed answer: the newest action wins
            self.action_seq, self.action, self.action_ns = msg["seq"], action, t_recv
            self.action_safe = bool(msg["safe"])
            self.delivery.append(t_recv - msg["t_send_ns"])
            if msg["safe"]:
                self.errors["safe_action_from_node"] = (
                    self.errors.get("safe_action_from_node", 0) + 1
                )
            if self._waiting_for == (msg["episode"], msg["step"]):
                self._answer = action
                self.round_trip.append(t_recv - self._obs_sent_ns)
        elif msg.type == P.WELCOME:
            self.connected = True
            self.action_seq = -1  # a new node numbers its actions from 1 again
            self.model_id = msg["model_id"]
            self.safe_action = np.clip(msg.arrays["safe_action"], *self._bounds()).astype(
                np.float32
            )
            self.transitions_sent = 0
            self.log(f"bridge {self.cfg.id}: connected to node (model {self.model_id})")
        elif msg.type == P.ERROR:
            if msg["code"] == "spec_mismatch":
                raise BridgeError(f"node refused bridge {self.cfg.id}: {msg['reason']}")
            if msg["code"] == "duplicate_bridge":  # our predecessor's entry has not gone stale
                self._count_error("duplicate_bridge", f"node: {msg['reason']}; retrying")
                self.connected = False
                return
            if msg["code"] in ("unknown_bridge", "stopping"):  # node restarted, or is stopping
                if self.connected:
                    self.log(f"bridge {self.cfg.id}: node does not know us; saying hello again")
                self.connected = False
                return
            self._count_error(msg["code"], f"node error: {msg['reason']}")
        elif msg.type == P.BYE:
            self.log(f"bridge {self.cfg.id}: node said bye ({msg['reason']}); will reconnect")
            self._bye("node stopping")
            self.connected = False

    def _count_error(self, code: str, line: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        if self.errors[code] <= 3:
            self.log(f"bridge {self.cfg.id}: {line}")

    def _bye(self, reason: str) -> None:
        self._send(P.encode(P.BYE, {"reason": reason, "transitions_sent": self.transitions_sent}))

    def _wait(self, t_target: int) -> None:
        """Take in messages until ``t_target`` (monotonic ns), or until the awaited lockstep
        answer arrives, or a welcome; keep saying hello while no node has welcomed us."""
        was_connected = self.connected
        if self._waiting_for is not None and self.cfg.spin_us > 0:
            spin_end = min(t_target, P.now_ns() + round(self.cfg.spin_us * 1e3))
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
            remaining = t_target - now
            if remaining <= 0:
                return
            retry = HELLO_FAST_RETRY_S if not self.connected else HELLO_RETRY_S
            select.select([self.fd], [], [], min(remaining / 1e9, retry))

    def _send_obs(
        self,
        obs: np.ndarray,
        reward: float,
        terminated: bool,
        truncated: bool,
        applied: tuple[int, bool, np.ndarray] | None,
        t_obs: int,
    ) -> None:
        arrays = {"obs": np.asarray(obs, dtype=self.obs_dtype)}
        seq, safe = -1, False
        if applied is not None:
            seq, safe, action = applied
            arrays["action"] = np.asarray(action, dtype=np.float32)
        fields = {
            "bridge_id": self.cfg.id,
            "episode": self.episode,
            "step": self.step,
            "reward": float(reward),
            "terminated": bool(terminated),
            "truncated": bool(truncated),
            "applied_seq": seq,
            "applied_safe": safe,
            "t_obs_ns": t_obs,
            "t_send_ns": P.now_ns(),
        }
        self._obs_sent_ns = fields["t_send_ns"]
        self._last_obs = P.encode(P.OBS, fields, arrays)
        if self.connected and self._send(self._last_obs) and self.step > 0:
            self.transitions_sent += 1
            self.transitions_sent_total += 1

    # -- episodes -------------------------------------------------------------------------------
    def _reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=self.cfg.seed + self.episode)
        self.step, self._ep_return = 0, 0.0
        self._send_obs(obs, 0.0, False, False, None, P.now_ns())
        return obs

    def _apply(self, action: np.ndarray, seq: int, safe: bool) -> bool:
        """Step the environment with ``action`` and report it; True when the episode ended."""
        low, high = self._bounds()
        action = np.clip(action, low, high).astype(np.float32)
        obs, reward, terminated, truncated, _ = self.env.step(action)
        t_obs = P.now_ns()
        self.step += 1
        self.steps += 1
        self.safe_steps += safe
        self._ep_return += float(reward)
        self._send_obs(obs, float(reward), terminated, truncated, (seq, safe, action), t_obs)
        if terminated or truncated:
            self.returns.append(self._ep_return)
            self.lengths.append(self.step)
            self.episode += 1
            return True
        return False

    def _episodes_done(self) -> bool:
        return bool(self.cfg.episodes) and self.episode >= self.cfg.episodes

    def _connect(self, end: int | None) -> None:
        """Say hello until welcomed (or stopped, or ``end`` passes)."""
        self._hello()
        while not self.connected and not self._stop and (end is None or P.now_ns() < end):
            self._wait(P.now_ns() + round(HELLO_RETRY_S * 1e9))

    def run(self, duration_s: float | None = None) -> dict[str, Any]:
        """Run episodes until stopped, ``episodes`` are done, or ``duration_s`` passes."""
        self.realtime = realtime.apply(
            self.cfg.realtime, "bridge", lambda line: self.log(f"bridge {self.cfg.id}: {line}")
        )
        if self.cfg.mode == "realtime":
            self.log(self.pacing_line())
        start = P.now_ns()
        end = start + round(duration_s * 1e9) if duration_s else None
        self._connect(end)
        try:
            if self.cfg.mode == "realtime":
                self._run_realtime(end)
            else:
                self._run_lockstep(end)
        finally:
            if self.connected:
                self._bye("bridge stopping")
        return self.summary((P.now_ns() - start) / 1e9)

    def _run_realtime(self, end: int | None) -> None:
        period = round(1e9 / self.rate_hz)
        watchdog = round(self.cfg.watchdog_ms * 1e6)
        self._reset()
        next_t = P.now_ns() + period
        last_step = 0
        while not self._stop and not self._episodes_done():
            self._wait(next_t)
            if self._stop:
                break
            # an action that came since the last step is the answer to the newest observation
            # (a bridge slower than its watchdog gets each answer more than watchdog_ms before
            # the step that applies it); an older one is held up to watchdog_ms
            now, since = P.now_ns(), self.action_ns > last_step
            fresh = self.connected and (since or now - self.action_ns <= watchdog)
            last_step = now
            if fresh:
                ended = self._apply(self.action, self.action_seq, self.action_safe)
            else:  # the watchdog: no action for too long (or no node): the safe action
                ended = self._apply(self.safe_action, -1, True)
            if ended and not self._episodes_done():
                self._reset()
            next_t += period
            now = P.now_ns()
            if now > next_t:
                missed = (now - next_t) // period + 1
                self.misses += missed
                next_t += missed * period
            if end is not None and now >= end:
                break

    def _run_lockstep(self, end: int | None) -> None:
        timeout = round(self.cfg.watchdog_ms * 1e6)
        obs_fresh = True
        while not self._stop and not self._episodes_done():
            if obs_fresh:
                self._reset()
            obs_fresh = False
            while not self._stop:
                if end is not None and P.now_ns() >= end:
                    return
                self._waiting_for, self._answer = (self.episode, self.step), None
                self._wait(P.now_ns() + timeout)
                answer = self._answer
                self._waiting_for = None
                if answer is None:  # no answer: the node may have restarted; resend the step
                    if self._stop:
                        return
                    self.errors["timeout"] = self.errors.get("timeout", 0) + 1
                    self._connect(end)
                    self._resend_current()
                    continue
                if self._apply(answer, self.action_seq, self.action_safe):
                    obs_fresh = True
                    break

    def _resend_current(self) -> None:
        """Send the last observation again after a reconnect (a node that never saw it starts
        a new transition chain there; one that did counts a gap and logs nothing twice)."""
        if self._last_obs is not None and self.connected:
            self._send(self._last_obs)

    def summary(self, wall_s: float) -> dict[str, Any]:
        returns = self.returns
        return {
            "bridge": self.cfg.id,
            "env": self.cfg.env,
            "mode": self.cfg.mode,
            "seed": self.cfg.seed,
            "model_id": self.model_id,
            "episodes": len(returns),
            "returns": returns,
            "lengths": self.lengths,
            "mean_return": float(np.mean(returns)) if returns else None,
            "steps": self.steps,
            "rate_hz": self.rate_hz,
            "real_time_factor": self.real_time_factor,
            "wall_s": round(wall_s, 3),
            "steps_per_s": round(self.steps / wall_s, 1) if wall_s > 0 else 0.0,
            "transitions_sent": self.transitions_sent_total,
            "unsent": self.unsent,
            "safe_steps": self.safe_steps,
            "deadline_misses": self.misses,
            "errors": self.errors,
            "action_delivery_us": _percentiles_us(self.delivery),
            "round_trip_us": _percentiles_us(self.round_trip),
            "realtime": self.realtime,
        }

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        self.env.close()
