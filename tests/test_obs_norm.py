"""Observation normalisation (``--obs-norm``): the running statistics are exact and are those of
the replay's observations, the networks see the standardised ones, the checkpoint restores them
bit for bit, and the exported graph takes raw observations: ONNX on raw observations equals the
torch actor on normalised ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from control_node.config import ConfigError
from models.export import export_actor
from models.networks import Actor, Standardize, StandardizedActor
from models.policy import OnnxPolicy
from sim_bridge.envs import make_env
from training.config import make_config
from training.obs_norm import CLIP, ObsNormalizer, RunningMeanStd
from training.rundir import resume_config
from training.trainer import Trainer, train


def _ckpt(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def _replay_obs(run: Path) -> np.ndarray:
    return torch.load(run / "replay.pt", weights_only=True)["obs"].numpy().astype(np.float64)


# -- the statistics --------------------------------------------------------------------------
def test_merged_batches_give_the_exact_mean_and_variance() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 6)) * [1.0, 1e3, 1e-3, 5.0, 0.0, 2.0] + [0, 1e4, -3, 7, 1, 0]
    whole, rows, pieces = RunningMeanStd(6), RunningMeanStd(6), RunningMeanStd(6)
    whole.update(x)
    for row in x[:300]:
        rows.update(row[None])
    rows.update(x[300:])
    for piece in np.array_split(x, [1, 17, 600, 601, 4000]):
        pieces.update(piece)
    for stats in (whole, rows, pieces):
        assert stats.count == 5000
        np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.var, x.var(axis=0), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="non-finite observation"):
        whole.update(np.full((1, 6), np.nan))


def test_standardisation_is_float32_clipped_and_the_identity_before_data() -> None:
    norm = ObsNormalizer(3)
    x = np.array([[0.5, -2.0, 3.0]], np.float32)
    assert np.array_equal(norm.numpy(x), x)  # no data yet: mean 0, variance 1
    norm.update(np.array([[0.0, 10.0, 0.0], [2.0, 10.0, 0.0]]))  # std 1, 0 (constant), 0
    out = norm.numpy(np.array([[1.0, 10.0, 0.0], [3.0, 10.5, -1.0]]))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], [0.0, 0.0, 0.0])  # a constant dimension stays finite
    assert out[1, 0] == 2.0 and out[1, 1] == CLIP and out[1, 2] == -CLIP
    t = norm.torch(torch.tensor([[1.0, 10.0, 0.0], [3.0, 10.5, -1.0]]))
    assert np.array_equal(t.numpy(), out)  # acting and updating see the same numbers
    again = ObsNormalizer(3)
    again.load_state_dict(norm.state_dict())
    assert np.array_equal(again.numpy(x), norm.numpy(x))
    assert again.stats.mean.tobytes() == norm.stats.mean.tobytes()
    with pytest.raises(ValueError, match="4 dimensions, not 3"):
        again.load_state_dict(ObsNormalizer(4).state_dict())


# -- in the trainer --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def normed_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Pendulum run with --obs-norm past learning_starts, exported, its replay saved."""
    out = tmp_path_factory.mktemp("obsnorm") / "run"
    cfg = make_config(
        "td3",
        env="Pendulum-v1",
        steps=600,
        learning_starts=200,
        eval_every=0,
        eval_episodes=1,
        log_every=100,
        batch_size=32,
        actor_hidden=(32, 32),
        critic_hidden=(32, 32),
        obs_norm=True,
        save_replay=True,
        out=str(out),
    )
    trainer = Trainer(cfg, progress=False)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    return {"out": out, "summary": summary, "trainer": trainer}


