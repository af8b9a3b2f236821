"""What ``ddpg status`` (and a stopping ``ddpg serve``) reports: one map read from every part
of the node, and the one-line summary of it."""

from __future__ import annotations

import math
import os
from typing import Any, Protocol

import numpy as np

from control_node import protocol as P
from control_node import realtime
from control_node.config import NodeConfig
from control_node.node.bridges import BridgeState, Link
from control_node.node.deploy import Admin
from control_node.node.serving import Server
from control_node.node.sessions import Sessions
from control_node.node.stats import Samples


class NodeParts(Protocol):
    """What status reads of the loop: its own counters and its parts."""

    cfg: NodeConfig
    state: str
    started_ns: int
    ticks: int
    deadline_misses: int
    tick_work: Samples
    tick_late: Samples
    tick_period: Samples
    link: Link
    sessions: Sessions
    server: Server
    admin: Admin
    realtime: dict[str, Any]
    slack_gc: realtime.SlackGC | None


def node_status(node: NodeParts) -> dict[str, Any]:
    cfg, sessions, server, admin = node.cfg, node.sessions, node.server, node.admin
    bridges = sessions.bridges
    now = P.now_ns()
    uptime = (now - node.started_ns) / 1e9
    all_ticks = node.ticks + node.deadline_misses
    retired = sessions.retired  # the forgotten bridges' counts
    observations = sum(b.observations for b in bridges.values()) + retired["observations"]
    fresh = sum(b.fresh for b in bridges.values()) + retired["fresh"]
    on_time = sum(b.on_time for b in bridges.values()) + retired["on_time"]
    transitions = sum(b.transitions for b in bridges.values()) + retired["transitions"]
    log = sessions.translog
    returns = [r for rs in sessions.returns_by_model.values() for r in rs]
    return {
        "state": node.state,
        "pid": os.getpid(),
        "model_id": server.model_id,
        "model_ids": sorted(server.model_ids),
        "model": str(cfg.model),
        "env_id": server.policy.metadata.env_id,
        "rate_hz": cfg.rate_hz,
        "uptime_s": round(uptime, 3),
        "ticks": node.ticks,
        "deadline_misses": node.deadline_misses,
        "miss_ratio": node.deadline_misses / all_ticks if all_ticks else 0.0,
        "achieved_rate_hz": round(node.ticks / uptime, 2) if uptime > 0 else 0.0,
        "rejected_messages": sum(sessions.rejected.values()),
        "rejected_by_code": dict(sessions.rejected),
        "last_rejections": list(sessions.last_rejections),
        "dropped_over_rate": sessions.dropped_over_rate,
        "safe_actions": server.safe_actions,
        "non_finite_observations": server.non_finite_obs,
        "non_finite_actions": server.non_finite_actions,
        "admin_refused": {
            "requests": admin.refused_requests,
            "unauthorized": admin.unauthorized_requests,
        },
        "stale_events": node.link.stale_events,
        "latency_us": server.latency.summary_us(),
        "obs_age_us": server.obs_age.summary_us(),
        "tick_work_us": node.tick_work.summary_us(),
        "tick_lateness_us": node.tick_late.summary_us(),
        "tick_period_us": node.tick_period.summary_us(),
        "log_handoff_us": sessions.log_handoff.summary_us(),
        "fresh_ratio": fresh / observations if observations else 0.0,
        "on_time_ratio": on_time / transitions if transitions else 0.0,
        "transitions_logged": log.transitions_committed if log else 0,
        "transitions_seen": transitions,
        "log": None
        if log is None
        else {
            "dir": str(cfg.log_dir),
            "appended": log.transitions_appended,
            "committed": log.transitions_committed,
            "chunks": log.chunks_committed,
            "bytes": log.bytes_committed,
            "write_errors": log.write_errors,
            "dropped": log.transitions_dropped,
            "failing": log.failing,
            "last_error": log.last_error,
        },
        "episodes": sessions.episodes,
        "mean_return": float(np.mean(returns)) if returns else None,
        "returns_by_model": {
            m: {"episodes": len(r), "mean": float(np.mean(r)), "std": float(np.std(r))}
            for m, r in sessions.returns_by_model.items()
        },
        "recent_episodes": list(sessions.episode_log)[-10:],
        "previous_model_id": admin.previous.model_id if admin.previous else None,
        "shadow": None
        if server.shadow is None
        else {"model_id": server.shadow.model_id, **server.shadow_stats.summary()},
        "deploys": [{k: v for k, v in d.items() if k != "t_request"} for d in admin.deploys],
        "bridges_summary": _bridges_summary(sessions),
        "bridges": [_bridge_status(b, now) for b in _shown(sessions, cfg.status_bridges)],
        "endpoints": {"bind": cfg.bind, "admin": cfg.admin},
        "realtime": _realtime_status(node),
    }


