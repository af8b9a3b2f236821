"""The trainer's configuration: one typed dataclass, its presets, and checks with clear messages.

Every field has a docstring; :func:`field_docs` reads them from the source so ``ddpg train --help``
and the docs say the same thing as the code. A preset fills the fields the user did not set.
A bad value raises :class:`control_node.config.ConfigError`, the stack's one configuration
error, so code that catches it catches launch-file and trainer-config mistakes alike.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from control_node.config import ConfigError, brief, read_yaml
from control_node.config import field_docs as class_field_docs
from models.spec import SUGGESTED_VIEWS, PixelSpec

AUTO_VIEW, ENV_VIEW = "auto", "env"
"""``view`` values that are not a pose: the suggested view for the environment, or its own."""


@dataclass
class TrainConfig:
    """DDPG trainer settings. Defaults shown here are the ``td3`` preset's."""

    env: str = "HalfCheetah-v5"
    """Gymnasium environment id; it must have Box observation and action spaces."""
    preset: str = "td3"
    """Starting point for every knob below: 'paper' (Lillicrap et al. 2015), 'td3' (Fujimoto et
    al. 2018), 'crossq' (TD3's learner with CrossQ's target-free batch-normalised critic and
    observation normalisation; state only) or 'drq' (pixels only)."""
    steps: int = 1_000_000
    """Environment steps to train for (in total, counting steps before a resume)."""
    seed: int = 0
    """Seed for networks, replay sampling, noise and environments; equal seeds give equal runs on the CPU."""
    out: str = ""
    """Run directory; empty means runs/ENV-PRESET-sSEED."""
    device: str = "auto"
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    learning_starts: int = -1
    """Steps of uniformly random actions before the first update; -1 takes the TD3 paper's
    choice for the env: 10,000 for HalfCheetah and Ant, 1,000 for the others."""
    eval_every: int = 5_000
    """Evaluate the deterministic policy every N steps; 0 turns periodic evaluation off."""
    eval_episodes: int = 10
    """Episodes per evaluation, on a separate environment with fixed seeds; 0 skips the final evaluation too."""
    stop_at_return: float = float("inf")
    """Stop early once a periodic evaluation's mean return reaches this (SB3's
    StopTrainingOnRewardThreshold); the run then ends as at its last step: final checkpoint,
    eval.json (its steps say where it stopped) and export. inf trains every step."""
    checkpoint_every: int = 50_000
    """Write a checkpoint every N steps (and always at the end); 0 means only at the end."""
    save_replay: bool = False
    """Put the replay buffer in the checkpoint, so a resumed run continues with the same data."""
    export: bool = True
    """Export the actor to RUN_DIR/actor.onnx at the end (parity-checked against the torch actor)."""
    log_every: int = 1_000
    """Write training metrics (losses, Q, steps/s) every N steps."""

    actor_hidden: tuple[int, ...] = (400, 300)
    """Actor hidden layer widths, comma-separated on the command line."""
    critic_hidden: tuple[int, ...] = (400, 300)
    """Critic hidden layer widths, comma-separated on the command line."""
    critic_action_layer: int = 0
    """Hidden layer the action joins in the critic: 0 at the input, 1 after the first layer (paper)."""
    batch_norm: bool = False
    """Batch normalisation on the state input of actor and critic (paper)."""
    final_init: float = 0.0
    """Final layers drawn from U(-x, x); 0 keeps PyTorch's default initialisation."""
    actor_lr: float = 1e-3
    """Actor Adam learning rate."""
    critic_lr: float = 1e-3
    """Critic Adam learning rate."""
    critic_l2: float = 0.0
    """L2 weight decay on the critic (paper: 1e-2)."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Soft target update rate: target <- (1 - tau) target + tau online."""
    batch_size: int = 100
    """Minibatch size per update."""
    buffer_size: int = 1_000_000
    """Replay capacity in transitions (capped at --steps); it lives on the training device."""
    updates_per_step: int = 1
    """Gradient updates per environment step once learning has started (per step of each of
    the num_envs environments)."""

    noise: str = "gaussian"
    """Exploration noise: 'gaussian' or 'ou' (Ornstein-Uhlenbeck)."""
    noise_sigma: float = 0.1
    """Exploration noise scale, as a fraction of the action half-range."""
    noise_theta: float = 0.15
    """OU mean reversion rate (used when --noise ou)."""
    twin_q: bool = True
    """Clipped double Q: two critics, target uses their minimum."""
    policy_noise: float = 0.2
    """Target policy smoothing noise (fraction of action half-range); 0 turns it off."""
    noise_clip: float = 0.5
    """Clip for the target policy smoothing noise."""
    policy_delay: int = 2
    """Update actor and targets every N critic updates."""

    pixels: bool = False
    """Learn from rendered frames instead of the state (sim_bridge.pixels: off-screen MuJoCo,
    uint8, action repeat, frame stacking); the pixel presets then apply (paper: batch 16,
    200-200, final layers U(-3e-4, 3e-4)). Steps count agent steps, each action_repeat
    physics steps."""
    pixel_size: int = 64
    """Pixels only: square frame side (64 as in the paper, 84 as in DrQ-v2)."""
    frame_stack: int = 3
    """Pixels only: frames per observation (3 RGB frames: 9 channels)."""
    action_repeat: int = 3
    """Pixels only: physics steps per agent step, the action held."""
    camera: str = ""
    """Pixels only: MuJoCo camera name or id; empty keeps the environment's default view."""
    view: str = AUTO_VIEW
    """Pixels only: the free camera's pose, 'distance=D azimuth=A elevation=E lookat=X,Y,Z';
    'env' keeps the environment's default view; 'auto' (with no camera) takes the view
    models.spec.SUGGESTED_VIEWS gives the environment, else 'env'. A new run saves what it
    resolved to, so resuming it renders the same frames."""
    conv_strides: tuple[int, ...] = (2, 2, 2)
    """Pixels only: strides of the 3 convolutions (the paper gives none; DrQ-v2 uses 2,1,1,
    about 4x the compute and a 19 MB actor at 64x64)."""
    pixel_features: int = 0
    """Pixels only: project the flattened convolutions to N features with LayerNorm and tanh
    (DrQ-v2: 50); 0 feeds all of them to the dense layers (paper)."""
    shared_encoder: bool = False
    """Pixels only: one encoder for actor and critic, trained by the critic's loss alone; the
    actor learns on its features detached (DrQ-v2). False gives each its own encoder, trained
    by its own loss (the paper)."""
    augment_pad: int = 0
    """Pixels only: random shift augmentation (DrQ): pad by N pixels and crop back at a random
    offset, per sample, for obs and next_obs; 0 turns it off."""
    n_step: int = 1
    """N-step returns (DrQ-v2, FastTD3: 3): sum N discounted rewards before bootstrapping with
    gamma**N; a return stops at a termination (no bootstrap) and at a time limit (bootstrap from
    the episode's last observation), never crossing into the next episode. 1: one-step targets."""
    noise_decay_steps: int = 0
    """Decay the exploration noise scale linearly from noise_sigma to noise_sigma_final over
    this many steps (DrQ-v2's schedule); 0 keeps it constant."""
    noise_sigma_final: float = 0.1
    """Exploration noise scale at the end of the decay (with noise_decay_steps > 0)."""
    update_every: int = 1
    """Update once every N environment steps (updates_per_step updates each time; DrQ-v2: 2)."""
    obs_norm: bool = False
    """Normalise observations by the running mean and variance of those in the replay
    (training.obs_norm): actor and critic see standardised inputs, clipped at 10; the statistics
    are checkpointed and fixed into the exported graph, which takes raw observations. State
    runs only."""
    num_envs: int = 1
    """Environments stepped side by side (gymnasium vector env); each iteration puts N
    transitions into the one replay and makes N times the updates of one step, so
    updates_per_step / update_every stays the update-to-data ratio. Steps count environment
    steps over all of them. State runs only."""
    async_envs: bool = False
    """Step the num_envs environments in worker processes (AsyncVectorEnv) instead of one
    after another in this process; the same transitions either way."""

    simba: bool = False
    """Simba residual networks (Lee et al. 2024) for actor and critic: a linear embedding, one
    pre-LayerNorm residual block per hidden entry (LayerNorm, Linear to 4x width, ReLU, Linear
    back, added to the input), a final LayerNorm. The hidden widths must then be equal. Plain
    Simba, not SimbaV2's hyperspherical normalisation. State runs only."""
    crossq: bool = False
    """CrossQ (Bhatt et al. 2024): batch norm in the critic (on its input and in every hidden
    layer; in Simba blocks it takes LayerNorm's place) and no target networks: the (s, a) and
    (s', mu(s')) pairs go through the critic in one training-mode pass, so both halves share its
    batch statistics; the actor's objective uses the critic in eval mode. State runs only."""
    distributional: bool = False
    """FastTD3's categorical critic (C51, Bellemare et al. 2017): each critic member outputs
    num_atoms logits over [v_min, v_max]; the target is the n-step target distribution projected
    onto the support, from the member with the smaller expected value (clipped double Q); the
    loss is cross-entropy; the actor maximises the smaller expected value. State runs only."""
    num_atoms: int = 101
    """Distributional critic: atoms of the support (FastTD3: 101)."""
    v_min: float = -500.0
    """Distributional critic: smallest value of the support; returns below are clipped to it."""
    v_max: float = 1500.0
    """Distributional critic: largest value of the support; set the two to bracket the task's
    discounted returns (MuJoCo locomotion at gamma 0.99: up to about 1,200 on HalfCheetah,
    500 on Walker2d, 350 on Hopper; Pendulum: -1,600 to 0)."""
    reset_every: int = 0
    """Re-initialise actor, critic, targets and both optimisers every N updates, keeping the
    replay and the observation statistics (Nikishin et al. 2022; BRO, Nauman et al. 2024: resets
    let a high updates_per_step pay off); 0: never."""
    adam_beta1: float = 0.9
    """Adam's beta1 for both optimisers (CrossQ: 0.5)."""

    fast_update: bool = True
    """State networks: hand-written backward passes (the same math as autograd, with half the
    ops; the update's speed on a CPU). Off: autograd, the reference. Pixel networks, --compile
    and the simba, crossq and distributional networks always use autograd."""
    compile: bool = False
    """torch.compile the update; compiling costs 20-70 s and measured no faster on a 2-core CPU, so off by default."""
    threads: int = 0
    """Torch intra-op threads; 0 (auto): the CPUs free of other work, at most 4, fewer if other
    processes take CPUs later (a thread without a CPU of its own made updates 10x slower), or
    OMP_NUM_THREADS where set (training/threads.py). Same-seed runs match bit for bit only with
    the same count: fix it where they must."""

    def __post_init__(self) -> None:
        if self.learning_starts == -1:
            self.learning_starts = paper_learning_starts(self.env)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value."""
        if self.preset not in PRESETS:
            raise ConfigError(
                f"unknown preset {brief(self.preset)}; choose one of {sorted(PRESETS)}"
            )
        checks: list[tuple[str, bool, str]] = [
            ("steps", self.steps > 0, "must be positive"),
            ("learning_starts", self.learning_starts >= 0, "must be >= 0"),
            ("eval_every", self.eval_every >= 0, "must be >= 0"),
            ("eval_episodes", self.eval_episodes >= 0, "must be >= 0"),
            (
                "stop_at_return",
                self.stop_at_return == float("inf") or (self.eval_every and self.eval_episodes),
                "needs periodic evaluations (eval_every and eval_episodes > 0)",
            ),
            ("stop_at_return", not math.isnan(self.stop_at_return), "must be a number"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
            ("log_every", self.log_every > 0, "must be positive"),
            (
                "actor_hidden",
                len(self.actor_hidden) > 0 and min(self.actor_hidden) > 0,
                "needs at least one positive width",
            ),
            (
                "critic_hidden",
                len(self.critic_hidden) > 0 and min(self.critic_hidden) > 0,
                "needs at least one positive width",
            ),
            (
                "critic_action_layer",
                0 <= self.critic_action_layer < len(self.critic_hidden),
                f"must be in [0, {len(self.critic_hidden) - 1}]",
            ),
            ("final_init", self.final_init >= 0, "must be >= 0"),
            ("actor_lr", self.actor_lr > 0, "must be positive"),
            ("critic_lr", self.critic_lr > 0, "must be positive"),
            ("critic_l2", self.critic_l2 >= 0, "must be >= 0"),
            ("gamma", 0 <= self.gamma <= 1, "must be in [0, 1]"),
            ("tau", 0 < self.tau <= 1, "must be in (0, 1]"),
            ("batch_size", self.batch_size > 0, "must be positive"),
            ("buffer_size", self.buffer_size >= self.batch_size, "must be at least batch_size"),
            ("updates_per_step", self.updates_per_step > 0, "must be positive"),
            ("noise", self.noise in ("gaussian", "ou"), "must be 'gaussian' or 'ou'"),
            ("noise_sigma", self.noise_sigma >= 0, "must be >= 0"),
            ("noise_theta", 0 < self.noise_theta <= 1, "must be in (0, 1]"),
            ("policy_noise", self.policy_noise >= 0, "must be >= 0"),
            ("noise_clip", self.noise_clip >= 0, "must be >= 0"),
            ("policy_delay", self.policy_delay > 0, "must be positive"),
            ("threads", self.threads >= 0, "must be >= 0"),
            ("pixel_size", 16 <= self.pixel_size <= 256, "must be in 16..256"),
            ("frame_stack", 1 <= self.frame_stack <= 16, "must be in 1..16"),
            ("action_repeat", 1 <= self.action_repeat <= 16, "must be in 1..16"),
            (
                "conv_strides",
                len(self.conv_strides) == 3 and min(self.conv_strides) >= 1,
                "needs 3 positive strides",
            ),
            ("augment_pad", 0 <= self.augment_pad < self.pixel_size // 2, "must be in [0, size/2)"),
            ("augment_pad", self.pixels or self.augment_pad == 0, "needs --pixels"),
            ("pixel_features", self.pixel_features >= 0, "must be >= 0"),
            ("shared_encoder", self.pixels or not self.shared_encoder, "needs --pixels"),
            ("view", self.pixels or self.view == AUTO_VIEW, "needs --pixels"),
            ("n_step", 1 <= self.n_step <= 100, "must be in 1..100"),
            ("num_atoms", 2 <= self.num_atoms <= 1001, "must be in 2..1001"),
            ("v_max", self.v_max > self.v_min, f"must be above v_min = {self.v_min:g}"),
            ("reset_every", self.reset_every >= 0, "must be >= 0"),
            ("adam_beta1", 0 <= self.adam_beta1 < 1, "must be in [0, 1)"),
            ("noise_decay_steps", self.noise_decay_steps >= 0, "must be >= 0"),
            ("noise_sigma_final", self.noise_sigma_final >= 0, "must be >= 0"),
            ("update_every", self.update_every > 0, "must be positive"),
            (
                "obs_norm",
                not (self.obs_norm and self.pixels),
                "is for state observations; frames are scaled to [0, 1] in the encoder "
                "(drop --obs-norm or --pixels)",
            ),
            ("num_envs", 1 <= self.num_envs <= 4096, "must be in 1..4096"),
            (
                "num_envs",
                self.num_envs == 1 or not self.pixels,
                "must be 1 with --pixels: the frame replay stores one episode stream",
            ),
            (
                "device",
                self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                "must be 'auto', 'cpu' or 'cuda[:N]'",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"{name} = {brief(getattr(self, name))} {why}")
        if self.preset in PIXEL_ONLY_PRESETS and not self.pixels:
            raise ConfigError(f"preset {self.preset!r} learns from pixels; add --pixels")
        self.pixel_spec()  # a bad camera or view is named here, before anything is written
        self._validate_blocks()

    def _validate_blocks(self) -> None:
        """The simba, crossq and distributional switches: state networks of their own."""
        for name in ("simba", "crossq", "distributional"):
            if getattr(self, name) and self.pixels:
                raise ConfigError(f"{name} = True is for state runs; drop it or --pixels")
        if not self.block_networks():
            return
        if self.batch_norm:
            raise ConfigError(
                "batch_norm = True is the paper's input batch norm of the plain networks; with "
                "simba, crossq or distributional use --crossq for a batch-normalised critic"
            )
        if self.critic_action_layer != 0:
            raise ConfigError(
                "critic_action_layer must be 0 with simba, crossq or distributional: the "
                "action joins the state at the critic's input"
            )
        if self.simba:
            for name in ("actor_hidden", "critic_hidden"):
                widths = getattr(self, name)
                if len(set(widths)) != 1:
                    raise ConfigError(
                        f"{name} = {brief(widths)}: Simba's residual blocks need equal widths "
                        "(one entry per block)"
                    )

    def block_networks(self) -> bool:
        """Whether the critic is :class:`models.networks.BlockCritic` (simba, crossq or
        distributional), trained by autograd."""
        return self.simba or self.crossq or self.distributional

    def pixel_spec(self) -> PixelSpec | None:
        """The observation pipeline's spec for a pixel run; None for a state run."""
        if not self.pixels:
            return None
        camera: str | int | None = self.camera or None
        if isinstance(camera, str) and camera.lstrip("-").isdigit():
            camera = int(camera)
        view = None if self.view == ENV_VIEW else self.view
        if view == AUTO_VIEW:
            suggested = None if camera is not None else SUGGESTED_VIEWS.get(self.env)
            view = None if suggested is None else str(suggested)
        try:
            return PixelSpec(self.pixel_size, self.frame_stack, self.action_repeat, camera, view)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.env}-{self.preset}-s{self.seed}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# The presets: each lists only what differs from the dataclass defaults (the td3 preset).
