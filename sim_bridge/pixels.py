"""One pixel observation pipeline for the trainer and the bridge: render, repeat, stack.

A pixel observation is ``stack`` RGB frames rendered off-screen by MuJoCo, stacked along the
channel axis, channel-first, uint8 end to end: ``(3 * stack, size, size)``, 9 x 64 x 64 by
default (the paper's setting). One agent step applies the action ``repeat`` times and renders
only the last frame. The trainer and the bridge both build their environments here so that a
policy sees exactly the same pixels in training and in serving.

Single frames are channel-first too, ``(3, size, size)``: the replay buffer stores each frame
once and rebuilds a stacked observation by concatenating consecutive frames along axis 0.

The GL backend is chosen by ``MUJOCO_GL``; this module sets it to ``egl`` when it is unset, at
import, before anything loads MuJoCo's GL bindings: ``mujoco.egl``/``mujoco.osmesa`` pin
``PYOPENGL_PLATFORM`` when first imported and PyOpenGL keeps its platform for the life of the
process, and with ``MUJOCO_GL`` unset Gymnasium tries ``glfw`` first, which needs a display.
"""

from __future__ import annotations

import os


def _default_gl_backend() -> None:
    """Head-less machines (CI, GPU servers) render with EGL unless the user chose otherwise."""
    os.environ.setdefault("MUJOCO_GL", "egl")


_default_gl_backend()

import time  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from models.spec import PixelSpec  # noqa: E402
from sim_bridge.envs import EnvError, make_env  # noqa: E402

Frame = np.ndarray  # uint8, (3, size, size)


def camera_kwargs(camera: str | int | None) -> dict[str, Any]:
    """The ``gym.make`` keyword that selects ``camera`` in a Gymnasium MuJoCo env."""
    if camera is None:
        return {}
    if isinstance(camera, str):
        return {"camera_name": camera}
    return {"camera_id": int(camera)}


def make_pixel_env(
    env_id: str, spec: PixelSpec | None = None, **make_kwargs: Any
) -> PixelObservation:
    """Build ``env_id`` rendering off-screen at exactly ``size x size`` and wrap it.

    MuJoCo renders at the requested width/height natively (no resize); ``make_kwargs`` go to
    ``gym.make`` (e.g. ``max_episode_steps``). A spec's ``view`` becomes the free camera's
    ``default_camera_config`` (Gymnasium's v5 MuJoCo environments take it). Errors are
    ``EnvError`` naming the env.
    """
    spec = spec or PixelSpec()
    _default_gl_backend()
    owned = {"render_mode", "width", "height", "camera_id", "camera_name", "default_camera_config"}
    clash = sorted(owned & set(make_kwargs))
    if clash:
        raise EnvError(f"make_pixel_env sets {clash} from the pixel spec; do not pass them")
    view = spec.free_view
    kwargs = {
        "render_mode": "rgb_array",
        "width": spec.size,
        "height": spec.size,
        **camera_kwargs(spec.camera),
        **({} if view is None else {"default_camera_config": view.camera_config()}),
        **make_kwargs,
    }
    return PixelObservation(make_env(env_id, **kwargs), spec)


def make_env_for(env_id: str, pixels: Mapping[str, Any] | None) -> gym.Env:
    """The environment a policy runs in: ``env_id`` as it is for a state policy, through this
    pipeline with the spec ``pixels`` (an exported pixel actor's metadata) for a pixel one."""
    if pixels is None:
        return make_env(env_id)
    return make_pixel_env(env_id, PixelSpec.from_dict(pixels))


