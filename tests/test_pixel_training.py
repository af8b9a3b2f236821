"""``ddpg train --pixels``: a short run past learning_starts, its exported uint8 actor, the
pixel presets, same-seed equality, and refusals before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from weights import changed, params

from control_node.config import ConfigError
from models.policy import OnnxPolicy, pixel_spec_dict
from models.spec import SUGGESTED_VIEWS
from training.agent import DDPGAgent
from training.config import load_config, make_config, save_config
from training.replay import Batch
from training.trainer import train

DDPG = [sys.executable, "-m", "control_node"]
SMOKE = {
    "env": "InvertedPendulum-v5",
    "pixels": True,
    "steps": 60,
    "learning_starts": 40,
    "batch_size": 8,
    "eval_every": 0,
    "eval_episodes": 1,
    "seed": 3,
}


@pytest.fixture(scope="module")
def drq_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One drq run with export (the export's parity check is most of its time)."""
    out = tmp_path_factory.mktemp("drq")
    summary = train(make_config("drq", **SMOKE, out=str(out)), progress=False)
    return out, summary


def test_pixel_run_updates_and_exports_a_checked_uint8_actor(drq_run: tuple[Path, dict]) -> None:
    out, summary = drq_run
    # update_every 2 at steps 40, 42, ..., 60: updating happened past learning_starts
    assert summary["updates"] == 11
    view = str(SUGGESTED_VIEWS["InvertedPendulum-v5"])  # a new run's 'auto' view, resolved
    assert summary["pixels"] == {"size": 64, "stack": 3, "repeat": 2, "camera": None, "view": view}
    assert summary["steps"] == 60 and 60 < summary["env_steps"] <= 120  # 2 physics steps each
    assert summary["replay_bytes"] < 2 * 3 * 64 * 64 * 60  # under two frames per transition
    saved = json.loads((out / "eval.json").read_text())
    assert saved["model"] == str(out / "actor.onnx")
    policy = OnnxPolicy(out / "actor.onnx")
    meta = policy.metadata
    assert meta.obs_dtype == "uint8" and meta.obs_shape == (9, 64, 64)
    assert pixel_spec_dict(meta) == summary["pixels"]
    graph = onnx.load(out / "actor.onnx").graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    frames = np.random.default_rng(0).integers(0, 256, (4, 9, 64, 64), dtype=np.uint8)
    actions = policy(frames)
    assert actions.shape == (4, 1) and np.all(np.abs(actions) <= 3.0)