def paper_learning_starts(env_id: str) -> int:
    """The TD3 paper's random steps before learning (its run_experiments.sh): 10,000 for
    HalfCheetah and Ant, 1,000 for the other MuJoCo tasks."""
    return 10_000 if env_id.split("-")[0] in ("HalfCheetah", "Ant") else 1_000


PRESETS: dict[str, dict[str, Any]] = {
    "td3": {},
    "paper": {
        "actor_hidden": (400, 300),
        "critic_hidden": (400, 300),
        "critic_action_layer": 1,
        "batch_norm": True,
        "final_init": 3e-3,
        "actor_lr": 1e-4,
        "critic_lr": 1e-3,
        "critic_l2": 1e-2,
        "tau": 1e-3,
        "batch_size": 64,
        "noise": "ou",
        "noise_sigma": 0.2,
        "twin_q": False,
        "policy_noise": 0.0,
        "policy_delay": 1,
        "learning_starts": 5_000,
    },
}


# With --pixels a preset also takes these values: the paper's pixel networks and batch, and
# pixel-only presets (DrQ-v2's additions on TD3's learner, sized for a CPU).
PIXEL_PRESETS: dict[str, dict[str, Any]] = {
    "td3": {  # the TD3 learner from pixels as it was measured (the paper has no pixel setting)
        "actor_hidden": (200, 200),
        "critic_hidden": (200, 200),
        "actor_lr": 3e-4,
        "critic_lr": 3e-4,
        "batch_size": 256,
        "learning_starts": 1_000,
    },
    "paper": {
        "actor_hidden": (200, 200),
        "critic_hidden": (200, 200),
        "batch_norm": False,  # no batch norm on frames; see README (pixels)
        "final_init": 3e-4,
        "batch_size": 16,
        "learning_starts": 1_000,
    },
    "drq": {
        "actor_hidden": (200, 200),
        "critic_hidden": (200, 200),
        "actor_lr": 1e-4,
        "critic_lr": 1e-4,
        "tau": 0.01,
        "batch_size": 32,
        "noise_clip": 0.3,
        "policy_delay": 1,
        "noise_sigma": 0.2,
        # DrQ-v2's final std. At 0.05, 6 of the last 9 evaluations (3 seeds) were at 900+;
        # at 0.1, 8 of 9 (README, pixels); at 0.02 it was worse still.
        "noise_sigma_final": 0.1,
        "noise_decay_steps": 10_000,
        "pixel_features": 50,
        "shared_encoder": True,
        # DrQ-v2's action repeat. At the paper's 3, one agent step on InvertedPendulum is 0.12
        # s, in which the pole's unstable mode grows 1.8x (1.5x at 2): the balance a policy
        # finds there is a knife edge, and 2 of 3 seeds lost it (README, pixels).
        "action_repeat": 2,
        "augment_pad": 4,
        "n_step": 3,
        "update_every": 2,
        "learning_starts": 1_000,
    },
}
PRESETS["drq"] = {}  # the td3 learner; its pixel values above
PIXEL_ONLY_PRESETS = frozenset({"drq"})

