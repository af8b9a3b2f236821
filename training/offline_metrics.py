"""Offline metrics of a retrain, because a retrained actor has not been run yet when it is written:
the critic's TD loss on a fixed sample of the replay before and after the updates, and its Q
estimates against the discounted returns the robot actually collected, over every episode the
log holds whole (state logs; from pixels it would rebuild every stacked frame).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from training.agent import DDPGAgent
from training.config import TrainConfig
from training.learner import Replay, sample
from training.logged_data import LoggedTransitions, PixelLog
from training.metrics import finite_or_none
from training.replay import Batch

CRITIC_LOSS_ROWS = 10_000  # fixed replay sample the start/end critic loss is measured on
PIXEL_LOSS_ROWS = 1_000  # the same from pixels: two 36 KB stacks a row
Q_CHUNK = 65_536  # rows per critic forward pass when scoring Q against returns
PIXEL_Q_SKIPPED = (
    "not computed for pixel logs: it would rebuild every stacked frame of "
    "every whole episode; the critic loss above is measured on replay samples"
)


class OfflineMetrics:
    """The critic measured before the updates (at construction) and after (:meth:`after`), on
    the same replay sample and the same logged episodes. Measuring draws from its own seeded
    generators (``cfg.seed + 3`` for the sample, ``+ 4`` for target smoothing), so it changes
    no random stream of the updates."""

    def __init__(
        self,
        agent: DDPGAgent,
        replay: Replay,
        data: LoggedTransitions | PixelLog,
        cfg: TrainConfig,
    ) -> None:
        self.agent, self.cfg = agent, cfg
        self.probe = sample(
            replay,
            cfg,
            min(len(replay), PIXEL_LOSS_ROWS if cfg.pixels else CRITIC_LOSS_ROWS),
            generator=torch.Generator(device=replay.device).manual_seed(cfg.seed + 3),
        )
        self.loss_before = critic_loss(agent, self.probe, cfg.seed + 4)
        self.returns: LoggedReturns | None = None
        if isinstance(data, LoggedTransitions):
            self.returns = discounted_returns(data, cfg.gamma)
            self.q_obs, self.q_act = data.obs[self.returns.rows], data.action[self.returns.rows]
            self.q_before = q_values(agent, self.q_obs, self.q_act)

    def after(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """retrain.json's ``critic_loss`` and ``q_vs_logged_returns``, measured now."""
        loss_after = critic_loss(self.agent, self.probe, self.cfg.seed + 4)
        loss = {
            "rows": len(self.probe.reward),
            "start": finite_or_none(self.loss_before),
            "end": finite_or_none(loss_after),
        }
        if self.returns is None:
            return loss, {"skipped": PIXEL_Q_SKIPPED}
        q_after = q_values(self.agent, self.q_obs, self.q_act)
        return loss, q_report(self.cfg, self.returns, self.q_before, q_after)


@dataclass
class LoggedReturns:
    """Discounted returns-to-go of the rows of every whole episode in a log."""

    rows: np.ndarray  # indices into the LoggedTransitions arrays
    returns: np.ndarray  # G_t, float64
    terminated: np.ndarray  # bool per row: its episode ended in a true terminal state
    episodes: int
    episodes_terminated: int
    episodes_skipped: int  # not whole in the log (no step 0, no end, gaps, a dropped row)


