"""The crossq preset and its switches: CrossQ's target-free batch-normalised critic, Simba
residual networks, the categorical (C51) critic, n-step returns and periodic resets.

Each switch is checked against a hand computation or the property that defines it; the preset
trains past learning_starts, gives equal runs for equal seeds, and exports a parity-checked
actor that takes raw observations.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from weights import changed, params

from control_node.config import ConfigError
from models.networks import Actor, BlockCritic, ResidualBlock
from models.policy import OnnxPolicy
from training.agent import DDPGAgent, build_networks
from training.config import make_config
from training.distributional import expected, project
from training.metrics import read_csv
from training.mlp_update import smooth_target_action
from training.replay import ReplayBuffer
from training.trainer import Trainer, train

OBS, ACT = 5, 2
LOW, HIGH = np.array([-2.0, 0.0]), np.array([2.0, 1.0])
TINY = {"actor_hidden": (16,), "critic_hidden": (16, 16), "batch_size": 8}


def _agent(**kw: Any) -> tuple[DDPGAgent, ReplayBuffer]:
    """The preset with Simba's blocks on (the switch that changes the networks most), tiny."""
    torch.manual_seed(0)
    cfg = make_config("crossq", **{**TINY, "simba": True, **kw})
    agent = DDPGAgent(cfg, OBS, LOW, HIGH, torch.device("cpu"))
    buf = ReplayBuffer(64, OBS, ACT)
    rng = np.random.default_rng(0)
    for _ in range(64):
        obs = rng.normal(size=OBS)
        buf.add(obs, rng.uniform(LOW, HIGH), rng.normal(), obs + 0.1, rng.random() < 0.1, False)
    return agent, buf


