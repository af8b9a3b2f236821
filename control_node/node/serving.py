"""Serving: infer observations in one batch, make the actions safe, send each bridge its answer.

Safety: actions are clipped to the model's bounds; a non-finite observation (or output) gets
the safe action, flagged and counted (``non_finite``, beside the rejected messages). A shadow
candidate, while one is deployed, answers the same batch; only the live action is sent, and
how far the two differ is measured.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from control_node import protocol as P
from control_node.node.bridges import SENT_KEPT, BridgeState, Link, new_sent_action
from control_node.node.stats import Samples
from models.policy import BoundBatch, OnnxPolicy

_NOTE = "non-finite observation or action: safe action sent"
_all = np.logical_and.reduce
"""``x.all()`` without the Python-level wrapper it goes through (~10 µs with cold caches)."""


class ShadowStats:
    """How far a shadow candidate's actions are from the live ones (L-inf per action)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        self.over_10pct = 0  # actions differing by more than 10% of the action range

    def add(self, diffs: np.ndarray, ranges: np.ndarray) -> None:
        if diffs.size == 0:
            return
        per_action = diffs.max(axis=1)
        self.count += len(per_action)
        self.total += float(per_action.sum())
        self.max = max(self.max, float(per_action.max()))
        self.over_10pct += int((diffs > 0.1 * ranges).any(axis=1).sum())

    def summary(self) -> dict[str, float]:
        n = self.count
        return {
            "actions": n,
            "mean_abs_diff": self.total / n if n else 0.0,
            "max_abs_diff": self.max,
            "share_over_10pct_of_range": self.over_10pct / n if n else 0.0,
        }


