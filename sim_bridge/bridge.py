"""The simulator bridge: a Gymnasium MuJoCo environment acting as the robot the node controls.

It is the robot client (:mod:`sim_bridge.client`, what a real robot's code uses) plus a
simulator: the client speaks to the node (hello, observations, actions, the watchdog, reconnects,
goodbye); this module steps the environment, paces it and counts its episodes.

``realtime``: physics advances on the bridge's own clock whether or not an action came: by
default at the environment's own rate, 1/dt times ``real_time_factor``, so simulated time runs
at wall-clock speed (1.0); an explicit ``rate_hz`` overrides it. Each period it applies the
newest action received, or holds the last one (it wakes ``step_spin_us`` early and
busy-polls, so the step starts on time); once no action has come for ``watchdog_ms``
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

import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from control_node import protocol as P
from control_node import realtime
from control_node.config import BridgeConfig
from sim_bridge.client import SAMPLES, Action, NodeUnavailable, RobotClient, Stopped
from sim_bridge.envs import EnvError, env_spec, make_env
from sim_bridge.pixels import make_pixel_env


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _percentiles_us(samples: Sequence[int]) -> dict[str, float]:
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
    """One environment as the robot of a :class:`~sim_bridge.client.RobotClient`; :meth:`run`
    drives it."""

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
        self.low, self.high = self.spec.act_low, self.spec.act_high
        self.client = RobotClient(
            self.spec,
            node=cfg.node,
            bridge_id=cfg.id,
            mode=cfg.mode,
            rate_hz=self.rate_hz,
            watchdog_ms=cfg.watchdog_ms,
            spin_us=cfg.spin_us,
            log=log,
        )
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self._ep_return = 0.0
        self.safe_steps = 0  # steps that applied the safe action (watchdog or node's safe flag)
        self.misses = 0
        self.send_lateness: deque[int] = deque(maxlen=SAMPLES)
        """Realtime: how long after its scheduled time each step's observation was sent (the
        wake-up's lateness, the step, the send): the jitter of its arrivals at the node, which
        the node's phase lock keeps its ticks after."""
        self.steps = 0
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

    def request_stop(self) -> None:
        self.client.request_stop()

    # -- episodes -------------------------------------------------------------------------------
    def _reset(self) -> None:
        obs, _ = self.env.reset(seed=self.cfg.seed + self.client.episode)
        self._ep_return = 0.0
        self.client.begin_episode(obs)

    def _apply(self, applied: Action) -> bool:
        """Step the environment with ``applied`` and report it; True when the episode ended."""
        action = np.clip(applied.action, self.low, self.high).astype(np.float32)
        obs, reward, terminated, truncated, _ = self.env.step(action)
        t_obs = P.now_ns()
        self.steps += 1
        self.safe_steps += applied.safe
        self._ep_return += float(reward)
        client = self.client
        client.send_step(obs, float(reward), terminated, truncated, applied, action, t_obs)
        if terminated or truncated:
            self.returns.append(self._ep_return)
            self.lengths.append(client.step)
            return True
        return False

    def _episodes_done(self) -> bool:
        return bool(self.cfg.episodes) and self.client.episode >= self.cfg.episodes

    def run(self, duration_s: float | None = None) -> dict[str, Any]:
        """Run episodes until stopped, ``episodes`` are done, or ``duration_s`` passes."""
        self.realtime = realtime.apply(
            self.cfg.realtime, "bridge", lambda line: self.log(f"bridge {self.cfg.id}: {line}")
        )
        if self.cfg.mode == "realtime":
            self.log(self.pacing_line())
        start = P.now_ns()
        end = start + round(duration_s * 1e9) if duration_s else None
        try:
            self.client.connect(duration_s or None)
            if self.cfg.mode == "realtime":
                self._run_realtime(end)
            else:
                self._run_lockstep(end)
        except (NodeUnavailable, Stopped):  # the duration passed, or a signal asked to stop
            pass
        finally:
            self.client.goodbye("bridge stopping")
        return self.summary((P.now_ns() - start) / 1e9)

    def _run_realtime(self, end: int | None) -> None:
        client = self.client
        period = round(1e9 / self.rate_hz)
        spin = round(self.cfg.step_spin_us * 1e3)
        self._reset()
        next_t = P.now_ns() + period
        while not client.stopped and not self._episodes_done():
            client.poll(next_t, spin)
            if client.stopped:
                break
            # the newest action, or the safe one once the watchdog has run out (or no node)
            ended = self._apply(client.command())
            self.send_lateness.append(P.now_ns() - next_t)
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
        client = self.client
        while not client.stopped and not self._episodes_done():
            self._reset()
            while not self._apply(client.answer(None if end is None else (end - P.now_ns()) / 1e9)):
                pass

    def summary(self, wall_s: float) -> dict[str, Any]:
        returns, client = self.returns, self.client
        return {
            "bridge": self.cfg.id,
            "env": self.cfg.env,
            "mode": self.cfg.mode,
            "seed": self.cfg.seed,
            "model_id": client.model_id,
            "episodes": len(returns),
            "returns": returns,
            "lengths": self.lengths,
            "mean_return": float(np.mean(returns)) if returns else None,
            "steps": self.steps,
            "rate_hz": self.rate_hz,
            "real_time_factor": self.real_time_factor,
            "wall_s": round(wall_s, 3),
            "steps_per_s": round(self.steps / wall_s, 1) if wall_s > 0 else 0.0,
            "transitions_sent": client.transitions_sent_total,
            "unsent": client.unsent,
            "safe_steps": self.safe_steps,
            "deadline_misses": self.misses,
            "errors": client.errors,
            "action_delivery_us": _percentiles_us(client.delivery),
            "round_trip_us": _percentiles_us(client.round_trip),
            "send_lateness_us": _percentiles_us(self.send_lateness),
            "realtime": self.realtime,
        }

    def close(self) -> None:
        self.client.close()
        self.env.close()