# -- the preset and its switches ---------------------------------------------------------------
def test_preset_is_the_td3_learner_with_crossq_critic() -> None:
    cfg = make_config("crossq")
    assert cfg.crossq and cfg.obs_norm and not cfg.simba
    assert cfg.actor_hidden == cfg.critic_hidden == (256, 256) and cfg.batch_size == 256
    assert (cfg.adam_beta1, cfg.policy_delay, cfg.actor_lr, cfg.critic_lr) == (0.5, 3, 1e-3, 1e-3)
    assert cfg.twin_q and cfg.policy_noise == 0.2  # TD3's clipped double Q and smoothing stay
    # measured by the ablation and left off, each one flag away
    assert not cfg.distributional and cfg.n_step == 1 and cfg.reset_every == 0
    assert cfg.updates_per_step == 1
    torch.manual_seed(0)
    agent = DDPGAgent(cfg, OBS, LOW, HIGH, torch.device("cpu"))
    assert isinstance(agent.actor, Actor) and isinstance(agent.critic, BlockCritic)
    assert agent.critic_target is None and agent.actor_target is None  # CrossQ: no targets
    member = agent.critic.members[0]
    assert isinstance(member[0], torch.nn.BatchNorm1d)  # CrossQ: the (s, a) input normalised
    norms = [m for m in member.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 3  # the input and both hidden layers
    assert not [m for m in agent.actor.modules() if isinstance(m, ResidualBlock)]
    assert agent._mlp is None  # the batch-normalised critic takes the autograd path


def test_simba_switch_gives_residual_layernorm_networks() -> None:
    agent, _ = _agent()
    blocks = [m for m in agent.actor.body if isinstance(m, ResidualBlock)]
    assert len(blocks) == 1 and isinstance(blocks[0].norm, torch.nn.LayerNorm)
    assert isinstance(agent.actor.body[-1], torch.nn.LayerNorm)
    member = agent.critic.members[0]
    assert isinstance(member[0], torch.nn.BatchNorm1d)
    critic_blocks = [m for m in member.modules() if isinstance(m, ResidualBlock)]
    assert len(critic_blocks) == 2
    assert all(isinstance(b.norm, torch.nn.BatchNorm1d) for b in critic_blocks)


def test_residual_block_adds_its_normalised_mlp_to_the_input() -> None:
    torch.manual_seed(0)
    block = ResidualBlock(8)
    x = torch.randn(4, 8) * 3 + 1
    with torch.no_grad():
        z = (x - x.mean(1, keepdim=True)) / torch.sqrt(
            x.var(1, unbiased=False, keepdim=True) + 1e-5
        )
        by_hand = x + block.down(torch.relu(block.up(z)))
        torch.testing.assert_close(block(x), by_hand)
    assert block.up.out_features == 32  # Simba's 4x inner width


def test_each_switch_turns_off_alone() -> None:
    plain, _ = _agent(simba=False)
    assert isinstance(plain.actor.body[1], torch.nn.ReLU)  # a plain MLP actor again
    assert isinstance(plain.critic.members[0][2], torch.nn.ReLU)
    no_crossq, _ = _agent(crossq=False)
    assert no_crossq.critic_target is not None and no_crossq.actor_target is not None
    norms = [m for m in no_crossq.critic.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert not norms  # Simba's LayerNorm critic
    assert make_config("crossq", obs_norm=False).obs_norm is False


def test_config_refuses_what_the_switches_cannot_do() -> None:
    with pytest.raises(ConfigError, match="equal widths"):
        make_config("crossq", simba=True, critic_hidden=(256, 128))
    with pytest.raises(ConfigError, match="learns from the state"):
        make_config("crossq", pixels=True)
    with pytest.raises(ConfigError, match="crossq = True is for state runs"):
        make_config("drq", pixels=True, crossq=True)
    with pytest.raises(ConfigError, match="batch_norm"):
        make_config("paper", distributional=True)
    with pytest.raises(ConfigError, match=r"v_max = .* must be above v_min"):
        make_config("td3", distributional=True, v_min=0.0, v_max=-5.0)
    with pytest.raises(ConfigError, match="adam_beta1"):
        make_config("td3", adam_beta1=1.0)


# -- CrossQ: no target networks, one joint pass --------------------------------------------------
def test_crossq_has_no_target_networks() -> None:
    agent, buf = _agent()
    assert agent.actor_target is None and agent.critic_target is None
    state = agent.state_dict()
    assert not any("target" in k for k in state)
    agent.update(buf.sample(8))
    restored, _ = _agent()
    restored.load_state_dict(agent.state_dict())  # a checkpoint without targets loads back
    assert not changed(params(agent.critic), params(restored.critic))


def test_crossq_target_comes_from_the_online_critic_in_one_joint_pass() -> None:
    """The loss equals the one computed by hand with the online critic on the concatenated
    (s, a) and (s', mu(s')) batch. A lagging target copy would differ after a few updates, and
    so would two separate passes: their batch statistics are not shared."""
    agent, buf = _agent(policy_noise=0.0, gamma=0.9)
    for _ in range(4):
        agent.update(buf.sample(8))
    batch = agent.normalize(buf.sample(8, torch.Generator().manual_seed(2)))
    actor, critic = agent.actor, copy.deepcopy(agent.critic)
    action = (batch.action - actor.action_bias) / actor.action_scale
    with torch.no_grad():
        actor.eval()
        next_action = actor.normalized(batch.next_obs)
        actor.train()
        joint = critic(torch.cat([batch.obs, batch.next_obs]), torch.cat([action, next_action]))
        q, next_q = joint[:, :8, 0], joint[:, 8:, 0]
        target = batch.reward + 0.9 * (1 - batch.terminated) * next_q.min(0).values
        expected_loss = (q - target).pow(2).mean(1).sum()
        apart = copy.deepcopy(agent.critic)
        q_a, next_a = apart(batch.obs, action)[..., 0], apart(batch.next_obs, next_action)[..., 0]
        target_a = batch.reward + 0.9 * (1 - batch.terminated) * next_a.min(0).values
        separate_loss = (q_a - target_a).pow(2).mean(1).sum()
    loss, _ = agent._critic_loss(batch)
    torch.testing.assert_close(loss, expected_loss)
    assert not torch.allclose(loss, separate_loss)
    # the running statistics moved with the mean of both halves
    fresh, _ = _agent(policy_noise=0.0)
    with torch.no_grad():
        fresh_next = fresh.actor.normalized(batch.next_obs)  # no batch norm in the actor
    fresh._critic_loss(batch)
    bn = fresh.critic.members[0][0]
    rows = torch.cat(
        [torch.cat([batch.obs, action], 1), torch.cat([batch.next_obs, fresh_next], 1)]
    )
    torch.testing.assert_close(bn.running_mean, 0.01 * rows.mean(0))


def test_crossq_actor_step_reads_the_critic_in_eval_mode() -> None:
    agent, buf = _agent()
    agent.update(buf.sample(8))
    before = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    agent._actor_loss_fn(agent.normalize(buf.sample(8)).obs)
    after = agent.critic.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no statistics updated
    assert agent.critic.training  # and back in training mode


# -- the categorical critic ------------------------------------------------------------------------
def test_projection_matches_a_hand_computation() -> None:
    atoms = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]])
    # r + 0.5 z = 0.5, 1.0, 1.5, 2.0, 2.5: halves split between neighbours, whole atoms stay
    got = project(probs, torch.tensor([0.5]), torch.tensor([0.5]), atoms)
    by_hand = torch.tensor([[0.05, 0.05 + 0.2 + 0.15, 0.15 + 0.4, 0.0, 0.0]])
    torch.testing.assert_close(got, by_hand)
    torch.testing.assert_close(got.sum(1), torch.ones(1))
    # inside the support the projected mean is the scalar target r + bootstrap * E[Z]
    torch.testing.assert_close(expected(got, atoms), 0.5 + 0.5 * expected(probs, atoms))
    # outside it the mass is kept at the end atoms; terminal (bootstrap 0): all on r
    clipped = project(probs, torch.tensor([3.0]), torch.tensor([1.0]), atoms)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 0.0, 0.1, 0.9]]))
    terminal = project(probs, torch.tensor([2.25]), torch.tensor([0.0]), atoms)
    torch.testing.assert_close(terminal, torch.tensor([[0.0, 0.0, 0.75, 0.25, 0.0]]))