class Server:
    """The live model (and shadow) and the answers it gives; deploys swap the model in."""

    def __init__(
        self,
        policy: OnnxPolicy,
        safe_action: np.ndarray,
        link: Link,
        rejected: collections.Counter[str],
    ) -> None:
        meta = policy.metadata
        self.policy = policy
        self.model_id = meta.model_id
        self.model_ids = {self.model_id}  # every model that has served here
        self.act_low, self.act_high = meta.act_low, meta.act_high
        # fixed for the node's life: a deploy must match it (check_expected on the live spec)
        self.obs_dtype = np.dtype(meta.obs_dtype)
        self._float_obs = self.obs_dtype.kind == "f"  # only floats can be non-finite
        self.safe_action = safe_action
        self.shadow: OnnxPolicy | None = None
        self.shadow_stats = ShadowStats()
        self.first_action_of: dict[str, Any] | None = None
        """The deploy (or rollback) record waiting for the new model's first action."""
        self._send = link.send
        self.rejected = rejected
        self.safe_actions = 0
        self.non_finite_obs = 0
        self.non_finite_actions = 0
        """Finite observations the model answered with a non-finite action (1e38 overflows)."""
        self.latency = Samples()  # observation received -> its action sent (per observation)
        self.obs_age = Samples()  # observation made (bridge clock) -> its action sent
        # the hot path's callees and buffers, looked up once (serve() swaps the batch)
        self._one = policy.batch(1)
        self._action_frames = P.ActionFrames(policy.act_dim)
        self._latency_add, self._obs_age_add = self.latency.add, self.obs_age.add

    def serve(self, policy: OnnxPolicy, record: dict[str, Any]) -> None:
        """Answer with ``policy`` from now on; ``record`` (the deploy's or rollback's) gets the
        time from its request to the new model's first action."""
        self.policy = policy
        self._one = policy.batch(1)
        self.model_id = policy.model_id
        self.model_ids.add(policy.model_id)
        self.first_action_of = record

    def shadow_with(self, policy: OnnxPolicy | None) -> None:
        """Let ``policy`` answer beside the live model, unsent (None: no shadow), measured
        afresh."""
        self.shadow, self.shadow_stats = policy, ShadowStats()

    def answer(self, bridges: list[BridgeState], msgs: list[P.Message], recv_ns: list[int]) -> None:
        """Infer all observations in one batch and send each bridge its action.

        The observations are copied once, into the policy's bound input; the actions are made
        safe in its bound output (the next batch overwrites both). A batch that is all finite,
        the usual case, is checked in one pass over its observations and actions together."""
        n = len(msgs)
        batch = self._one if n == 1 else self.policy.batch(n)
        obs, actions = batch.obs, batch.act
        if n == 1:
            obs[0] = msgs[0].arrays["obs"]
        else:
            for i, m in enumerate(msgs):
                obs[i] = m.arrays["obs"]
        batch.run()
        ok = None  # None: every row good
        if not _all(np.isfinite(batch.values)):
            ok = self._finite_rows(batch)
            actions = np.where(ok[:, None], actions, self.safe_action)
        # clip: min(max(a, low), high), as np.clip does, in place (two ufuncs cost less)
        np.maximum(actions, self.act_low, out=actions)
        np.minimum(actions, self.act_high, out=actions)
        shadow_actions = None
        if self.shadow is not None:  # the candidate answers too; only the live action is sent
            shadow = self.shadow.batch(n)
            shadow.obs[...] = obs
            shadow.run()
            shadow_actions = np.clip(shadow.act, self.act_low, self.act_high)  # a new array
            diffs = np.abs(shadow_actions - actions)
            self.shadow_stats.add(diffs if ok is None else diffs[ok], self.act_high - self.act_low)
        self._send_all(bridges, msgs, recv_ns, actions, ok, shadow_actions)
        if self.first_action_of is not None and (ok is None or ok.any()):
            deploy, self.first_action_of = self.first_action_of, None
            deploy["request_to_first_action_ms"] = round(
                (P.now_ns() - deploy["t_request"]) / 1e6, 3
            )

    def _finite_rows(self, batch: BoundBatch) -> np.ndarray:
        """Which rows are good: a finite observation (the others are zeroed, run again and
        counted) and a finite action."""
        obs, n = batch.obs, len(batch.obs)
        if self._float_obs:  # uint8 frames are always finite: no pass over them
            finite = np.isfinite(obs).reshape(n, -1).all(axis=1)
            if not finite.all():
                obs[~finite] = 0
                self.non_finite_obs += int((~finite).sum())
                batch.run()
        else:
            finite = np.ones(n, dtype=bool)
        good = finite & np.isfinite(batch.act).all(axis=1)
        self.non_finite_actions += int((finite & ~good).sum())
        return good

    def _send_all(
        self,
        bridges: list[BridgeState],
        msgs: list[P.Message],
        recv_ns: list[int],
        actions: np.ndarray,
        ok: np.ndarray | None,
        shadow_actions: np.ndarray | None,
    ) -> None:
        """Send each bridge its action; remember what was sent for the transition's label."""
        model_id, send, frames_of, now = self.model_id, self._send, self._action_frames, P.now_ns
        shadow_id = self.shadow.model_id if self.shadow is not None else ""
        for i in range(len(msgs)):
            b, f, t_recv = bridges[i], msgs[i].fields, recv_ns[i]
            seq = b.seq = b.seq + 1
            episode, step, t_obs = f["episode"], f["step"], f["t_obs_ns"]
            safe = ok is not None and not ok[i]
            t_send = now()
            if safe:
                self.safe_actions += 1
                self.rejected["non_finite"] += 1
                fields = {
                    "seq": seq,
                    "episode": episode,
                    "step": step,
                    "model_id": model_id,
                    "safe": True,
                    "t_obs_ns": t_obs,
                    "t_recv_ns": t_recv,
                    "t_send_ns": t_send,
                    "note": _NOTE,
                }
                frames = P.encode(P.ACTION, fields, {"action": actions[i]})
            else:
                frames = frames_of(seq, episode, step, model_id, t_obs, t_recv, t_send, actions[i])
            send(b.identity, frames)
            sent = b.sent
            sent[seq] = new_sent_action(
                (
                    model_id,
                    safe,
                    t_send,
                    episode,
                    step,
                    shadow_id,
                    None if shadow_actions is None else shadow_actions[i],
                )
            )
            sent.pop(seq - SENT_KEPT, None)
            b.answered += 1
            self._obs_age_add(t_send - t_obs)
            self._latency_add(t_send - t_recv)
