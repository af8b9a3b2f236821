"""The pixel observation pipeline on real MuJoCo off-screen rendering (EGL): shapes, stacking
across resets, action repeat against a hand-stepped env, determinism, and clear errors."""

from __future__ import annotations

import functools
import itertools
import json
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from models.spec import SUGGESTED_VIEWS, FreeView, PixelSpec
from sim_bridge.envs import EnvError, make_env
from sim_bridge.pixels import PixelObservation, make_pixel_env, render_rate

PENDULUM = "InvertedPendulum-v5"
SIDE = str(SUGGESTED_VIEWS[PENDULUM])
MakePix = Callable[..., PixelObservation]


@pytest.fixture
def make_pix() -> Iterator[MakePix]:
    """``make_pixel_env`` whose environments are closed after the test (each holds a GL context)."""
    envs: list[gym.Env] = []

    def make(env_id: str = PENDULUM, spec: PixelSpec | None = None, **kw: Any) -> PixelObservation:
        env = make_pixel_env(env_id, spec or PixelSpec(), **kw)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


def act(env: gym.Env, value: float) -> np.ndarray:
    return np.full(env.action_space.shape, value, env.action_space.dtype)


def balance(env: gym.Env, state: np.ndarray) -> np.ndarray:
    """A PD push that keeps InvertedPendulum up for 20+ steps while the cart moves visibly."""
    return act(env, float(np.clip(10 * state[1] + state[3], -3, 3)))


def expected_stack(frames: list[np.ndarray], stack: int = 3) -> np.ndarray:
    """The last ``stack`` frames, oldest first, the first frame repeated at an episode start."""
    k = len(frames) - 1
    return np.concatenate([frames[max(0, k - stack + 1 + i)] for i in range(stack)], axis=0)


# --- spec -----------------------------------------------------------------------------------


def test_spec_defaults_shape_and_round_trip() -> None:
    spec = PixelSpec()
    assert (spec.size, spec.stack, spec.repeat, spec.camera) == (64, 3, 3, None)
    assert spec.obs_shape == (9, 64, 64) and spec.frame_shape == (3, 64, 64)
    assert spec.dtype == np.uint8
    for s in (spec, PixelSpec(size=84, stack=4, repeat=2, camera="track"), PixelSpec(camera=0)):
        d = json.loads(json.dumps(s.to_dict()))  # plain JSON types, as ONNX metadata stores it
        assert PixelSpec.from_dict(d) == s
    with pytest.raises(ValueError, match="unknown key"):
        PixelSpec.from_dict({"size": 64, "stacks": 3})


def test_a_view_is_one_canonical_string_and_absent_when_unset() -> None:
    """Specs compare as dicts in hellos, metadata and log schemas: the same pose written two
    ways is one string, and a spec without a view is the dict it was before views."""
    loose = PixelSpec(view="lookat=0,0.0,.3  elevation=0.0 distance=2.60 azimuth=90")
    assert loose.view == SIDE == "distance=2.6 azimuth=90 elevation=0 lookat=0,0,0.3"
    assert loose.free_view == FreeView(2.6, 90.0, 0.0, (0.0, 0.0, 0.3))
    assert PixelSpec.from_dict(json.loads(json.dumps(loose.to_dict()))) == loose
    assert PixelSpec(camera=-1, view=SIDE).free_view is not None  # -1: the free camera
    assert PixelSpec().to_dict() == {"size": 64, "stack": 3, "repeat": 3, "camera": None}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"size": 0}, "size"),
        ({"size": 15}, "size"),
        ({"size": 257}, "size"),
        ({"size": 64.0}, "size"),
        ({"size": True}, "size"),
        ({"stack": 0}, "stack"),
        ({"repeat": 0}, "repeat"),
        ({"camera": -2}, "camera"),
        ({"camera": ""}, "camera"),
        ({"camera": 1.5}, "camera"),
        ({"view": "distance=2.6 azimuth=90 elevation=0"}, "view .* lacks lookat"),
        ({"view": "distance=0 azimuth=90 elevation=0 lookat=0,0,0"}, "view .* distance"),
        ({"view": "distance=2 azimuth=90 elevation=95 lookat=0,0,0"}, "view .* elevation"),
        ({"view": "distance=2 azimuth=90 elevation=0 lookat=0,0"}, "view .* lookat needs 3"),
        ({"view": "distance=inf azimuth=90 elevation=0 lookat=0,0,0"}, "view .* finite"),
        ({"view": "zoom=2"}, "view .* 'zoom=2' is not one of"),
        ({"view": 2.6}, "view must be a string"),
        ({"camera": "track", "view": SIDE}, "camera 'track' is a fixed camera"),
    ],
)
def test_bad_spec_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"pixel spec: {field}"):
        PixelSpec(**kwargs)


