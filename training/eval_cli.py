"""``ddpg eval MODEL.onnx``: run an exported actor in the simulator, without torch.

The same :func:`training.evaluation.evaluate` the trainer uses, on the same seeds (by default the
model's own ``eval_seed``), so a model exported from a run reproduces the trainer's deterministic
evaluation. ``--video`` records the first episode off-screen (MuJoCo's EGL backend) to an MP4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym

EXAMPLES = """\
examples:
  ddpg eval runs/pendulum/actor.onnx --episodes 10           # the model's env and eval seeds
  ddpg eval actor.onnx --env HalfCheetah-v5 --episodes 5 --seed 0 --json
  ddpg eval actor.onnx --episodes 1 --video cheetah.mp4      # watch what the actor does
"""


class _Recorder(gym.Wrapper):
    """Renders every frame of the first episode into an MP4 writer; then stops recording.
    Rendering reads the simulator state and never changes it, so returns are unaffected."""

    def __init__(self, env: gym.Env, writer: Any) -> None:
        super().__init__(env)
        self.writer = writer
        self.resets = 0

    def _frame(self) -> None:
        if self.resets == 1:
            self.writer.append_data(self.env.render())

    def reset(self, **kwargs: Any) -> Any:
        self.resets += 1
        out = self.env.reset(**kwargs)
        self._frame()
        return out

    def step(self, action: Any) -> Any:
        out = self.env.step(action)
        self._frame()
        return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("model", type=Path, metavar="MODEL.onnx", help="an exported ONNX actor")
    parser.add_argument(
        "--env", metavar="ENV", help="Gymnasium env id; must be the model's (default: the model's)"
    )
    parser.add_argument(
        "--episodes", type=int, default=10, metavar="N", help="episodes to run (default: 10)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="episode i resets with seed S+i (default: the model's eval_seed, as the trainer)",
    )
    parser.add_argument(
        "--provider",
        choices=["cpu", "cuda", "tensorrt"],
        default="cpu",
        help="onnxruntime execution provider (default: cpu, fastest for small MLPs)",
    )
    parser.add_argument(
        "--video",
        type=Path,
        metavar="PATH",
        help="write an MP4 of the first episode, rendered off-screen (MUJOCO_GL, default egl)",
    )
    parser.add_argument(
        "--video-size",
        default="640x480",
        metavar="WxH",
        help="video frame size, multiples of 16 (default: 640x480)",
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON to stdout")


def _video_writer(path: Path, fps: float) -> Any:
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    # libx264 via imageio-ffmpeg (its own ffmpeg binary); frame sizes are multiples of 16, so
    # no player-compatibility resize happens.
    return imageio.get_writer(str(path), fps=fps, codec="libx264", quality=7, macro_block_size=16)


def run(args: argparse.Namespace) -> int:
    from models.policy import OnnxPolicy, PolicyError, load_checked_proto, pixel_spec_dict
    from sim_bridge.envs import EnvError, env_spec, make_env
    from sim_bridge.pixels import make_env_for
    from training.evaluation import evaluate

    def fail(message: str) -> int:
        print(f"ddpg eval: error: {message}", file=sys.stderr)
        return 2

    if args.episodes < 1:
        return fail(f"--episodes {args.episodes}: must be at least 1")
    env_kwargs: dict[str, Any] = {}
    if args.video is not None:
        try:
            width, height = (int(v) for v in args.video_size.lower().split("x"))
        except ValueError:
            return fail(f"--video-size {args.video_size!r} is not WxH, e.g. 640x480")
        if width <= 0 or height <= 0 or width % 16 or height % 16:
            return fail(f"--video-size {args.video_size}: width and height must be multiples of 16")
        # Off-screen GL; must be chosen before MuJoCo's renderer is first imported.
        os.environ.setdefault("MUJOCO_GL", "egl")
        env_kwargs = {"render_mode": "rgb_array", "width": width, "height": height}
    try:
        data = args.model.read_bytes()
    except OSError as e:
        return fail(f"{args.model}: cannot read model file: {e.strerror}")
    try:
        model_meta = load_checked_proto(data, str(args.model))[1]
    except PolicyError as e:
        return fail(str(e))
    env_id = args.env or model_meta.env_id
    pixels = pixel_spec_dict(model_meta)
    if pixels is not None and args.video is not None:
        return fail("--video records state models; a pixel model sees its own 64x64 frames")
    try:  # a pixel actor: the same render, repeat and stacking as in training
        env = make_env(env_id, **env_kwargs) if pixels is None else make_env_for(env_id, pixels)
    except EnvError as e:
        return fail(str(e))
    writer = None
    try:
        try:
            policy = OnnxPolicy(args.model, expect=env_spec(env_id, env), provider=args.provider)
        except PolicyError as e:
            return fail(str(e))
        meta = policy.metadata
        seed = meta.eval_seed if args.seed is None else args.seed
        if args.video is not None:
            try:
                writer = _video_writer(args.video, env.metadata.get("render_fps", 30))
            except Exception as e:
                return fail(f"cannot write video {args.video}: {e}")
            env = _Recorder(env, writer)
        result = evaluate(policy, env, args.episodes, seed)
    finally:
        if writer is not None:
            writer.close()
        env.close()
    summary = {
        "model": str(args.model),
        "model_id": meta.model_id,
        "env": env_id,
        "episodes": args.episodes,
        "seed": seed,
        "returns": result.returns,
        "lengths": result.lengths,
        "return_mean": result.mean,
        "return_std": result.std,
        "provider": policy.provider,
        "video": str(args.video) if args.video is not None else None,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for i, (ret, length) in enumerate(zip(result.returns, result.lengths, strict=True)):
            print(f"episode {i:3d}  seed {seed + i}  return {ret:10.2f}  length {length}")
        print(
            f"{env_id}: mean return {result.mean:.2f} ± {result.std:.2f} "
            f"over {args.episodes} episodes (model {meta.model_id})"
        )
        if args.video is not None:
            print(f"video of episode 0: {args.video}")
    return 0