def test_random_projections_conserve_mass_and_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    atoms = torch.linspace(-10, 10, 51)
    probs = torch.softmax(torch.randn(64, 51, generator=gen), 1)
    reward = torch.rand(64, generator=gen) - 0.5
    bootstrap = 0.5 * torch.rand(64, generator=gen)  # |r| + 0.5 * 10 stays inside [-10, 10]
    got = project(probs, reward, bootstrap, atoms)
    torch.testing.assert_close(got.sum(1), torch.ones(64))
    torch.testing.assert_close(
        expected(got, atoms), reward + bootstrap * expected(probs, atoms), rtol=0, atol=1e-5
    )


def test_distributional_loss_uses_the_smaller_members_distribution() -> None:
    agent, buf = _agent(distributional=True, crossq=False, num_atoms=11, v_min=-5.0, v_max=5.0)
    assert agent.critic.members[0][-1].out_features == 11
    batch = agent.normalize(buf.sample(8, torch.Generator().manual_seed(1)))
    batch = batch._replace(discount=torch.full((8,), 0.9**3))  # as an n-step batch brings
    atoms = agent.atoms
    assert atoms is not None
    torch.manual_seed(4)
    loss, _ = agent._critic_loss(batch)
    torch.manual_seed(4)  # the same target policy smoothing noise
    with torch.no_grad():
        assert agent.actor_target is not None and agent.critic_target is not None
        next_a = smooth_target_action(agent.actor_target.normalized(batch.next_obs), agent.cfg)
        next_p = torch.softmax(agent.critic_target(batch.next_obs, next_a), -1)
        rows = []
        for i in range(8):
            m = int(torch.argmin(expected(next_p[:, i], atoms)))
            boot = (1 - batch.terminated[i]) * 0.9**3
            rows.append(project(next_p[m, i : i + 1], batch.reward[i : i + 1], boot[None], atoms))
        target = torch.cat(rows)
        action = (batch.action - agent.actor.action_bias) / agent.actor.action_scale
        logp = torch.log_softmax(agent.critic(batch.obs, action), -1)
        by_hand = -(target * logp).sum(-1).mean(1).sum()
    torch.testing.assert_close(loss, by_hand)
    metrics = agent.update(buf.sample(8))
    assert all(torch.isfinite(v) for v in metrics.values())