# A modern deterministic actor-critic, still DDPG (a deterministic actor trained by the
# deterministic policy gradient): TD3's learner with CrossQ's critic (batch norm in the critic,
# no target networks, Adam beta1 0.5, policy delay 3, learning rate 1e-3, batch 256) and
# running observation normalisation, on TD3's 256-256 networks. The other published parts are
# switches the ablation measured (README, `python benchmarks/ablation.py`): Simba's residual
# LayerNorm networks (--simba), the categorical critic (--distributional), n-step returns
# (--n-step 3), a higher update-to-data ratio with resets (--updates-per-step, --reset-every).
PRESETS["crossq"] = {
    "crossq": True,
    "obs_norm": True,
    "actor_hidden": (256, 256),
    "critic_hidden": (256, 256),
    "actor_lr": 1e-3,
    "critic_lr": 1e-3,
    "adam_beta1": 0.5,
    "batch_size": 256,
    "policy_delay": 3,
}
STATE_ONLY_PRESETS = frozenset({"crossq"})
DEFAULT_PRESET, DEFAULT_PIXEL_PRESET = "td3", "drq"


def make_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """A validated config: the preset's values, then ``overrides`` (None means 'not given').

    No preset means td3 from the state and drq from pixels."""
    pixels = bool(_coerce("pixels", overrides["pixels"])) if overrides.get("pixels") else False
    if preset is None:
        preset = DEFAULT_PIXEL_PRESET if pixels else DEFAULT_PRESET
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {brief(preset)}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        shown = [k if len(k) <= 40 else brief(k) for k in unknown[:5]]
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ConfigError(f"unknown config key(s): {', '.join(shown)}{more}")
    if pixels and preset in STATE_ONLY_PRESETS:
        raise ConfigError(f"preset {preset!r} learns from the state; drop --pixels")
    values: dict[str, Any] = {**PRESETS[preset], "preset": preset}
    if pixels:
        values.update(PIXEL_PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    cfg.validate()
    if cfg.pixels:  # saved resolved and canonical: a later table of views cannot move it
        spec = cfg.pixel_spec()
        cfg.view = ENV_VIEW if spec is None or spec.view is None else spec.view
    return cfg


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or say which field is wrong."""
    kind = _field_types()[name]
    try:
        if kind == "tuple[int, ...]":
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return tuple(int(v) for v in value)
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "str":
            if not isinstance(value, str):
                raise TypeError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{name} = {brief(value)} is not a valid {kind}") from None
    raise AssertionError(f"unhandled field type {kind} for {name}")


@functools.cache
def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(TrainConfig)}


def field_docs() -> dict[str, str]:
    """Each TrainConfig field's docstring (the string literal right after it)."""
    return class_field_docs(TrainConfig)


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config(path: Path) -> TrainConfig:
    """Load a saved or hand-written config YAML (bounded as every config file is: see
    ``read_yaml``); unknown keys, keys that are not names and bad values are refused. A pixel
    config without ``view`` renders the environment's own view, as every run saved before
    views did (write ``view: auto`` for the suggested one)."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {brief(key)} is {type(key).__name__}, not a name")
    data = dict(data)
    if data.get("pixels") and "view" not in data:
        data["view"] = ENV_VIEW  # a config saved before views: its frames had the env's view
    preset = data.pop("preset", None)
    try:
        return make_config(preset, **data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