# --- errors ---------------------------------------------------------------------------------


def test_unknown_env_id_is_a_clear_error() -> None:
    with pytest.raises(EnvError, match="NoSuchRobot-v0"):
        make_pixel_env("NoSuchRobot-v0")


def test_unknown_camera_and_clashing_kwargs_are_errors(make_pix: MakePix) -> None:
    make_pix(spec=PixelSpec(camera=-1))  # the free camera always exists
    with pytest.raises(EnvError, match="no camera 'nope'"):
        make_pixel_env(PENDULUM, PixelSpec(camera="nope"))
    with pytest.raises(EnvError, match="no camera 5"):
        make_pixel_env(PENDULUM, PixelSpec(camera=5))
    with pytest.raises(EnvError, match="width"):
        make_pixel_env(PENDULUM, width=32)


def test_env_without_rgb_array_rendering_is_refused() -> None:
    env = make_env(PENDULUM)
    try:
        with pytest.raises(EnvError, match="render_mode"):
            PixelObservation(env, PixelSpec())
    finally:
        env.close()


# gymnasium's half-built viewer complains in __del__ about the context it never made
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_gl_backend_names_mujoco_gl(monkeypatch: pytest.MonkeyPatch, make_pix: MakePix) -> None:
    monkeypatch.setenv("MUJOCO_GL", "no-such-backend")
    env = make_pix()
    with pytest.raises(EnvError, match=r"MUJOCO_GL='no-such-backend'.*egl.*osmesa"):
        env.reset(seed=0)


# --- shapes and stacking --------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 84])
def test_shapes_dtypes_and_native_size(size: int, make_pix: MakePix) -> None:
    env = make_pix(spec=PixelSpec(size=size))
    space = env.observation_space
    assert space.shape == (9, size, size) and space.dtype == np.uint8
    obs, info = env.reset(seed=0)
    assert env.env.render().shape == (size, size, 3)  # MuJoCo renders the size itself
    assert obs.shape == (9, size, size) and obs.dtype == np.uint8 and space.contains(obs)
    assert info["frame"].shape == (3, size, size) and info["frame"].dtype == np.uint8
    assert info["state"].shape == env.state_space.shape == (4,)
    obs, reward, terminated, truncated, info = env.step(act(env, 0.0))
    assert space.contains(obs) and isinstance(reward, float)
    assert isinstance(terminated, bool) and isinstance(truncated, bool)
    assert info["repeats"] == 3 and info["state"].shape == (4,)
    assert np.array_equal(env.last_frame(), info["frame"])


def test_stack_holds_the_last_frames_in_order(make_pix: MakePix) -> None:
    env = make_pix()
    obs, info = env.reset(seed=0)
    frames = [info["frame"]]
    assert np.array_equal(obs, np.concatenate([frames[0]] * 3))  # reset: three first frames
    kept = [obs]
    for k in range(1, 7):
        obs, _, terminated, truncated, info = env.step(balance(env, info["state"]))
        assert not (terminated or truncated)
        frames.append(info["frame"])
        assert np.array_equal(env.last_frame(), frames[-1])
        assert np.array_equal(obs, expected_stack(frames)), f"step {k}"
        kept.append(obs)
    # every frame differs from the one before, so the order check above means something
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(frames))
    for k, obs in enumerate(kept):  # returned arrays are the caller's: later steps leave them
        assert np.array_equal(obs, expected_stack(frames[: k + 1])), f"kept obs {k} changed"


def test_reset_leaves_nothing_from_the_previous_episode(make_pix: MakePix) -> None:
    env = make_pix()
    env.reset(seed=0)
    old: list[np.ndarray] = []
    for _ in range(30):  # a full push drops the pole past 0.2 rad within a few steps
        _, _, terminated, truncated, info = env.step(act(env, 3.0))
        old.append(info["frame"])
        if terminated or truncated:
            break
    assert terminated
    with pytest.raises(gym.error.ResetNeeded):
        env.step(act(env, 0.0))  # a stack must not run on into the ended episode

    obs, info = env.reset(seed=1)
    first = info["frame"]
    slots = obs.reshape(3, 3, *obs.shape[1:])
    assert all(np.array_equal(s, first) for s in slots)
    for frame in old[-3:]:
        assert not np.array_equal(frame, first)  # the fallen pole looks different
        assert not any(np.array_equal(frame, s) for s in slots)
    obs, *_, info = env.step(act(env, 0.0))
    assert np.array_equal(obs, np.concatenate([first, first, info["frame"]]))


# --- action repeat --------------------------------------------------------------------------


