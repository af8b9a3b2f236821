"""``ddpg launch launch.yaml``: start the node and its bridges as separate processes, watch them,
and stop everything cleanly at the end (``--duration``) or on Ctrl-C.

Order matters for exact logs: the node starts first and must answer its admin socket; then the
bridges start and must all be live at the node. At the end the bridges stop first (each says
goodbye to the node after its last observation), then the node commits its log and reports.
A bridge that dies is restarted per its ``restart`` policy. Children run in their own process
group, so Ctrl-C reaches only the launcher, which stops them in that order.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from control_node.admin import AdminError, request
from control_node.argv import bridge_argv, serve_argv
from control_node.config import BridgeConfig, ConfigError, LaunchConfig, NodeConfig, load_launch
from control_node.decisions import read_decisions
from control_node.node.clock import periods_per_step
from control_node.processes import Child, NotReady, last_json, wait_for_admin
from control_node.realtime import assign_cpus, describe
from control_node.translog.schema import LogError
from control_node.translog.writer import check_writable

CHECK_TIMEOUT_S = 60.0
"""How long the continual trainer's start-up check of the init run may take."""

EXAMPLES = """\
examples:
  ddpg launch launch.yaml --duration 20             # run the loop for 20 s, print the summary
  ddpg launch launch.yaml --summary-json runs/launch.json
"""