class PixelObservation(
    gym.Wrapper[np.ndarray, np.ndarray, Any, np.ndarray], gym.utils.RecordConstructorArgs
):
    """Pixel observations with action repeat and frame stacking, uint8 end to end.

    ``reset`` fills the whole stack with the first frame, so nothing from an earlier episode
    survives a reset; ``step`` drops the oldest frame. Frames live in a preallocated ring;
    every returned observation is a fresh array the caller may keep. ``info`` carries
    ``frame`` (the newest frame, fresh), ``state`` (the wrapped env's own observation, for
    debugging or a state critic) and, from ``step``, ``repeats`` (physics steps taken).

    Stepping after an episode ended, or before the first reset, raises ``ResetNeeded``: a
    stack must never straddle two episodes. The GL context is created at the first render
    (the first reset), so a missing GL backend is reported there as ``EnvError``.

    Its constructor arguments are recorded (``RecordConstructorArgs``), so ``env.spec`` names
    this wrapper and its spec and ``gym.make(env.spec)`` rebuilds the whole pipeline: what
    Gymnasium's ``check_env`` and vector environments expect of a wrapper.
    """

    def __init__(self, env: gym.Env, spec: PixelSpec | None = None) -> None:
        spec = spec or PixelSpec()
        gym.utils.RecordConstructorArgs.__init__(self, spec=spec)
        gym.Wrapper.__init__(self, env)
        self.pixel_spec = spec
        env_id = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
        self._env_id = env_id
        if env.render_mode != "rgb_array":
            raise EnvError(
                f"environment {env_id!r} has render_mode={env.render_mode!r}; pixel "
                "observations need render_mode='rgb_array' (use make_pixel_env)"
            )
        _check_camera(env_id, env, spec.camera)
        self.state_space = env.observation_space
        # It renders only rgb_array; a frame comes every `repeat` physics steps.
        fps = env.metadata.get("render_fps")
        self.metadata = {
            **env.metadata,
            "render_modes": ["rgb_array"],
            "render_fps": fps / spec.repeat if fps else fps,
        }
        self.observation_space = gym.spaces.Box(0, 255, spec.obs_shape, np.uint8)
        n = spec.stack
        self._ring = np.zeros((n, *spec.frame_shape), np.uint8)
        self._head = 0  # index of the newest frame
        # oldest-to-newest ring order for each head position, computed once
        self._orders = [np.array([(h + 1 + i) % n for i in range(n)]) for h in range(n)]
        self._resize: tuple[np.ndarray, np.ndarray] | None = None
        self._rendered = False
        self._needs_reset = True

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        state, info = self.env.reset(seed=seed, options=options)
        frame = self._render()
        self._ring[:] = frame  # every slot: the first frame of this episode
        self._head = 0
        self._needs_reset = False
        return self._obs(), {**info, "state": state, "frame": frame.copy()}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise gym.error.ResetNeeded(
                "step() before reset() or after the episode ended: call reset() first"
            )
        total = 0.0
        terminated = truncated = False
        state: Any = None
        info: dict[str, Any] = {}
        repeats = 0
        for _ in range(self.pixel_spec.repeat):
            state, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            repeats += 1
            if terminated or truncated:
                self._needs_reset = True
                break
        frame = self._render()
        self._head = (self._head + 1) % self.pixel_spec.stack
        self._ring[self._head] = frame
        extra = {"state": state, "frame": frame.copy(), "repeats": repeats}
        return self._obs(), total, bool(terminated), bool(truncated), {**info, **extra}

    def last_frame(self) -> Frame:
        """The newest frame, ``(3, size, size)`` uint8, a fresh copy."""
        return self._ring[self._head].copy()

    def _obs(self) -> np.ndarray:
        # fancy indexing copies: the caller gets an array the next step will not touch
        return self._ring[self._orders[self._head]].reshape(self.pixel_spec.obs_shape)

    def _render(self) -> Frame:
        """Render the current state as a channel-first ``(3, size, size)`` view."""
        if not self._rendered:
            try:
                rgb = self.env.render()
            except Exception as e:  # the first render creates the GL context
                raise EnvError(_gl_message(self._env_id, e)) from None
            if _fix_free_camera(self.env):
                rgb = self.env.render()
            self._resize = _resize_indices(self._env_id, rgb, self.pixel_spec.size)
            self._rendered = True
        else:
            _make_context_current(self.env)
            rgb = self.env.render()
        if self._resize is not None:
            rows, cols = self._resize
            rgb = rgb[rows[:, None], cols]  # nearest neighbour: cheap, stays uint8
        return np.asarray(rgb).transpose(2, 0, 1)