def test_repeat_sums_varying_rewards_like_a_hand_stepped_env(make_pix: MakePix) -> None:
    """HalfCheetah's reward changes every physics step; 16x16 keeps its render cheap."""
    env = make_pix("HalfCheetah-v5", PixelSpec(size=16, repeat=3))
    ref = make_env("HalfCheetah-v5")
    try:
        env.reset(seed=3)
        ref.reset(seed=3)
        rng = np.random.default_rng(0)
        rewards = set()
        for _ in range(4):
            a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            _, reward, terminated, truncated, info = env.step(a)
            total = 0.0
            for _ in range(3):
                state, r, *_ = ref.step(a)
                total += float(r)
                rewards.add(float(r))
            assert reward == pytest.approx(total, rel=1e-12, abs=1e-12)
            assert np.array_equal(info["state"], state) and info["repeats"] == 3
            assert not (terminated or truncated)
        assert len(rewards) > 1
    finally:
        ref.close()


def test_repeat_stops_early_at_termination(make_pix: MakePix) -> None:
    ref = make_env(PENDULUM)
    try:
        ref.reset(seed=0)
        rewards: list[float] = []
        for _ in range(100):
            state, r, terminated, _, _ = ref.step(act(ref, 3.0))
            rewards.append(float(r))
            if terminated:
                break
    finally:
        ref.close()
    n = len(rewards)  # physics steps until the pole falls
    assert terminated and n > 1
    repeat = next(r for r in (2, 3, 4, 5) if n % r)  # so the episode ends inside a repeat

    env = make_pix(spec=PixelSpec(repeat=repeat))
    env.reset(seed=0)
    got: list[float] = []
    while True:
        _, reward, terminated, truncated, info = env.step(act(env, 3.0))
        got.append(float(reward))
        if terminated or truncated:
            break
    assert terminated and not truncated
    assert len(got) == -(-n // repeat) and info["repeats"] == n % repeat
    assert sum(got) == pytest.approx(sum(rewards))
    assert np.array_equal(info["state"], state)


def test_truncation_inside_a_repeat_is_reported(make_pix: MakePix) -> None:
    env = make_pix(max_episode_steps=5)
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(act(env, 0.0))
    assert (reward, terminated, truncated, info["repeats"]) == (3.0, False, False, 3)
    _, reward, terminated, truncated, info = env.step(act(env, 0.0))
    assert (reward, terminated, truncated, info["repeats"]) == (2.0, False, True, 2)


# --- determinism and rate -------------------------------------------------------------------


def test_same_seed_and_actions_give_identical_pixels(make_pix: MakePix) -> None:
    a, b = make_pix(), make_pix()
    obs_a, info = a.reset(seed=7)
    obs_b, _ = b.reset(seed=7)
    assert np.array_equal(obs_a, obs_b)
    for _ in range(6):
        u = balance(a, info["state"])
        obs_a, r_a, *_, info = a.step(u)
        obs_b, r_b, *_ = b.step(u)
        assert np.array_equal(obs_a, obs_b) and r_a == r_b


def test_render_rate_is_positive() -> None:
    assert render_rate(PENDULUM, PixelSpec(), frames=10) > 0
    assert render_rate(PENDULUM, PixelSpec(), frames=10, physics=False) > 0


def test_the_camera_does_not_depend_on_the_first_episode() -> None:
    """Gymnasium aims its free camera from whatever state the first render sees; the pipeline
    re-aims it from the model's reference pose, so equal states give equal pixels in envs that
    started on different episodes (training, evaluation and the bridge use other seeds)."""
    seen = make_pixel_env("InvertedPendulum-v5", PixelSpec(size=32))
    fresh = make_pixel_env("InvertedPendulum-v5", PixelSpec(size=32))
    try:
        seen.reset(seed=0)
        seen.step(np.array([3.0], np.float32))  # the pole tips: a different first view
        a, _ = seen.reset(seed=7)
        b, _ = fresh.reset(seed=7)
        np.testing.assert_array_equal(a, b)
    finally:
        seen.close()
        fresh.close()


def _pole_lean_px(frame: np.ndarray) -> float:
    """How far the pole's top row sits right of its bottom row in ``frame`` (3, H, W), in
    pixels: the cyan pole's pixels, column centres of its top and bottom quarters."""
    r, g, b = (frame[i].astype(int) for i in range(3))
    rows, cols = np.nonzero((g > r + 25) & (b > r + 25) & (g > 40))
    assert len(rows) > 10, "the pole is not in the frame"
    top, bottom = np.quantile(rows, [0.25, 0.75])
    return float(cols[rows <= top].mean() - cols[rows >= bottom].mean())


@pytest.mark.parametrize("x", [-0.6, 0.6])
def test_the_pendulum_view_shows_an_upright_pole_upright_anywhere_on_the_rail(
    x: float, make_pix: MakePix
) -> None:
    """Gymnasium's view looks down at 45 degrees, so off the middle of the rail an upright pole
    leans in the frame (about 17 degrees at |x| 0.6, past the 11.5 at which the episode
    ends); pixel actors trained there drifted and fell. The suggested view is level."""
    leans = {}
    for name, view in (("default", None), ("side", SIDE)):
        env = make_pix(PENDULUM, PixelSpec(size=64, stack=1, repeat=1, view=view))
        env.reset(seed=0)
        env.unwrapped.set_state(np.array([x, 0.0]), np.zeros(2))
        leans[name] = _pole_lean_px(env._render())
    assert abs(leans["side"]) <= 0.5, leans
    assert abs(leans["default"]) >= 2.0 and np.sign(leans["default"]) == np.sign(x), leans


def test_a_view_keeps_its_own_aim_whatever_the_first_episode(make_pix: MakePix) -> None:
    """The pipeline re-aims a default free camera from the reference pose; a view names its
    own ``lookat``, which stays: equal states give equal frames, and the view is the one
    asked for (the rail level with the frame, below the middle, where lookat z = 0.3 puts
    it)."""
    spec = PixelSpec(size=32, stack=1, repeat=1, view=SIDE)
    seen, fresh = make_pix(PENDULUM, spec), make_pix(PENDULUM, spec)
    seen.reset(seed=0)
    seen.step(act(seen, 3.0))
    a, _ = seen.reset(seed=7)
    b, _ = fresh.reset(seed=7)
    np.testing.assert_array_equal(a, b)
    cam = fresh.unwrapped.mujoco_renderer.viewer.cam
    assert (cam.distance, cam.elevation) == (2.6, 0.0)
    np.testing.assert_allclose(cam.lookat, [0.0, 0.0, 0.3])


def test_a_view_on_an_env_that_takes_no_camera_config_is_a_clear_error() -> None:
    with pytest.raises(EnvError, match=r"InvertedPendulum-v4.*default_camera_config"):
        make_pixel_env("InvertedPendulum-v4", PixelSpec(view=SIDE))


# --- a well-formed Gymnasium wrapper --------------------------------------------------------
def test_gymnasium_env_checker_passes_and_the_spec_rebuilds_the_pipeline(
    make_pix: MakePix,
) -> None:
    """``check_env`` (spaces, seeding, determinism, render modes, re-making from ``env.spec``)
    passes, and ``gym.make(env.spec)`` is the same pipeline: the same pixels for the same seed
    and actions. Needs the wrapper's recorded constructor arguments."""
    from gymnasium.utils.env_checker import check_env

    spec = PixelSpec(size=32, stack=2, repeat=2)
    env = make_pix(PENDULUM, spec, max_episode_steps=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its advice on wrapped envs and asymmetric actions
        check_env(env)
    assert env.metadata["render_modes"] == ["rgb_array"]
    again = gym.make(env.spec)
    try:
        assert isinstance(again, PixelObservation) and again.pixel_spec == spec
        a, b = env.reset(seed=7)[0], again.reset(seed=7)[0]
        assert np.array_equal(a, b)
        for value in (1.0, -1.0, 0.5):
            assert np.array_equal(env.step(act(env, value))[0], again.step(act(env, value))[0])
    finally:
        again.close()


def test_vector_env_of_pixel_pipelines_hands_back_each_final_frame(make_pix: MakePix) -> None:
    """Same-step autoreset (sim_bridge.envs.make_vector_env): where an episode ends, the
    observation is the new episode's first stack and the ended one's last frame is in
    ``final_info``, for each environment on its own."""
    from sim_bridge.envs import make_vector_env

    spec = PixelSpec(size=32, stack=2, repeat=1)
    envs = make_vector_env(
        functools.partial(make_pixel_env, PENDULUM, spec, max_episode_steps=3), 2
    )
    plain = make_pix(PENDULUM, spec, max_episode_steps=3)
    try:
        obs, info = envs.reset(seed=5)
        first, _ = plain.reset(seed=6)  # environment 1 is seeded 5 + 1
        assert np.array_equal(obs[1], first)
        for _ in range(3):
            obs, _, terminated, truncated, info = envs.step(np.zeros((2, 1), np.float32))
            last, _, _, plain_trunc, plain_info = plain.step(np.zeros(1, np.float32))
        assert list(truncated) == [True, True] and not terminated.any() and plain_trunc
        assert np.array_equal(info["final_obs"][1], last)
        assert np.array_equal(info["final_info"]["frame"][1], plain_info["frame"])
        assert np.array_equal(obs[1][:3], info["frame"][1])  # the reset frame fills the stack
    finally:
        envs.close()
