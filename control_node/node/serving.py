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
from control_node.node.bridges import BridgeState, Link, SentAction
from control_node.node.stats import Samples
from models.policy import OnnxPolicy


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
        self.latency = Samples()  # observation received -> its action sent (per observation)
        self.obs_age = Samples()  # observation made (bridge clock) -> its action sent

    def serve(self, policy: OnnxPolicy, record: dict[str, Any]) -> None:
        """Answer with ``policy`` from now on; ``record`` (the deploy's or rollback's) gets the
        time from its request to the new model's first action."""
        self.policy = policy
        self.model_id = policy.model_id
        self.model_ids.add(policy.model_id)
        self.first_action_of = record

    def shadow_with(self, policy: OnnxPolicy | None) -> None:
        """Let ``policy`` answer beside the live model, unsent (None: no shadow), measured
        afresh."""
        self.shadow, self.shadow_stats = policy, ShadowStats()

    def answer(self, bridges: list[BridgeState], msgs: list[P.Message], recv_ns: list[int]) -> None:
        """Infer all observations in one batch and send each bridge its action."""
        check = self._float_obs  # uint8 frames are always finite: no pass over them
        if len(msgs) == 1:
            obs = msgs[0].arrays["obs"]
            finite = np.array([not check or np.isfinite(obs).all()])
            actions = (self.policy(obs) if finite[0] else self.safe_action)[None]
        else:
            batch = np.stack([m.arrays["obs"] for m in msgs])
            finite = np.ones(len(msgs), dtype=bool)
            if check:
                finite = np.isfinite(batch).reshape(len(msgs), -1).all(axis=1)
                batch[~finite] = 0.0
            actions = self.policy(batch)
        ok = finite & np.isfinite(actions).all(axis=1)
        if not ok.all():
            self.non_finite_obs += int((~finite).sum())
            actions = np.where(ok[:, None], actions, self.safe_action)
        actions = np.clip(actions, self.act_low, self.act_high).astype(np.float32, copy=False)
        shadow_actions = None
        if self.shadow is not None:  # the candidate answers too; only the live action is sent
            obs_batch = np.stack([m.arrays["obs"] for m in msgs])
            obs_batch[~finite] = 0.0
            shadow_actions = np.clip(self.shadow(obs_batch), self.act_low, self.act_high)
            self.shadow_stats.add(
                np.abs(shadow_actions - actions)[ok], self.act_high - self.act_low
            )
        shadow_id = self.shadow.model_id if self.shadow is not None else ""
        for i, (b, msg, t_recv, action, good) in enumerate(
            zip(bridges, msgs, recv_ns, actions, ok, strict=True)
        ):
            b.seq += 1
            safe = not bool(good)
            t_send = P.now_ns()
            fields = {
                "seq": b.seq,
                "episode": msg["episode"],
                "step": msg["step"],
                "model_id": self.model_id,
                "safe": safe,
                "t_obs_ns": msg["t_obs_ns"],
                "t_recv_ns": t_recv,
                "t_send_ns": t_send,
            }
            if safe:
                self.safe_actions += 1
                self.rejected["non_finite"] += 1
                fields["note"] = "non-finite observation or action: safe action sent"
            self._send(b.identity, P.encode(P.ACTION, fields, {"action": action}))
            shadow = None if shadow_actions is None else shadow_actions[i]
            b.sent[b.seq] = SentAction(
                self.model_id, safe, t_send, msg["episode"], msg["step"], shadow_id, shadow
            )
            if len(b.sent) > 512:
                for old in [s for s in b.sent if s <= b.seq - 256]:
                    del b.sent[old]
            b.answered += 1
            self.obs_age.add(t_send - msg["t_obs_ns"])
            self.latency.add(t_send - t_recv)
        if self.first_action_of is not None and not all(not g for g in ok):
            deploy, self.first_action_of = self.first_action_of, None
            deploy["request_to_first_action_ms"] = round(
                (P.now_ns() - deploy["t_request"]) / 1e6, 3
            )
