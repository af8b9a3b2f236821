"""Pixel pipeline benchmark: render rate, frame replay memory and sampling, pixel network cost.

Three measurements, each printed as a table and written together to
``benchmarks/results/pixels.json``:

1. **Render + env step rate** (``sim_bridge.pixels.render_rate``), in pixel observations per
   second (one rendered frame each): InvertedPendulum-v5 at 64 and 84 pixels, and HalfCheetah-v5
   at 64 (few frames by default: software EGL renders it at about 12 frames/s), each with
   physics (``step``: ``repeat`` physics steps, one render, stacking; what the trainer and the
   bridge see) and without (render and stacking alone). ``MUJOCO_GL`` is respected (EGL when
   unset).
2. **Replay** (``training.frame_replay.FrameReplay``), at 64 and 84 pixels: memory per
   transition (``nbytes / capacity``, which includes the frame ring's slack) against one frame
   and against a naive buffer storing ``obs`` and ``next_obs`` stacks per transition; sample
   throughput at batch 16 (the paper's) and 256; and, on the sampled batch, the cost of the
   uint8 -> float conversion (``obs`` and ``next_obs``, ``/ 255``) and of ``random_shift``
   (DrQ-v2's augmentation, on the uint8 ``obs`` and ``next_obs``). The buffer is filled with
   synthetic frames in 1,000-step episodes (sampling cost does not depend on pixel values).
3. **Pixel network cost, not the DDPG update**: forward + backward + one plain
   ``torch.optim.Adam`` step of ``PixelCritic`` (``n_q`` 1 and 2, MSE to a random target) and of
   ``PixelActor`` (a dummy loss on its actions) on random 9 x 64 x 64 uint8 batches of 16 and 64,
   in steps per second, plus an updates-equivalent per second ``1 / (t_critic + t_actor)``. The
   trainer does not yet run the DDPG update from pixels, so this measures the networks alone: no
   target networks, no target Q evaluation, no critic pass inside the actor loss, no replay.

**Not measured yet**: the learning run of issue 6 (InvertedPendulum-v5 from pixels, target mean
evaluation return >= 900 within 100,000 environment steps) is not part of this script because
``ddpg train --pixels`` does not exist yet; the JSON says so under ``learning``.

Torch threads default to 1 (``--threads``). On a GPU machine pass ``--device cuda`` (replay and
networks on the GPU; rendering still goes through ``MUJOCO_GL``). The load average (1 min) before
and after, the CPU model and the command line are recorded.

    .venv/bin/python benchmarks/pixels.py [--quick] [--device cpu] [--threads 1]
        [--frames 300] [--cheetah-frames 24] [--capacity 20000] [--iters 200]
        [--net-iters 20] [--skip-render] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# sim_bridge.pixels sets MUJOCO_GL=egl when unset, at import, before MuJoCo's GL bindings load.
from sim_bridge.pixels import PixelSpec, render_rate  # noqa: I001

import numpy as np
import torch

from models.pixel_networks import PixelActor, PixelCritic, random_shift
from training.frame_replay import FrameReplay, format_bytes

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pixels.json"
PENDULUM, CHEETAH = "InvertedPendulum-v5", "HalfCheetah-v5"
STACK, REPEAT = 3, 3
EPISODE = 1000
LEARNING_NOTE = (
    "learning run NOT measured: InvertedPendulum-v5 from pixels (target: mean evaluation return "
    ">= 900 within 100,000 env steps) is not part of this script yet, because "
    "`ddpg train --pixels` does not exist yet"
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg_1min() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_s(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after two warm-up calls (synchronised on a GPU)."""
    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