def discounted_returns(data: LoggedTransitions, gamma: float) -> LoggedReturns:
    """G_t = sum_k gamma^k r_{t+k} for every row of every episode that is whole in the log:
    its rows cover steps 0..end without a gap or repeat, only the last is terminal
    (terminated or truncated), and none was dropped as non-finite.

    Vectorised across episodes: one numpy step per position from the episode end, so the
    Python loop runs as many times as the longest episode is long, whatever the row count.
    """
    n = len(data)
    if n == 0:
        none = np.zeros(0, np.int64)
        return LoggedReturns(none, none.astype(np.float64), none.astype(bool), 0, 0, 0)
    order = np.lexsort((data.step, data.episode))
    ep, step = data.episode[order], data.step[order]
    starts = np.flatnonzero(np.r_[True, ep[1:] != ep[:-1]])
    ends = np.r_[starts[1:], n]  # exclusive
    terminal = (data.terminated | data.truncated)[order]
    jump = np.r_[False, np.diff(step) != 1]
    jump[starts] = False
    whole = (
        (step[starts] == 0)
        & terminal[ends - 1]
        & (np.add.reduceat(terminal.astype(np.int64), starts) == 1)
        & (np.add.reduceat(jump.astype(np.int64), starts) == 0)
        & (np.add.reduceat((~data.valid[order]).astype(np.int64), starts) == 0)
    )
    lengths = (ends - starts)[whole]
    # Sorted positions of the kept rows, and each one's distance from its episode's last row.
    first_of = np.repeat(np.cumsum(lengths) - lengths, lengths)
    kept = np.repeat(starts[whole], lengths) + np.arange(lengths.sum()) - first_of
    from_end = np.repeat(ends[whole], lengths) - 1 - kept
    g = np.zeros(n, dtype=np.float64)
    if len(kept):
        reward = data.reward[order]
        by_dist = np.argsort(from_end, kind="stable")
        rows_by_dist = kept[by_dist]
        bounds = np.searchsorted(from_end[by_dist], np.arange(int(from_end.max()) + 2))
        last = rows_by_dist[bounds[0] : bounds[1]]
        g[last] = reward[last]
        for k in range(1, len(bounds) - 1):
            idx = rows_by_dist[bounds[k] : bounds[k + 1]]
            g[idx] = reward[idx] + gamma * g[idx + 1]
    term_ep = data.terminated[order][ends - 1] & whole
    return LoggedReturns(
        rows=order[kept],
        returns=g[kept],
        terminated=np.repeat(term_ep[whole], lengths),
        episodes=int(whole.sum()),
        episodes_terminated=int(term_ep.sum()),
        episodes_skipped=int((~whole).sum()),
    )


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Batch norm uses its running statistics and updates nothing while metrics are read."""
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was, strict=True):
            m.train(training)


def q_values(agent: DDPGAgent, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
    """The critic's estimate for logged (obs, action) pairs: the minimum over the twin critics
    (what the TD target bootstraps from), which is Q1 with a single critic."""
    out = np.empty(len(obs), dtype=np.float64)
    actor, device = agent.actor, agent.device
    with _eval_mode(agent.critic), torch.no_grad():
        for i in range(0, len(obs), Q_CHUNK):
            o = torch.as_tensor(obs[i : i + Q_CHUNK], device=device)
            if agent.normalizer is not None:  # the critic sees what it learnt on
                o = agent.normalizer.torch(o)
            a = torch.as_tensor(action[i : i + Q_CHUNK], device=device)
            a = (a - actor.action_bias) / actor.action_scale
            q = agent.critic(o, a).min(dim=0).values
            out[i : i + len(q)] = q.double().cpu().numpy()
    return out


def critic_loss(agent: DDPGAgent, batch: Batch, seed: int) -> float:
    """The update's own critic loss (as in train.csv: squared TD error, summed over the twin
    critics) on ``batch``, with no gradient step, batch norm in eval mode, and the target
    smoothing noise drawn from ``seed`` so that measuring changes no random stream."""
    devices = [agent.device] if agent.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        with _eval_mode(agent.critic):
            loss, _ = agent._critic_loss(agent.encode(agent.normalize(batch)))
    return float(loss)


def _q_stats(q: np.ndarray, g: np.ndarray) -> dict[str, float | None]:
    bias = q - g
    return {
        "q_mean": finite_or_none(float(q.mean())),
        "bias_mean": finite_or_none(float(bias.mean())),
        "bias_std": finite_or_none(float(bias.std())),
    }


def _q_group(
    returns: LoggedReturns, mask: np.ndarray, q_before: np.ndarray, q_after: np.ndarray
) -> dict[str, Any] | None:
    if not mask.any():
        return None
    g = returns.returns[mask]
    return {
        "rows": int(mask.sum()),
        "g_mean": float(g.mean()),
        "before": _q_stats(q_before[mask], g),
        "after": _q_stats(q_after[mask], g),
    }


def q_report(
    cfg: TrainConfig, returns: LoggedReturns, q_before: np.ndarray, q_after: np.ndarray
) -> dict[str, Any]:
    q_kind = (
        "min of the twin critics (the TD target's estimate)" if cfg.twin_q else "Q1 (one critic)"
    )
    return {
        "q": q_kind,
        "gamma": cfg.gamma,
        "note": (
            "G_t is the discounted return-to-go actually logged, over episodes whole in the "
            "log; Q includes the value beyond a time limit, which G of a truncated episode "
            "omits (G is then a lower bound when rewards are non-negative); 'terminated' "
            "holds only episodes that ended in a true terminal state"
        ),
        "episodes": returns.episodes,
        "episodes_terminated": returns.episodes_terminated,
        "episodes_skipped": returns.episodes_skipped,
        "all": _q_group(returns, np.ones(len(returns.rows), bool), q_before, q_after),
        "terminated": _q_group(returns, returns.terminated, q_before, q_after),
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def describe(report: dict[str, Any]) -> list[str]:
    """The offline metrics as a few printable lines."""
    loss = report["critic_loss"]
    lines = [
        f"critic loss on {loss['rows']} replay rows: {_fmt(loss['start'])} before, "
        f"{_fmt(loss['end'])} after {report['updates']} updates "
        f"({_fmt(report['updates_per_s'])} updates/s)"
    ]
    qr = report["q_vs_logged_returns"]
    if "skipped" in qr:
        return [*lines, f"Q vs logged returns: {qr['skipped']}"]
    for name in ("all", "terminated"):
        group = qr[name]
        if group is None:
            continue
        b, a = group["before"], group["after"]
        which = "whole episodes" if name == "all" else "terminated episodes"
        lines.append(
            f"Q vs logged returns ({which}, {group['rows']} rows; Q = {qr['q']}): "
            f"G {group['g_mean']:.4g}; before Q {_fmt(b['q_mean'])}, bias {_fmt(b['bias_mean'])}"
            f" ± {_fmt(b['bias_std'])}; after Q {_fmt(a['q_mean'])}, bias {_fmt(a['bias_mean'])}"
            f" ± {_fmt(a['bias_std'])}"
        )
    if qr["all"] is None:
        lines.append("Q vs logged returns: no episode is whole in the logs")
    return lines
