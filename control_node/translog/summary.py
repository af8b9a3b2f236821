"""The transition log's summary: counts, episodes and returns per model, JSON-ready (what
``ddpg logs`` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from control_node.translog.reader import LogContents
from control_node.translog.schema import CHUNK_PREFIX, LogSpec


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {"return_mean": None, "return_std": None, "return_min": None, "return_max": None}
    a = np.asarray(values, dtype=np.float64)
    return {
        "return_mean": float(a.mean()),
        "return_std": float(a.std()),
        "return_min": float(a.min()),
        "return_max": float(a.max()),
    }


def _utc_of(chunk: Path) -> str | None:
    """The UTC time in a chunk's name (its first row), ISO 8601."""
    try:
        stamp = chunk.name[len(CHUNK_PREFIX) :].split("-", 1)[0]
        when = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
    except ValueError:
        return None
    return when.isoformat().replace("+00:00", "Z")


def _episodes(t: pa.Table) -> tuple[dict[str, list[float]], list[float], int]:
    """(complete returns per model, returns of mixed-model episodes, partial episodes)."""
    keys = ["bridge_id", "bridge_session", "episode"]
    terminal = pc.or_(t.column("terminated"), t.column("truncated"))
    rows = t.select([*keys, "step", "reward"]).append_column("terminal", terminal)
    episodes = rows.group_by(keys).aggregate(
        [("reward", "sum"), ("step", "count_distinct"), ("step", "min"), ("terminal", "max")]
    )
    ends = rows.filter(terminal).group_by(keys).aggregate([("step", "min")])
    ends = ends.rename_columns([*keys, "end_step"])
    chosen = t.filter(pc.not_equal(t.column("model_id"), "")).select([*keys, "model_id"])
    owners = chosen.group_by(keys).aggregate([("model_id", "count_distinct"), ("model_id", "min")])
    episodes = episodes.join(ends, keys, join_type="left outer")
    episodes = episodes.join(owners, keys, join_type="left outer").to_pydict()
    per_model: dict[str, list[float]] = {}
    mixed: list[float] = []
    partial = 0
    for terminal_seen, first, distinct, end, ret, n_models, model in zip(
        episodes["terminal_max"],
        episodes["step_min"],
        episodes["step_count_distinct"],
        episodes["end_step"],
        episodes["reward_sum"],
        episodes["model_id_count_distinct"],
        episodes["model_id_min"],
        strict=True,
    ):
        if not terminal_seen:
            continue  # still running (or its end was lost): no return yet
        if first != 0 or distinct != end + 1:
            partial += 1
            continue
        if (n_models or 0) > 1:
            mixed.append(float(ret))
        else:
            per_model.setdefault(model or "", []).append(float(ret))
    return per_model, mixed, partial


def _frame_counts(spec: LogSpec | None, t: pa.Table) -> dict[str, Any]:
    """Pixel logs: the spec, frames stored (one per row, plus a stack where a segment starts)
    and per transition (1 would be perfect; obs + next_obs per row would be 2 * stack)."""
    if spec is None or not spec.pixels:
        keys = ("pixels", "frame_bytes", "segment_starts", "frames_stored", "frames_per_transition")
        return dict.fromkeys(keys)
    stacks = t.num_rows - t.column("obs").null_count
    frames = t.num_rows + spec.stack * stacks
    return {
        "pixels": spec.pixel_spec,
        "frame_bytes": spec.frame_size,
        "segment_starts": stacks,
        "frames_stored": frames,
        "frames_per_transition": frames / t.num_rows if t.num_rows else None,
    }


def summarize(contents: LogContents) -> dict[str, Any]:
    """A JSON-ready summary of a log: counts, episodes, and returns per model.

    An episode is (bridge_id, bridge_session, episode). ``episodes_completed`` counts terminal
    rows (terminated or truncated). A return (the sum of rewards) is reported only for an episode
    whose rows cover steps 0..terminal without a gap; the others ("episodes_partial": a crash, a
    node started mid-episode) would make a model look better or worse than it was. An episode
    belongs to a model when every action the node chose in it came from that model; actions the
    bridge chose itself (model_id "") do not change that. Episodes under two or more models are
    "mixed" and counted apart. Times are the writer's monotonic clock (``t_logged_ns``) and the
    UTC in the chunk names.
    """
    t = contents.table
    spec = contents.spec
    out: dict[str, Any] = {
        "dirs": [str(d) for d in contents.dirs],
        "schema_version": spec.schema_version if spec is not None else None,
        "env_id": spec.env_id if spec else None,
        "obs_shape": list(spec.obs_shape) if spec else None,
        "obs_dtype": spec.obs_dtype if spec else None,
        "act_dim": spec.act_dim if spec else None,
        "chunks": len(contents.chunks),
        "bytes": contents.bytes,
        "transitions": t.num_rows,
        "bytes_per_transition": contents.bytes / t.num_rows if t.num_rows else None,
        **_frame_counts(spec, t),
        "bridges": [],
        "bridge_sessions": 0,
        "episodes_completed": 0,
        "episodes_partial": 0,
        "safe_actions": 0,
        "models": {},
        "mixed_model_episodes": {"episodes": 0, **_stats([])},
        "first_logged_ns": None,
        "last_logged_ns": None,
        "span_s": None,
    }
    if spec is not None and t.num_rows:
        per_model_returns, mixed, partial = _episodes(t)
        safe = pc.cast(t.column("safe_action"), pa.int64())
        counts = (
            pa.table({"model_id": t.column("model_id"), "safe": safe})
            .group_by("model_id")
            .aggregate([([], "count_all"), ("safe", "sum")])
            .to_pydict()
        )
        models: dict[str, dict[str, Any]] = {}
        for model in sorted(set(counts["model_id"]) | set(per_model_returns)):
            returns = per_model_returns.get(model, [])
            models[model] = {"transitions": 0, "safe_actions": 0, "episodes": len(returns)}
            models[model].update(_stats(returns))
        for model, n, n_safe in zip(
            counts["model_id"], counts["count_all"], counts["safe_sum"], strict=True
        ):
            models[model].update(transitions=n, safe_actions=n_safe)
        terminal = pc.or_(t.column("terminated"), t.column("truncated"))
        logged = t.column("t_logged_ns")
        first, last = pc.min(logged).as_py(), pc.max(logged).as_py()
        sessions = t.select(["bridge_id", "bridge_session"]).group_by(
            ["bridge_id", "bridge_session"]
        )
        out.update(
            bridges=sorted(pc.unique(t.column("bridge_id")).to_pylist()),
            bridge_sessions=sessions.aggregate([]).num_rows,
            episodes_completed=pc.sum(pc.cast(terminal, pa.int64())).as_py(),
            episodes_partial=partial,
            safe_actions=pc.sum(safe).as_py(),
            models=models,
            mixed_model_episodes={"episodes": len(mixed), **_stats(mixed)},
            first_logged_ns=first,
            last_logged_ns=last,
            span_s=(last - first) / 1e9,
        )
    out["first_chunk_utc"] = _utc_of(contents.chunks[0]) if contents.chunks else None
    out["last_chunk_utc"] = _utc_of(contents.chunks[-1]) if contents.chunks else None
    out["unreadable"] = [{"path": str(p), "reason": r} for p, r in contents.unreadable]
    out["leftovers"] = [str(p) for p in contents.leftovers]
    return out