class LaunchError(RuntimeError):
    """A process did not come up or died; the message says which and why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("launch_file", type=Path, metavar="LAUNCH.yaml")
    parser.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="stop after S seconds of the loop, counted once every bridge is live (default: the file's)",
    )
    parser.add_argument("--summary-json", type=Path, metavar="PATH", help="write the summary")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--quiet", action="store_true", help="no periodic status lines while it runs"
    )
    parser.add_argument(
        "--continual",
        action="store_true",
        help="retrain from the log and deploy while it runs (the file's continual section)",
    )


class Launcher:
    def __init__(self, cfg: LaunchConfig, launch_file: Path, quiet: bool = False) -> None:
        self.cfg, self.quiet = cfg, quiet
        # cpus: auto -> the node on a CPU of its own, the bridges on the others
        assign_cpus(cfg.node.realtime, [b.realtime for b in cfg.bridges], os.sched_getaffinity(0))
        self.node = Child("node", serve_argv(cfg.node, "--json"))
        self.bridges = [Child(f"bridge {b.id}", bridge_argv(b, "--json")) for b in cfg.bridges]
        self.continual: Child | None = None
        if cfg.continual.enabled:
            argv = [sys.executable, "-m", "training.continual", str(launch_file)]
            self.continual = Child("continual", argv)
        self._stop = False
        self.continual_failed: int | None = None  # its exit code, once it died

    def request_stop(self) -> None:
        self._stop = True

    def _say(self, line: str) -> None:
        print(f"ddpg launch: {line}", file=sys.stderr, flush=True)

    def _status(self) -> dict[str, Any]:
        return request(self.cfg.node.admin, "status", timeout_s=1.0)["status"]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        want = {b.id for b in self.cfg.bridges}
        while True:
            if not self.node.alive():
                raise LaunchError("the node exited while starting (its error is above)")
            try:
                status = self._status()
                live = {b["id"] for b in status["bridges"] if b["state"] == "live"}
                if want <= live:
                    return
            except AdminError:
                live = set()
            for child, b in zip(self.bridges, self.cfg.bridges, strict=True):
                if child.proc is not None and not child.alive() and child.proc.returncode != 0:
                    raise LaunchError(
                        f"bridge {b.id} exited with code {child.proc.returncode} while starting "
                        "(its error is above)"
                    )
            if time.monotonic() > deadline:
                missing = sorted(want - live)
                what = f"bridges {missing} did not connect" if live or want else "node"
                raise LaunchError(f"not ready after {self.cfg.ready_timeout_s:g} s: {what}")
            time.sleep(0.05)

    def _start(self) -> None:
        self.node.start()
        try:  # the node first: its admin socket answers once it is serving
            wait_for_admin(self.node, self.cfg.node.admin, self.cfg.ready_timeout_s)
        except NotReady as e:
            if e.returncode is not None:
                raise LaunchError("the node exited while starting (its error is above)") from None
            raise LaunchError(
                f"the node did not answer on {self.cfg.node.admin} within "
                f"{self.cfg.ready_timeout_s:g} s"
            ) from None
        for child in self.bridges:
            child.start()
        self._wait_ready()
        if self.continual is not None:
            self.continual.start()

    def _say_pacing(self) -> None:
        """One line per realtime bridge: the rate it said in its hello, and why that rate."""
        try:
            live = {b["id"]: b["rate_hz"] for b in self._status()["bridges"]}
        except AdminError:
            return
        node_hz = self.cfg.node.rate_hz
        for b in self.cfg.bridges:
            hz = live.get(b.id, 0.0)
            if b.mode != "realtime" or not hz:
                continue
            if b.rate_hz is not None:
                why = "from rate_hz"
            else:
                repeat = b.pixels.repeat if b.pixels is not None else 1
                dt = f"dt {b.real_time_factor / hz / repeat * 1e3:g} ms"
                dt += f" x {repeat} (action repeat)" if b.pixels is not None else ""
                why = f"{dt} at real-time factor {b.real_time_factor:g}"
            if hz > node_hz:
                lock = f", faster than the node's {node_hz:g} Hz"
            elif not periods_per_step(node_hz, hz):
                lock = f", not a whole number of the node's {node_hz:g} Hz periods: no phase lock"
            else:
                lock = f" (node {node_hz:g} Hz)"
            self._say(f"bridge {b.id}: {b.env} at {hz:.1f} Hz, {why}{lock}")

    def _supervise(self, child: Child, bcfg: BridgeConfig) -> None:
        """Restart a bridge that exited, per its policy."""
        assert child.proc is not None
        code = child.proc.returncode
        child.collect()
        finished = code == 0 and bcfg.episodes > 0  # it ran its episodes: done, not dead
        wanted = bcfg.restart == "always" or (bcfg.restart == "on-failure" and code != 0)
        if finished or not wanted:
            if code != 0:
                self._say(
                    f"bridge {bcfg.id} exited with code {code}; restart policy {bcfg.restart}"
                )
            child.proc = None if not finished else child.proc
            return
        if child.restarts >= bcfg.max_restarts:
            self._say(
                f"bridge {bcfg.id} exited with code {code}; {bcfg.max_restarts} restarts used"
            )
            child.proc = None
            return
        child.restarts += 1
        self._say(f"bridge {bcfg.id} exited with code {code}; restart {child.restarts}")
        child.start()

    def run(self, duration_s: float | None) -> dict[str, Any]:
        start = time.monotonic()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            self._start()
            self._say_pacing()
            self._say(
                f"node and {len(self.bridges)} bridge(s) running"
                + (f" for {duration_s:g} s" if duration_s else "; Ctrl-C stops")
            )
            # the duration is the loop's: it counts from when every bridge is live, so a slow
            # start-up (imports, locking memory; seconds on a loaded machine) does not eat it
            end = time.monotonic() + duration_s if duration_s else None
            next_report = time.monotonic() + 5.0
            while not self._stop and (end is None or time.monotonic() < end):
                time.sleep(0.05)
                if not self.node.alive():
                    raise LaunchError(f"the node exited with code {self.node.proc.returncode}")  # type: ignore[union-attr]
                for child, bcfg in zip(self.bridges, self.cfg.bridges, strict=True):
                    if (
                        child.proc is not None
                        and child.proc.returncode is None
                        and not child.alive()
                    ):
                        self._supervise(child, bcfg)
                if (
                    all(c.proc is None or c.proc.returncode == 0 for c in self.bridges)
                    and all(b.episodes > 0 for b in self.cfg.bridges)
                    and self.bridges
                ):
                    break  # every bridge ran its episodes
                self._watch_continual()
                if not self.quiet and time.monotonic() >= next_report:
                    next_report += 5.0
                    try:
                        from control_node.node.status import summary_line

                        self._say(summary_line(self._status()))
                    except AdminError:
                        pass
            return self._finish(time.monotonic() - start, error=None)
        except LaunchError as e:
            return self._finish(time.monotonic() - start, error=str(e))

    def _watch_continual(self) -> None:
        """Say once that the continual trainer died; the loop serves on, the launch fails."""
        c = self.continual
        if c is None or self.continual_failed is not None or c.proc is None or c.alive():
            return
        if c.proc.returncode != 0:
            self.continual_failed = c.proc.returncode
            self._say(
                f"continual retraining exited with code {c.proc.returncode} (its error is above); "
                "the node serves on"
            )

    def _finish(self, wall_s: float, error: str | None) -> dict[str, Any]:
        if self.continual is not None and self.continual.alive():
            self.continual.stop()
        bridge_summaries = []
        for child in self.bridges:
            if child.alive():
                child.stop()
            bridge_summaries += [s for s in map(last_json, child.outputs) if s]
        if self.node.alive():
            try:
                request(self.cfg.node.admin, "shutdown", timeout_s=2.0)
            except AdminError:
                self.node.terminate()
        self.node.reap()
        node = last_json("".join(self.node.outputs)) or {}
        summary = summarize(self.cfg, node, bridge_summaries, self.bridges, wall_s, error)
        if self.continual is not None:
            summary["continual"] = read_decisions(Path(self.cfg.continual.out_dir), self.started)
            summary["continual_exit_code"] = self.continual_failed
            if self.continual_failed is not None:
                summary["ok"] = False
        return summary


def summarize(
    cfg: LaunchConfig,
    node: dict[str, Any],
    bridges: list[dict[str, Any]],
    children: list[Child],
    wall_s: float,
    error: str | None,
) -> dict[str, Any]:
    sent = sum(b.get("transitions_sent", 0) for b in bridges)
    models = node.get("model_ids", [])
    log = node.get("log") or {}
    log_failed = bool(log.get("write_errors") or log.get("dropped"))
    return {
        "ok": error is None and bool(node) and (not log_failed or cfg.node.tolerate_log_errors),
        "error": error,
        "wall_s": round(wall_s, 2),
        "model_id": node.get("model_id"),
        "model_ids": models,
        "rate_hz": cfg.node.rate_hz,
        "ticks": node.get("ticks", 0),
        "deadline_misses": node.get("deadline_misses", 0),
        "miss_ratio": node.get("miss_ratio", 0.0),
        "achieved_rate_hz": node.get("achieved_rate_hz", 0.0),
        "fresh_ratio": node.get("fresh_ratio", 0.0),
        "on_time_ratio": node.get("on_time_ratio", 0.0),
        "latency_us": node.get("latency_us", {}),
        "obs_age_us": node.get("obs_age_us", {}),
        "transitions_logged": node.get("transitions_logged", 0),
        "transitions_sent": sent,
        "log_write_errors": log.get("write_errors", 0),
        "transitions_lost": log.get("dropped", 0),
        "log_last_error": log.get("last_error", ""),
        "episodes": node.get("episodes", 0),
        "mean_return": node.get("mean_return"),
        "returns_by_model": node.get("returns_by_model", {}),
        "deploys": node.get("deploys", []),
        "rejected_messages": node.get("rejected_messages", 0),
        "safe_actions": node.get("safe_actions", 0),
        "log_dir": cfg.node.log_dir,
        "realtime": _realtime_summary(node.get("realtime")),
        "bridges": [
            {
                "id": b.get("bridge"),
                "mode": b.get("mode"),
                "episodes": b.get("episodes"),
                "mean_return": b.get("mean_return"),
                "steps": b.get("steps"),
                "transitions_sent": b.get("transitions_sent"),
                "action_delivery_us": b.get("action_delivery_us"),
                "realtime": _realtime_summary(b.get("realtime")),
            }
            for b in bridges
        ],
        "restarts": {c.name.removeprefix("bridge "): c.restarts for c in children if c.restarts},
    }


def _realtime_summary(settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """A process's real-time settings in effect, without its per-thread detail."""
    if not settings:
        return None
    keep = ("sched_policy", "sched_priority", "memory_locked", "vmlck_kb", "vmrss_kb", "cpus",
            "not_set")  # fmt: skip
    return {k: settings.get(k) for k in keep} | {"gc": settings.get("gc", {}).get("policy")}