def _make_context_current(env: gym.Env) -> None:
    """Make ``env``'s own GL context current. Gymnasium's MuJoCo renderer does so only when it
    holds several viewers, so with several environments in one process (a vector env, a
    training and an evaluation env) another one's context may be current, or already freed
    (``check_env`` makes and closes environments): the frame would then come out black."""
    viewer = getattr(getattr(env.unwrapped, "mujoco_renderer", None), "viewer", None)
    if viewer is not None:
        viewer.make_context_current()


def _fix_free_camera(env: gym.Env) -> bool:
    """Aim Gymnasium's free camera where it would look from the model's reference pose.

    Gymnasium points the free camera at the median of the bodies' positions in the state the
    first render happens to see, so two environments whose first episodes differ (training,
    evaluation and the bridge use other seeds) would film from slightly different places: a
    policy must see the same pixels for the same state. A camera config that names its own
    ``lookat`` (a spec's view) is left as it is. Returns whether it re-aimed.
    """
    import mujoco

    unwrapped = env.unwrapped
    renderer = getattr(unwrapped, "mujoco_renderer", None)
    viewer = getattr(renderer, "viewer", None)
    cam = getattr(viewer, "cam", None)
    if cam is None or cam.type != mujoco.mjtCamera.mjCAMERA_FREE:
        return False
    if "lookat" in (getattr(renderer, "default_cam_config", None) or {}):
        return False
    model = unwrapped.model
    data = mujoco.MjData(model)  # qpos0: the same pose whatever the episode
    mujoco.mj_forward(model, data)
    cam.lookat[:] = np.median(data.geom_xpos, axis=0)
    return True


def _gl_message(env_id: str, e: BaseException) -> str:
    backend = os.environ.get("MUJOCO_GL")
    cause = " ".join(str(e).split())  # one line, whatever the GL library printed
    return (
        f"off-screen rendering of {env_id!r} failed with MUJOCO_GL={backend!r} "
        f"({type(e).__name__}: {cause}); set MUJOCO_GL=egl (GPU or Mesa EGL) or MUJOCO_GL=osmesa "
        "(software, needs libOSMesa) before starting the process"
    )


def _resize_indices(env_id: str, rgb: Any, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """None when the env renders ``size x size`` natively, else nearest-neighbour indices."""
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise EnvError(
            f"environment {env_id!r} rendered {arr.dtype} {arr.shape}; pixel observations "
            "need (height, width, 3) uint8 RGB frames"
        )
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return None
    rows = (np.arange(size) * h // size).astype(np.intp)
    cols = (np.arange(size) * w // size).astype(np.intp)
    return rows, cols


def _check_camera(env_id: str, env: gym.Env, camera: str | int | None) -> None:
    """Gymnasium silently falls back to the free camera for an unknown name; we do not."""
    model = getattr(env.unwrapped, "model", None)
    if camera is None or model is None or not hasattr(model, "ncam"):
        return
    names = [model.camera(i).name for i in range(model.ncam)]
    ok = camera in names if isinstance(camera, str) else -1 <= int(camera) < model.ncam
    if not ok:
        raise EnvError(
            f"environment {env_id!r} has no camera {camera!r}; cameras: {names} "
            f"(ids 0..{model.ncam - 1}, -1 is the free camera)"
        )


def render_rate(
    env_id: str, spec: PixelSpec | None = None, frames: int = 200, *, physics: bool = True
) -> float:
    """Pixel observations per second (one rendered frame each), after a warm-up frame.

    ``physics=True`` times ``step`` with zero actions (``repeat`` physics steps, one render,
    stacking; resets count as frames): what the trainer and bridge see. ``physics=False``
    times render plus stacking alone.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    env = make_pixel_env(env_id, spec)
    try:
        env.reset(seed=0)  # creates the GL context: not timed
        action = np.zeros(env.action_space.shape, env.action_space.dtype)
        t0 = time.perf_counter()
        for _ in range(frames):
            if not physics:
                env._ring[env._head] = env._render()
                env._obs()
                continue
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        return frames / (time.perf_counter() - t0)
    finally:
        env.close()