def _realtime_status(node: NodeParts) -> dict[str, Any] | None:
    """The real-time settings in effect, threads and locked memory read again now; None until
    the loop has applied them."""
    if not node.realtime:
        return None
    out = realtime.in_effect(node.realtime)
    if node.slack_gc is not None:
        out["gc"] = {**out["gc"], **node.slack_gc.stats()}
    return out


def _bridges_summary(sessions: Sessions) -> dict[str, int]:
    """How many bridges are in each state, and how many were forgotten or refused."""
    live = sum(1 for b in sessions.live.values() if not (b.gone or b.stale))
    gone = sum(1 for b in sessions.bridges.values() if b.gone)
    return {
        "live": live,
        "gone": gone,
        "stale": len(sessions.bridges) - live - gone,
        "forgotten": sessions.forgotten,
        "refused_full": sessions.refused_full,
    }


def _shown(sessions: Sessions, n: int) -> list[BridgeState]:
    """The bridges status lists: live ones first, then the most recently seen, ``n`` at most
    (in the order they connected, when all fit)."""
    bridges = sessions.bridges
    if len(bridges) <= n:
        return list(bridges.values())
    live = sessions.live
    order = sorted(
        bridges.values(), key=lambda b: (live.get(b.bridge_id) is not b, -b.last_seen_ns)
    )
    return order[:n]


def _bridge_status(b: BridgeState, now: int) -> dict[str, Any]:
    return {
        "id": b.bridge_id,
        "mode": b.mode,
        "rate_hz": b.rate_hz,
        "pid": b.pid,
        "state": "gone" if b.gone else "stale" if b.stale else "live",
        "silent_ms": round((now - b.last_seen_ns) / 1e6, 1),
        "episode": b.episode,
        "episodes": b.episodes,
        "last_return": b.last_return,
        "observations": b.observations,
        "answered": b.answered,
        "fresh": b.fresh,
        "superseded": b.superseded,
        "transitions": b.transitions,
        "on_time": b.on_time,
        "gaps": b.gaps,
        "dropped": b.dropped,
        "reported_sent": b.reported_sent,
    }


def summary_line(status: dict[str, Any]) -> str:
    lat = status["latency_us"]
    mean = status["mean_return"]
    return (
        f"ticks {status['ticks']}  misses {status['deadline_misses']} "
        f"({100 * status['miss_ratio']:.3f}%)  latency p50 {lat['p50']:.0f} us p99 "
        f"{lat['p99']:.0f} us  episodes {status['episodes']}  mean return "
        f"{'-' if mean is None or math.isnan(mean) else f'{mean:.1f}'}  logged "
        f"{status['transitions_logged']}{log_trouble(status.get('log'))}"
    )


def log_trouble(log: dict[str, Any] | None) -> str:
    """What the log failed to keep, for a summary line ("" when nothing failed)."""
    if not log or not (log.get("write_errors") or log.get("dropped")):
        return ""
    return f"  LOG FAILED: {log['write_errors']} write errors, {log['dropped']} transitions lost"
