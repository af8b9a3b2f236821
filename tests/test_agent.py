import copy

import numpy as np
import pytest
import torch
from weights import params

from control_node.config import ConfigError
from training.agent import DDPGAgent
from training.config import PRESETS, TrainConfig, load_config, make_config
from training.replay import ReplayBuffer

OBS, ACT = 5, 2


def _agent(preset: str, **kw: object) -> tuple[DDPGAgent, ReplayBuffer]:
    torch.manual_seed(0)
    cfg = make_config(preset, actor_hidden=(16, 16), critic_hidden=(16, 16), batch_size=8, **kw)
    low, high = np.array([-2.0, 0.0]), np.array([2.0, 1.0])
    agent = DDPGAgent(cfg, OBS, low, high, torch.device("cpu"))
    buf = ReplayBuffer(64, OBS, ACT)
    rng = np.random.default_rng(0)
    for _ in range(64):
        buf.add(
            rng.normal(size=OBS),
            rng.uniform(low, high),
            rng.normal(),
            rng.normal(size=OBS),
            bool(rng.random() < 0.1),
            False,
        )
    return agent, buf


@pytest.mark.parametrize("preset", ["paper", "td3"])
def test_soft_update_follows_online_by_tau(preset: str) -> None:
    agent, buf = _agent(preset)
    tau = agent.cfg.tau
    for step in range(1, 5):
        before = {"a": params(agent.actor_target), "c": params(agent.critic_target)}
        agent.update(buf.sample(8))
        after = {"a": params(agent.actor_target), "c": params(agent.critic_target)}
        online = {"a": params(agent.actor), "c": params(agent.critic)}
        moved = step % agent.cfg.policy_delay == 0
        for net in ("a", "c"):
            for k in before[net]:
                expected = (
                    before[net][k] + tau * (online[net][k] - before[net][k])
                    if moved
                    else before[net][k]
                )
                torch.testing.assert_close(after[net][k], expected, rtol=1e-6, atol=1e-7)
    assert agent.updates == 4


def test_td3_actor_updates_only_every_policy_delay() -> None:
    agent, buf = _agent("td3", policy_delay=3)
    actor0 = params(agent.actor)
    critic0 = params(agent.critic)
    agent.update(buf.sample(8))
    agent.update(buf.sample(8))
    assert all(torch.equal(actor0[k], v) for k, v in params(agent.actor).items())
    assert any(not torch.equal(critic0[k], v) for k, v in params(agent.critic).items())
    agent.update(buf.sample(8))
    assert any(not torch.equal(actor0[k], v) for k, v in params(agent.actor).items())


def test_update_returns_finite_scalar_tensors() -> None:
    agent, buf = _agent("paper")
    metrics = agent.update(buf.sample(8))
    assert set(metrics) >= {"critic_loss", "actor_loss", "q"}
    for v in metrics.values():
        assert isinstance(v, torch.Tensor) and v.ndim == 0 and torch.isfinite(v)


def test_actor_acts_in_env_units_within_bounds() -> None:
    agent, _ = _agent("td3")
    with torch.no_grad():
        agent.actor.head.bias.fill_(100.0)  # saturate tanh: actions sit on the upper bound
    a = agent.act(np.zeros(OBS, dtype=np.float32))
    np.testing.assert_allclose(a, [2.0, 1.0], atol=1e-5)
    with torch.no_grad():
        agent.actor.head.bias.fill_(-100.0)
    np.testing.assert_allclose(agent.act(np.zeros(OBS, dtype=np.float32)), [-2.0, 0.0], atol=1e-5)


def test_critic_target_uses_min_of_twins_and_stops_at_terminal() -> None:
    agent, _ = _agent("td3", policy_noise=0.0, gamma=0.5)
    obs = torch.zeros(4, OBS)
    batch_next = torch.ones(4, OBS)
    with torch.no_grad():
        q_next = agent.critic_target(batch_next, agent.actor_target.normalized(batch_next))
    assert q_next.shape == (2, 4)
    from training.replay import Batch

    reward = torch.tensor([1.0, 1.0, 1.0, 1.0])
    terminated = torch.tensor([0.0, 1.0, 0.0, 1.0])
    action = torch.zeros(4, ACT) + torch.tensor([0.0, 0.5])
    batch = Batch(obs, action, reward, batch_next, terminated)
    loss, _ = agent._critic_loss(batch)
    with torch.no_grad():
        q = agent.critic(obs, (action - agent.actor.action_bias) / agent.actor.action_scale)
        target = reward + 0.5 * (1 - terminated) * q_next.min(0).values
        expected = (q - target).pow(2).mean(1).sum()
    torch.testing.assert_close(loss, expected)