def render(s: dict[str, Any]) -> str:
    lat = s["latency_us"] or {"p50": 0, "p99": 0}
    mean = s["mean_return"]
    lines = [
        f"ran {s['wall_s']:.1f} s at {s['achieved_rate_hz']:.1f} / {s['rate_hz']:g} Hz: "
        f"{s['ticks']} ticks, {s['deadline_misses']} deadline misses "
        f"({100 * s['miss_ratio']:.3f}%), fresh observations {100 * s['fresh_ratio']:.1f}%",
        f"node latency p50 {lat['p50']:.0f} us, p99 {lat['p99']:.0f} us; "
        f"rejected {s['rejected_messages']}, safe actions {s['safe_actions']}",
        f"transitions logged {s['transitions_logged']} of {s['transitions_sent']} sent, in "
        f"{s['log_dir']}"
        + (
            f"; LOG FAILED: {s['log_write_errors']} write errors, {s['transitions_lost']} "
            f"transitions lost (last: {s['log_last_error'][:200]})"
            if s["log_write_errors"] or s["transitions_lost"]
            else ""
        ),
        f"episodes {s['episodes']}, mean return "
        + ("-" if mean is None else f"{mean:.1f}")
        + f"; model ids {', '.join(s['model_ids'])}",
    ]
    for model, r in s["returns_by_model"].items():
        lines.append(
            f"  model {model}: {r['episodes']} episodes, mean return {r['mean']:.1f} ± {r['std']:.1f}"
        )
    for d in s["deploys"]:
        if d.get("ok") and not d.get("shadow"):
            lines.append(
                f"  deploy at tick {d['at_tick']}: {d['previous']} -> {d['model_id']}, swapped "
                f"{d.get('request_to_swap_ms', 0):.0f} ms after the request, "
                f"{d.get('misses_during_load', 0)} deadline misses meanwhile"
            )
    for c in s.get("continual", []):
        lines.append(
            f"  continual round {c['round']} ({c['transitions']} transitions): "
            f"{'deployed' if c['deploy'] else 'kept live'}: {c['reason']}"
        )
    if s.get("realtime"):
        lines.append(f"node real-time: {describe(s['realtime'])}")
    for b in s["bridges"]:
        m = "-" if b["mean_return"] is None else f"{b['mean_return']:.1f}"
        lines.append(
            f"  bridge {b['id']} ({b['mode']}): {b['episodes']} episodes, mean return {m}, "
            f"{b['steps']} steps"
        )
        if b.get("realtime"):
            lines.append(f"    real-time: {describe(b['realtime'])}")
    if s["error"]:
        lines.append(f"error: {s['error']}")
    return "\n".join(lines)