def test_eval_cli_renders_frames_for_a_pixel_actor(drq_run: tuple[Path, dict]) -> None:
    out, _ = drq_run
    done = subprocess.run(
        [*DDPG, "eval", str(out / "actor.onnx"), "--episodes", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["env"] == "InvertedPendulum-v5" and len(result["returns"]) == 1


def test_same_seed_pixel_runs_are_equal(tmp_path: Path) -> None:
    """Rendering, replay sampling, augmentation and n-step targets are all seeded."""
    weights = []
    for name in ("a", "b"):
        cfg = make_config("drq", **SMOKE, out=str(tmp_path / name), export=False)
        summary = train(cfg, progress=False)
        state = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        weights.append((summary["eval_returns"], state["agent"]["critic"]))
    assert weights[0][0] == weights[1][0]
    for key, value in weights[0][1].items():
        assert torch.equal(value, weights[1][1][key]), key


def _pixel_agent(seed: int = 0, **overrides: object) -> tuple[DDPGAgent, Batch]:
    cfg = make_config("drq", env="InvertedPendulum-v5", pixels=True, batch_size=8, **overrides)
    torch.manual_seed(seed)
    agent = DDPGAgent(cfg, (9, 64, 64), np.array([-3.0]), np.array([3.0]), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (2, 8, 9, 64, 64), generator=gen, dtype=torch.uint8)
    batch = Batch(
        obs=frames[0],
        action=torch.rand(8, 1, generator=gen) * 6 - 3,
        reward=torch.rand(8, generator=gen),
        next_obs=frames[1],
        terminated=torch.zeros(8),
    )
    return agent, batch


def test_drq_shares_one_encoder_that_only_the_critic_trains() -> None:
    """DrQ-v2: the actor reads the critic's encoder, and its own loss never moves it."""
    agent, batch = _pixel_agent()
    assert agent.cfg.shared_encoder
    assert agent.actor.encoder is agent.critic.encoder
    assert agent.actor_target.encoder is agent.critic_target.encoder  # targets share it too
    own = {id(p) for p in agent.actor_params}
    assert own.isdisjoint(id(p) for p in agent.critic.encoder.parameters())
    # policy_delay 2: the first update steps the critic alone; with delay 1 the actor as well.
    # The encoder comes out the same either way, while the actor's own layers do learn.
    encoders, trunks = [], []
    for delay in (1, 2):
        agent, batch = _pixel_agent(policy_delay=delay)
        trunk = params(agent.actor.trunk)
        agent.update(batch)
        encoders.append(params(agent.critic.encoder))
        trunks.append(changed(trunk, params(agent.actor.trunk)))
    assert trunks == [True, False]
    for key, value in encoders[0].items():
        assert torch.equal(value, encoders[1][key]), key


def test_a_shared_encoder_moves_its_target_by_tau_once() -> None:
    agent, batch = _pixel_agent()
    before = params(agent.critic_target.encoder)
    agent.update(batch)  # policy_delay 1: a soft update follows the critic's step
    tau = agent.cfg.tau
    online, target = agent.critic.encoder.state_dict(), agent.critic_target.encoder.state_dict()
    for key, old in before.items():
        expected = torch.lerp(old, online[key], tau)
        assert torch.allclose(target[key], expected, atol=1e-7), key


def test_without_a_shared_encoder_each_network_has_its_own() -> None:
    agent, _ = _pixel_agent(shared_encoder=False)
    assert agent.actor.encoder is not agent.critic.encoder
    assert len(agent.actor_params) == len(list(agent.actor.parameters()))


def test_a_checkpoint_with_two_encoders_is_refused_by_a_shared_one(tmp_path: Path) -> None:
    """Runs saved before the drq preset shared its encoder resume only as they were saved."""
    separate, _ = _pixel_agent(shared_encoder=False)
    shared, _ = _pixel_agent()
    with pytest.raises(RuntimeError, match="shared_encoder: false"):
        shared.load_state_dict(separate.state_dict())
    again, _ = _pixel_agent(seed=1)
    again.load_state_dict(shared.state_dict())  # its own kind loads
    assert torch.equal(again.actor.encoder.convs[0].weight, shared.critic.encoder.convs[0].weight)


def test_a_new_pixel_run_saves_the_view_it_resolved(tmp_path: Path) -> None:
    """'auto' is resolved once, when the run is made, and saved: resuming renders the same
    frames whatever the table of suggested views says by then."""
    side = str(SUGGESTED_VIEWS["InvertedPendulum-v5"])
    pend = {"env": "InvertedPendulum-v5", "pixels": True}
    cfg = make_config("drq", **pend)
    assert cfg.view == side and cfg.pixel_spec().view == side
    assert make_config("drq", **pend, view="env").pixel_spec().view is None
    assert make_config("drq", **pend, camera="-1").view == "env"  # a camera chosen: no view
    assert make_config("drq", env="HalfCheetah-v5", pixels=True).view == "env"  # none known
    chosen = make_config("drq", **pend, view="elevation=-10 distance=3 azimuth=90 lookat=0,0,0")
    assert chosen.view == "distance=3 azimuth=90 elevation=-10 lookat=0,0,0"
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path).view == side
    old = {k: v for k, v in cfg.to_dict().items() if k != "view"}  # saved before views
    path.write_text(yaml.safe_dump(old))
    assert load_config(path).view == "env" and load_config(path).pixel_spec().view is None
    with pytest.raises(ConfigError, match=r"view .* lacks lookat"):
        make_config("drq", **pend, view="distance=3 azimuth=90 elevation=0")
    with pytest.raises(ConfigError, match=r"view = .* needs --pixels"):
        make_config("td3", env="InvertedPendulum-v5", view="env")


def test_paper_pixel_preset_is_the_papers() -> None:
    cfg = make_config("paper", pixels=True)
    assert cfg.batch_size == 16 and cfg.final_init == 3e-4
    assert cfg.actor_hidden == (200, 200) == cfg.critic_hidden
    assert (cfg.frame_stack, cfg.action_repeat, cfg.pixel_size) == (3, 3, 64)
    assert cfg.noise == "ou" and not cfg.twin_q and cfg.n_step == 1 and cfg.augment_pad == 0
    drq = make_config(None, pixels=True)  # the pixel default
    assert drq.preset == "drq" and drq.augment_pad == 4 and drq.n_step == 3
    assert drq.noise_decay_steps > 0 and drq.twin_q and drq.shared_encoder
    assert drq.action_repeat == 2 and drq.noise_sigma_final == 0.1  # DrQ-v2's
    assert not cfg.shared_encoder  # the paper trains actor and critic as separate networks
    assert make_config(None).preset == "td3"  # the state default is unchanged


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"preset": "drq"}, "preset 'drq' learns from pixels; add --pixels"),
        ({"n_step": 0}, "n_step = 0 must be in 1..100"),  # any run may use n-step returns
        ({"augment_pad": 4}, "augment_pad = 4 needs --pixels"),
        ({"shared_encoder": True}, "shared_encoder = True needs --pixels"),
        ({"pixels": True, "pixel_size": 8}, "pixel_size = 8 must be in 16..256"),
        ({"pixels": True, "conv_strides": "2,2"}, "conv_strides = (2, 2) needs 3"),
    ],
)
def test_bad_pixel_config_is_refused(overrides: dict, message: str) -> None:
    overrides = dict(overrides)
    preset = overrides.pop("preset", None)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config(preset, **overrides)


HUGE = ["--steps", "100000000", "--buffer-size", "100000000", "--no-progress"]


def test_a_replay_that_does_not_fit_is_refused_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "huge"
    done = subprocess.run(
        [*DDPG, "train", "--env", "InvertedPendulum-v5", "--pixels", *HUGE, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "buffer_size = 100000000" in done.stderr and "lower --buffer-size" in done.stderr
    assert not (out / "checkpoint.pt").exists()