def test_presets_match_the_papers() -> None:
    paper = make_config("paper")
    assert paper.actor_hidden == paper.critic_hidden == (400, 300)
    assert (paper.actor_lr, paper.critic_lr, paper.critic_l2) == (1e-4, 1e-3, 1e-2)
    assert (paper.tau, paper.batch_size, paper.gamma) == (1e-3, 64, 0.99)
    assert (paper.noise, paper.noise_sigma, paper.noise_theta) == ("ou", 0.2, 0.15)
    assert paper.batch_norm and paper.final_init == 3e-3 and paper.critic_action_layer == 1
    assert not paper.twin_q and paper.policy_noise == 0 and paper.policy_delay == 1
    td3 = make_config("td3")  # the TD3 paper's setting, the code behind its published curves
    assert td3.actor_hidden == td3.critic_hidden == (400, 300)
    assert (td3.actor_lr, td3.critic_lr, td3.batch_size, td3.tau) == (1e-3, 1e-3, 100, 5e-3)
    assert td3.learning_starts == 10_000 == make_config("td3", env="Ant-v5").learning_starts
    assert make_config("td3", env="Hopper-v5").learning_starts == 1_000
    assert paper.learning_starts == 5_000
    assert (td3.noise, td3.noise_sigma) == ("gaussian", 0.1)
    assert td3.twin_q and (td3.policy_noise, td3.noise_clip, td3.policy_delay) == (0.2, 0.5, 2)
    assert set(PRESETS) == {"paper", "td3", "drq", "crossq"}  # drq: pixels only
    # the classic presets keep Adam's default beta1 and plain MLPs (tests/test_modern_preset.py)
    assert paper.adam_beta1 == td3.adam_beta1 == 0.9
    assert not any((td3.simba, td3.crossq, td3.distributional, td3.reset_every, td3.n_step - 1))


def test_paper_initialisation_bounds_final_layers() -> None:
    agent, _ = _agent("paper")
    assert agent.actor.head.weight.abs().max() <= 3e-3
    assert agent.critic.head.weight.abs().max() <= 3e-3
    assert isinstance(agent.actor.obs_norm, torch.nn.BatchNorm1d)


def test_config_rejects_bad_values_by_name(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        make_config("fast")
    with pytest.raises(ConfigError, match="steps = -1 must be positive"):
        make_config("td3", steps=-1)
    with pytest.raises(ConfigError, match="unknown config key"):
        make_config("td3", stepz=10)
    with pytest.raises(ConfigError, match="tau"):
        make_config("td3", tau=0.0)
    with pytest.raises(ConfigError, match="batch_size = 'big'"):
        make_config("td3", batch_size="big")
    bad = tmp_path / "c.yaml"
    bad.write_text("preset: paper\nlearnig_starts: 10\n")
    with pytest.raises(ConfigError, match="learnig_starts"):
        load_config(bad)


def test_overrides_win_over_the_preset() -> None:
    cfg = make_config("paper", batch_size=128, actor_hidden="64,64")
    assert cfg.batch_size == 128 and cfg.actor_hidden == (64, 64)
    assert cfg.tau == 1e-3  # the rest still from the preset
    assert TrainConfig().preset == "td3"
    assert copy.deepcopy(cfg) == cfg


@pytest.mark.parametrize("preset", ["paper", "td3"])
@pytest.mark.parametrize("fast_update", [True, False])
def test_obs_norm_updates_on_standardised_batches(preset: str, fast_update: bool) -> None:
    """An --obs-norm agent given raw replay batches learns exactly what the same agent without
    it learns from those batches standardised with its statistics, and acts on raw
    observations as that one does on standardised ones."""
    normed, buf = _agent(preset, obs_norm=True, fast_update=fast_update)
    plain, _ = _agent(preset, fast_update=fast_update)  # the same seed: the same networks
    assert normed.normalizer is not None
    rng = np.random.default_rng(1)
    normed.normalizer.update(rng.normal(size=(500, OBS)) * [1, 10, 0.1, 3, 1] + [0, 5, -2, 0, 9])
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(4):
        raw = buf.sample(8, gen_a)
        assert torch.equal(raw.obs, buf.sample(8, gen_b).obs)
        torch.manual_seed(5)  # target policy smoothing draws the same noise in both
        normed.update(raw)
        torch.manual_seed(5)
        plain.update(normed.normalizer.batch(raw))
    for net in ("actor", "critic", "actor_target", "critic_target"):
        a, b = params(getattr(normed, net)), params(getattr(plain, net))
        assert all(torch.equal(a[k], b[k]) for k in a), net
    obs = rng.normal(size=(3, OBS)).astype(np.float32) * 5
    assert np.array_equal(normed.act(obs), plain.act(normed.normalizer.numpy(obs)))
    # a batch of observations acts row by row
    np.testing.assert_allclose(normed.act(obs)[1], normed.act(obs[1]), rtol=0, atol=1e-6)
    state = normed.state_dict()
    assert int(state["obs_norm"]["count"]) == 500 and "obs_norm" not in plain.state_dict()


@pytest.mark.parametrize(
    "switches",
    [{"distributional": True, "v_min": -10.0, "v_max": 10.0}, {"simba": True},
     {"crossq": True}],
    ids=["td3+c51", "td3+simba", "td3+crossq"],
)  # fmt: skip
def test_each_modern_switch_updates_on_the_td3_preset(switches: dict[str, object]) -> None:
    """A switch of the modern preset works alone on td3: the update runs, its loss is finite,
    the critic moves every step and the actor every policy_delay steps."""
    agent, buf = _agent("td3", **switches)
    actor0, critic0 = params(agent.actor), params(agent.critic)
    metrics = agent.update(buf.sample(8))
    assert torch.isfinite(metrics["critic_loss"])
    assert any(not torch.equal(critic0[k], v) for k, v in params(agent.critic).items())
    assert all(torch.equal(actor0[k], v) for k, v in params(agent.actor).items())
    agent.update(buf.sample(8))
    assert any(not torch.equal(actor0[k], v) for k, v in params(agent.actor).items())
    assert (agent.critic_target is None) == bool(switches.get("crossq"))