# -- 1. rendering ------------------------------------------------------------------------------
def bench_render(frames: int, cheetah_frames: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cases = [(PENDULUM, 64, frames), (PENDULUM, 84, frames), (CHEETAH, 64, cheetah_frames)]
    for env_id, size, n in cases:
        spec = PixelSpec(size=size, stack=STACK, repeat=REPEAT)
        for physics in (True, False):
            rate = render_rate(env_id, spec, n, physics=physics)
            row = {"env": env_id, "size": size, "physics": physics, "frames": n, "fps": rate}
            rows.append(row)
            what = "step (physics+render)" if physics else "render only"
            print(f"  {env_id:20} {size:3}px {what:22} {rate:9.1f} frames/s ({n})", flush=True)
    return rows


# -- 2. replay ---------------------------------------------------------------------------------
def filled_replay(size: int, capacity: int, device: torch.device, seed: int) -> FrameReplay:
    """A buffer of ``capacity`` synthetic transitions in ``EPISODE``-step episodes."""
    rng = np.random.default_rng(seed)
    replay = FrameReplay(capacity, (3, size, size), STACK, act_dim=1, device=device)
    left = capacity
    while left > 0:
        t = min(EPISODE, left)
        frames = rng.integers(0, 256, (t + 1, 3, size, size), dtype=np.uint8)
        truncated = np.zeros(t, bool)
        truncated[-1] = t == EPISODE
        replay.add_episode(
            frames,
            rng.uniform(-1, 1, (t, 1)).astype(np.float32),
            rng.standard_normal(t).astype(np.float32),
            np.zeros(t, bool),
            truncated,
        )
        left -= t
    return replay


def bench_replay(
    sizes: list[int], batches: list[int], capacity: int, iters: int, device: torch.device, seed: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for size in sizes:
        replay = filled_replay(size, capacity, device, seed)
        frame = 3 * size * size
        per_transition_tail = 4 * 1 + 4 + 1 + 1  # action (act_dim 1), reward, two flags
        naive = 2 * STACK * frame + per_transition_tail
        ours = replay.nbytes / capacity
        mem = {
            "size": size,
            "capacity": capacity,
            "transitions": len(replay),
            "nbytes": replay.nbytes,
            "bytes_per_transition": round(ours, 1),
            "frame_bytes": frame,
            "naive_bytes_per_transition": naive,
            "per_transition_in_frames": round(ours / frame, 3),
            "naive_over_ours": round(naive / ours, 2),
        }
        print(
            f"  {size}px: {format_bytes(replay.nbytes)} for {capacity:,} transitions, "
            f"{ours:,.0f} B/transition ({ours / frame:.3f} frames; naive {naive:,} B, "
            f"{naive / ours:.1f}x)",
            flush=True,
        )
        gen = torch.Generator(device=device).manual_seed(seed)
        for b in batches:
            batch = replay.sample(b, gen)

            def to_float(batch: Any = batch) -> object:
                return batch.obs.float().div_(255.0), batch.next_obs.float().div_(255.0)

            def shift(batch: Any = batch, gen: torch.Generator = gen) -> object:
                return random_shift(batch.obs, 4, gen), random_shift(batch.next_obs, 4, gen)

            def sample(
                b: int = b, replay: FrameReplay = replay, gen: torch.Generator = gen
            ) -> object:
                return replay.sample(b, gen)

            n = max(10, iters * 16 // b)  # fewer calls for the big batch
            t_sample = per_call_s(sample, n, device)
            t_float = per_call_s(to_float, n, device)
            t_shift = per_call_s(shift, n, device)
            row = {
                **mem,
                "batch": b,
                "timed_calls": n,
                "sample_us": round(t_sample * 1e6, 1),
                "samples_per_s": round(1 / t_sample, 1),
                "transitions_per_s": round(b / t_sample),
                "to_float_us": round(t_float * 1e6, 1),
                "random_shift_us": round(t_shift * 1e6, 1),
                "sample_float_shift_per_s": round(1 / (t_sample + t_float + t_shift), 1),
            }
            rows.append(row)
            print(
                f"    batch {b:4}: sample {t_sample * 1e6:8.1f} us, float {t_float * 1e6:8.1f} "
                f"us, shift {t_shift * 1e6:8.1f} us",
                flush=True,
            )
    return rows


# -- 3. networks -------------------------------------------------------------------------------
def adam_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    obs: torch.Tensor,
    act: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> None:
    """One forward, backward and Adam step: MSE to ``target`` for a critic (``act`` given),
    a dummy loss (mean squared action) for an actor."""
    if act is None:
        loss = net(obs).pow(2).mean()
    else:
        assert target is not None
        loss = (net(obs, act) - target).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_networks(
    batches: list[int], iters: int, device: torch.device, seed: int
) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    obs_shape = (3 * STACK, 64, 64)
    act_dim = 1
    rows: list[dict[str, Any]] = []
    for b in batches:
        obs = torch.randint(0, 256, (b, *obs_shape), dtype=torch.uint8, device=device)
        act = torch.rand(b, act_dim, device=device) * 2 - 1
        target = torch.randn(b, device=device)
        actor = PixelActor(obs_shape, [-1.0] * act_dim, [1.0] * act_dim).to(device)
        actor_opt = torch.optim.Adam(actor.parameters(), lr=1e-4)

        t_actor = per_call_s(partial(adam_step, actor, actor_opt, obs), iters, device)
        for n_q in (1, 2):
            critic = PixelCritic(obs_shape, act_dim, n_q=n_q).to(device)
            critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)

            step = partial(adam_step, critic, critic_opt, obs, act, target)
            t_critic = per_call_s(step, iters, device)
            row = {
                "batch": b,
                "n_q": n_q,
                "critic_ms": round(t_critic * 1e3, 2),
                "critic_steps_per_s": round(1 / t_critic, 1),
                "actor_ms": round(t_actor * 1e3, 2),
                "actor_steps_per_s": round(1 / t_actor, 1),
                "updates_equiv_per_s": round(1 / (t_critic + t_actor), 1),
                "critic_params": sum(p.numel() for p in critic.parameters()),
                "actor_params": sum(p.numel() for p in actor.parameters()),
            }
            rows.append(row)
            print(
                f"  batch {b:3} n_q {n_q}: critic {t_critic * 1e3:7.2f} ms, actor "
                f"{t_actor * 1e3:7.2f} ms, {row['updates_equiv_per_s']:6.1f} updates-equiv/s",
                flush=True,
            )
    return rows


# -- report ------------------------------------------------------------------------------------
def print_tables(result: dict[str, Any]) -> None:
    dev = result["device"]
    if result["render"]:
        print(f"\nRender + env step rate (MUJOCO_GL={result['mujoco_gl']}, stack 3, repeat 3)")
        print(f"{'env':20} {'size':>5} {'mode':>22} {'frames':>7} {'frames/s':>10}")
        for r in result["render"]:
            mode = "step (physics+render)" if r["physics"] else "render only"
            print(f"{r['env']:20} {r['size']:>5} {mode:>22} {r['frames']:>7} {r['fps']:>10.1f}")
    print(f"\nFrame replay, {dev} (stack 3, act_dim 1, synthetic {EPISODE}-step episodes)")
    print(
        f"{'size':>4} {'B/trans':>8} {'frame B':>8} {'in frames':>9} {'naive B':>8} "
        f"{'x naive':>8} {'batch':>5} {'sample us':>10} {'float us':>9} {'shift us':>9} "
        f"{'samples/s':>10} {'all 3 /s':>9}"
    )
    for r in result["replay"]:
        print(
            f"{r['size']:>4} {r['bytes_per_transition']:>8,.0f} {r['frame_bytes']:>8,} "
            f"{r['per_transition_in_frames']:>9.3f} {r['naive_bytes_per_transition']:>8,} "
            f"{r['naive_over_ours']:>7.1f}x {r['batch']:>5} {r['sample_us']:>10.1f} "
            f"{r['to_float_us']:>9.1f} {r['random_shift_us']:>9.1f} {r['samples_per_s']:>10.1f} "
            f"{r['sample_float_shift_per_s']:>9.1f}"
        )
    print(
        f"\nPixel network cost, NOT the DDPG update (fwd+bwd+Adam, 9x64x64 uint8, {dev}, "
        f"threads {result['threads']})"
    )
    print(
        f"{'batch':>5} {'n_q':>3} {'critic ms':>10} {'critic/s':>9} {'actor ms':>9} "
        f"{'actor/s':>8} {'upd-equiv/s':>12}"
    )
    for r in result["networks"]:
        print(
            f"{r['batch']:>5} {r['n_q']:>3} {r['critic_ms']:>10.2f} {r['critic_steps_per_s']:>9.1f}"
            f" {r['actor_ms']:>9.2f} {r['actor_steps_per_s']:>8.1f} "
            f"{r['updates_equiv_per_s']:>12.1f}"
        )
    print(f"\n{LEARNING_NOTE}.")
    print(
        f"load average 1 min before/after: {result['loadavg_1min_before']}/"
        f"{result['loadavg_1min_after']}; {result['cpu']}; wall {result['wall_s']:.1f} s"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="replay and network device (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--frames", type=int, default=300, help="frames per InvertedPendulum case")
    parser.add_argument(
        "--cheetah-frames", type=int, default=24, help="frames per HalfCheetah case"
    )
    parser.add_argument("--capacity", type=int, default=20_000, help="replay transitions")
    parser.add_argument(
        "--iters", type=int, default=200, help="timed replay calls at batch 16 (fewer at 256)"
    )
    parser.add_argument("--net-iters", type=int, default=20, help="timed network steps per case")
    parser.add_argument("--skip-render", action="store_true", help="skip the render rates")
    parser.add_argument("--quick", action="store_true", help="tiny run: a smoke test, not figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.cheetah_frames = 30, 4
        args.capacity, args.iters, args.net_iters = 2000, 20, 3
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)

    load_before = loadavg_1min()
    t0 = time.perf_counter()
    render: list[dict[str, Any]] = []
    if not args.skip_render:
        print("render + env step rate", flush=True)
        render = bench_render(args.frames, args.cheetah_frames)
    print("frame replay", flush=True)
    replay = bench_replay([64, 84], [16, 256], args.capacity, args.iters, device, args.seed)
    print("pixel networks", flush=True)
    networks = bench_networks([16, 64], args.net_iters, device, args.seed)
    wall = time.perf_counter() - t0

    result: dict[str, Any] = {
        "benchmark": "pixels",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "mujoco_gl": os.environ.get("MUJOCO_GL"),
        "stack": STACK,
        "repeat": REPEAT,
        "quick": args.quick,
        "render": [{**r, "fps": round(r["fps"], 2)} for r in render],
        "replay": replay,
        "networks_note": (
            "PixelCritic/PixelActor forward+backward+one plain Adam step on random batches: "
            "the networks' cost, not the DDPG update (the trainer does not run it from pixels "
            "yet); updates_equiv_per_s = 1 / (critic step + actor step)"
        ),
        "networks": networks,
        "learning": {"measured": False, "note": LEARNING_NOTE},
        "wall_s": round(wall, 2),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": loadavg_1min(),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    print_tables(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