def test_the_statistics_are_those_of_the_replays_observations(normed_run: dict[str, Any]) -> None:
    out, trainer = normed_run["out"], normed_run["trainer"]
    assert normed_run["summary"]["updates"] == 401  # learning happened, on normalised batches
    saved = _ckpt(out)["agent"]["obs_norm"]
    obs = _replay_obs(out)  # raw observations: Pendulum's are float32, stored exactly
    assert int(saved["count"]) == len(obs) == 600
    np.testing.assert_allclose(saved["mean"].numpy(), obs.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(saved["m2"].numpy() / 600, obs.var(axis=0), rtol=1e-10)
    assert np.abs(obs).max() > 2.0  # angular velocity: the replay is not already standardised
    # The update learns on standardised batches: what the critic loss was computed from.
    batch = trainer.agent.normalize(trainer.sample(4096))
    assert abs(float(batch.obs.mean())) < 0.2 and abs(float(batch.obs.std()) - 1.0) < 0.2


def test_onnx_on_raw_observations_equals_torch_actor_on_normalised(
    normed_run: dict[str, Any],
) -> None:
    out, agent = normed_run["out"], normed_run["trainer"].agent
    model = onnx.load(out / "actor.onnx")
    assert {p.key: p.value for p in model.metadata_props}["obs_norm"] == "standardize"
    assert [n.op_type for n in model.graph.node][:3] == ["Sub", "Mul", "Clip"]
    policy = OnnxPolicy(out / "actor.onnx")
    env = make_env("Pendulum-v1")
    raw = np.stack([env.reset(seed=s)[0] for s in range(200)]).astype(np.float32)
    raw[:, 2] *= 8.0  # the whole velocity range
    env.close()
    with torch.no_grad():
        normalised = agent.normalizer.torch(torch.from_numpy(raw))
        expected = agent.actor.eval()(normalised).numpy()
        unnormalised = agent.actor(torch.from_numpy(raw)).numpy()
    got = policy(raw)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    assert np.abs(got - unnormalised).max() > 1e-2  # the standardisation is in the graph
    # and the trainer's own acting path (numpy) is the same policy
    np.testing.assert_allclose(agent.act(raw), expected, rtol=0, atol=2e-5)


def test_statistics_survive_resume_bit_for_bit(tmp_path: Path) -> None:
    base = {
        "env": "Pendulum-v1",
        "learning_starts": 100,
        "eval_every": 0,
        "eval_episodes": 0,
        "export": False,
        "batch_size": 16,
        "actor_hidden": (16, 16),
        "critic_hidden": (16, 16),
        "obs_norm": True,
        "save_replay": True,
    }
    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        train(make_config("td3", steps=300, out=str(run), **base), progress=False)
        first = _ckpt(run)["agent"]["obs_norm"]
        trainer = Trainer(resume_config(run, steps=500), resume=True, progress=False)
        try:
            restored = trainer.agent.normalizer
            assert restored is not None and restored.stats.count == 300
            assert restored.stats.mean.tobytes() == first["mean"].numpy().tobytes()
            assert restored.stats.m2.tobytes() == first["m2"].numpy().tobytes()
            trainer.run()
        finally:
            trainer.close()
        runs.append(_ckpt(run)["agent"])
        # The statistics and the replay agree after the resume too.
        obs = _replay_obs(run)
        assert int(runs[-1]["obs_norm"]["count"]) == len(obs) == 500
        np.testing.assert_allclose(
            runs[-1]["obs_norm"]["mean"].numpy(), obs.mean(axis=0), rtol=0, atol=1e-12
        )
    a, b = runs
    for part in ("obs_norm", "actor", "critic"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_pixels_refuse_obs_norm_with_a_clear_message() -> None:
    with pytest.raises(ConfigError, match="obs_norm = True is for state observations"):
        make_config(None, env="InvertedPendulum-v5", pixels=True, obs_norm=True)


# -- in the exported graph -------------------------------------------------------------------
def test_standardised_actor_exports_with_batch_norm_and_far_off_statistics(
    tmp_path: Path,
) -> None:
    """The paper's batch norm after the standardisation; means far from zero, so probes around
    zero alone would only see clipped inputs: parity is checked around the data."""
    torch.manual_seed(0)
    actor = Actor(4, [-2.0, 0.0], [2.0, 1.0], (32, 32), obs_norm=True)
    with torch.no_grad():
        for _ in range(3):
            actor(torch.randn(64, 4))
    mean, std = np.array([100.0, -50.0, 0.0, 3.0]), np.array([10.0, 0.1, 1.0, 2.0])
    norm = Standardize(mean, 1.0 / std, CLIP)
    report = export_actor(
        StandardizedActor(actor.eval(), norm),
        tmp_path / "a.onnx",
        env_id="Custom-v0",
        preset="paper",
        run_name="unit",
        train_steps=1,
        seed=0,
        eval_seed=10_000,
    )
    policy = OnnxPolicy(report.path)
    assert policy.metadata.obs_norm == "standardize+batch_norm"
    raw = (mean + np.random.default_rng(1).standard_normal((500, 4)) * std).astype(np.float32)
    with torch.no_grad():
        x = torch.clamp((torch.from_numpy(raw) - norm.mean) * norm.inv_std, -CLIP, CLIP)
        expected = actor(x).numpy()
    np.testing.assert_allclose(policy(raw), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="3 dimensions, the actor takes 4"):
        StandardizedActor(actor, Standardize(mean[:3], std[:3], CLIP))