def _refusal(cfg: LaunchConfig, launch_file: Path) -> str | None:
    """Why the launch cannot start, found before anything does (None: it can): a log
    directory that cannot be written, an init run the continual trainer refuses."""
    if cfg.node.log_dir is not None:
        try:
            check_writable(Path(cfg.node.log_dir))
        except LogError as e:
            return f"{launch_file}: node.log_dir: {e}"
    if not cfg.continual.enabled:
        return None
    argv = [sys.executable, "-m", "training.continual", "--check", str(launch_file)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"continual mode: checking the init run took over {CHECK_TIMEOUT_S:g} s"
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
    return f"continual mode: {lines[-1].removeprefix('continual: error: ')[:500]}"


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_launch(args.launch_file)
    except ConfigError as e:
        print(f"ddpg launch: error: {e}", file=sys.stderr)
        return 1
    duration = args.duration if args.duration is not None else (cfg.duration_s or None)
    if duration is not None and duration <= 0:
        print(f"ddpg launch: error: --duration {duration}: must be > 0", file=sys.stderr)
        return 1
    if args.continual:
        cfg.continual.enabled = True
    if cfg.continual.enabled and cfg.node.log_dir is None:
        print("ddpg launch: error: continual mode needs node.log_dir", file=sys.stderr)
        return 1
    why = _refusal(cfg, args.launch_file)
    if why:
        print(f"ddpg launch: error: {why}", file=sys.stderr)
        return 1
    launcher = Launcher(cfg, args.launch_file, quiet=args.quiet)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: launcher.request_stop())
    summary = launcher.run(duration)
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2) if args.json else render(summary), flush=True)
    if not summary["ok"] and (summary["log_write_errors"] or summary["transitions_lost"]):
        print(
            "ddpg launch: error: the transition log failed (above); exit 1 "
            "(node.tolerate_log_errors: true exits 0)",
            file=sys.stderr,
        )
    return 0 if summary["ok"] else 1


__all__ = ["LaunchConfig", "Launcher", "NodeConfig", "run"]