# -- resets ------------------------------------------------------------------------------------------
def test_reset_draws_fresh_networks_and_optimisers() -> None:
    agent, buf = _agent(reset_every=2, policy_delay=1, crossq=False)
    agent.update(buf.sample(8))
    before = {"a": params(agent.actor), "c": params(agent.critic)}
    assert int(agent.critic_opt.opt.state[agent.critic_opt.param]["step"]) == 1
    agent.update(buf.sample(8))  # the second update ends with a reset
    after = {"a": params(agent.actor), "c": params(agent.critic)}
    assert changed(before["a"], after["a"]) and changed(before["c"], after["c"])
    for opt in (agent.actor_opt, agent.critic_opt):
        state = opt.opt.state[opt.param]
        assert int(state["step"]) == 0 and not state["exp_avg"].any()
    assert agent.actor_target is not None and agent.critic_target is not None
    assert not changed(params(agent.actor_target), after["a"])  # targets start as the online
    assert not changed(params(agent.critic_target), after["c"])
    # a reset is the initialisation itself: the same draws as building the networks anew
    torch.manual_seed(7)
    agent.reset_networks()
    torch.manual_seed(7)
    actor, critic = build_networks(agent.cfg, OBS, LOW, HIGH)
    assert not changed(params(actor), params(agent.actor))
    assert not changed(params(critic), params(agent.critic))
    metrics = agent.update(buf.sample(8))  # and it learns on from there
    assert torch.isfinite(metrics["critic_loss"])


def _tiny(tmp_path: Path, name: str, **kw: Any) -> Any:
    base = {
        "env": "Pendulum-v1",
        "steps": 400,
        "learning_starts": 100,
        "eval_every": 0,
        "eval_episodes": 1,
        "log_every": 100,
        "actor_hidden": (32,),
        "critic_hidden": (32, 32),
        "batch_size": 32,
        "export": False,
        "out": str(tmp_path / name),
    }
    return make_config("crossq", **{**base, "simba": True, **kw})


def test_resets_in_a_run_keep_the_replay(tmp_path: Path) -> None:
    trainer = Trainer(_tiny(tmp_path, "r", reset_every=100), progress=False)
    try:
        trainer.run()
        assert trainer.agent.updates == 301 and len(trainer.replay) == 400
        assert trainer.agent.normalizer is not None
        assert trainer.agent.normalizer.stats.count == 400
        # the last reset was at update 300: the critic's Adam has taken one step since
        opt = trainer.agent.critic_opt
        assert int(opt.opt.state[opt.param]["step"]) == 1
    finally:
        trainer.close()


# -- runs: smoke, same seed, export --------------------------------------------------------------
def test_smoke_run_updates_and_exports_a_raw_observation_actor(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, "s", export=True)
    trainer = Trainer(cfg, progress=False)
    initial = params(trainer.agent.actor), params(trainer.agent.critic)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["updates"] == 301
    assert changed(initial[0], params(trainer.agent.actor))
    assert changed(initial[1], params(trainer.agent.critic))
    rows = read_csv(tmp_path / "s" / "train.csv")
    assert all(np.isfinite(r["critic_loss"]) for r in rows if r["step"] > 100)
    ckpt = torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)
    assert int(ckpt["agent"]["obs_norm"]["count"]) == 400 and "critic_target" not in ckpt["agent"]
    policy = OnnxPolicy(tmp_path / "s" / "actor.onnx")
    assert policy.metadata.obs_norm == "standardize" and policy.metadata.preset == "crossq"
    obs = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32) * 2
    np.testing.assert_allclose(policy(obs), trainer.agent.act(obs), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "switches",
    [{}, {"crossq": False, "distributional": True, "v_min": -1600.0, "v_max": 0.0, "n_step": 3}],
    ids=["preset", "c51-nstep-targets"],
)
def test_same_seed_runs_give_identical_checkpoints(tmp_path: Path, switches: dict) -> None:
    states = []
    for name in ("a", "b"):
        train(_tiny(tmp_path, name, steps=250, **switches), progress=False)
        states.append(torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["agent"])
    a, b = states
    assert a["updates"] == b["updates"] == 151
    for net in ("actor", "critic", *(("critic_target",) if switches else ())):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    for opt in ("actor_opt", "critic_opt"):
        sa, sb = a[opt]["state"][0], b[opt]["state"][0]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), opt
    assert all(torch.equal(a["obs_norm"][k], b["obs_norm"][k]) for k in a["obs_norm"])
