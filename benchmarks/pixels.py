"""Pixel pipeline benchmark: render rate, frame replay memory and sampling, update rate, learning.

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
3. **The DDPG update from pixels**: the trainer's own ``DDPGAgent.update`` on
   ``FrameReplay.sample`` (n-step returns and random shift where the preset asks), per preset at
   its batch size (paper 16, drq 32), and the paper's networks with DrQ-v2's strides 2,1,1 for
   comparison; updates per second and time as a ratio to the paper preset's, in one run.
4. **Learning** (optional, long): ``--learn-steps 50000`` runs ``ddpg train --pixels --preset
   drq`` on InvertedPendulum-v5 for 100,000 environment steps (drq's action repeat 2) for each of
   ``--learn-seeds`` (0 1 2) and reports the evaluation returns against the target: a mean of at
   least 900 within 100,000 env steps on every seed, held (the mean of the last 3 evaluations
   within the budget at least 900 too). Runs resume: the same command continues them.
   ``--learning-run DIR [DIR ...]`` reports finished runs instead.

Torch threads default to 1 (``--threads``). On a GPU machine pass ``--device cuda`` (replay and
networks on the GPU; rendering still goes through ``MUJOCO_GL``). The load average (1 min) before
and after, the CPU model and the command line are recorded.

    .venv/bin/python benchmarks/pixels.py [--quick] [--device cpu] [--threads 1]
        [--frames 300] [--cheetah-frames 24] [--capacity 20000] [--iters 200]
        [--update-iters 20] [--skip-render] [--learn-steps N [--learn-seeds S ...] | --learning-run DIR ...]
        [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# sim_bridge.pixels sets MUJOCO_GL=egl when unset, at import, before MuJoCo's GL bindings load.
from sim_bridge.pixels import render_rate  # noqa: I001

import numpy as np
import torch

from benchmarks._machine import cpu_model, write_result
from benchmarks.learning import run_one
from models.spec import PixelSpec
from models.pixel_networks import random_shift
from training.frame_replay import FrameReplay, format_bytes

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pixels.json"
PENDULUM, CHEETAH = "InvertedPendulum-v5", "HalfCheetah-v5"
STACK, REPEAT = 3, 3
EPISODE = 1000
LEARNING_NOTE = (
    "learning runs not measured in this run: pass --learn-steps 50000 (100k env steps per seed) "
    "or --learning-run RUN_DIR ... (finished ddpg train --pixels runs)"
)


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


# -- 3. the DDPG update from pixels ------------------------------------------------------------
UPDATE_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("paper", "paper", {}),
    ("drq", "drq", {}),
    ("drq, an encoder each", "drq", {"shared_encoder": False}),
    ("paper, strides 2,1,1", "paper", {"conv_strides": (2, 1, 1)}),
]
"""(label, preset, overrides): the two pixel presets; drq with an encoder for each network, as
the paper trains them, to show what DrQ-v2's one shared encoder saves; and the paper's networks
with DrQ-v2's strides (23,328 conv features) to show what the stride choice costs."""


def bench_updates(
    iters: int, capacity: int, device: torch.device, seed: int
) -> list[dict[str, Any]]:
    """The trainer's own update (``DDPGAgent.update`` on ``FrameReplay.sample``, n-step and
    random shift where the preset asks) at each preset's batch size, on a filled 64x64 replay."""
    from training.agent import DDPGAgent
    from training.config import make_config

    replay = filled_replay(64, capacity, device, seed)
    rows: list[dict[str, Any]] = []
    base = None
    for label, preset, overrides in UPDATE_CASES:
        cfg = make_config(preset, env=PENDULUM, pixels=True, **overrides)
        torch.manual_seed(seed)
        agent = DDPGAgent(cfg, (3 * STACK, 64, 64), np.array([-3.0]), np.array([3.0]), device)
        gen = torch.Generator(device=device).manual_seed(seed)

        def update(agent: DDPGAgent = agent, cfg: Any = cfg, gen: torch.Generator = gen) -> object:
            batch = replay.sample(cfg.batch_size, gen, n_step=cfg.n_step, gamma=cfg.gamma)
            return agent.update(batch)

        t = per_call_s(update, iters, device)
        base = base or t
        row = {
            "case": label,
            "preset": preset,
            "batch": cfg.batch_size,
            "n_step": cfg.n_step,
            "augment_pad": cfg.augment_pad,
            "conv_strides": list(cfg.conv_strides),
            "pixel_features": cfg.pixel_features,
            "update_ms": round(t * 1e3, 2),
            "updates_per_s": round(1 / t, 2),
            "samples_per_s": round(cfg.batch_size / t, 1),
            "time_vs_paper": round(t / base, 2),
            "actor_params": sum(p.numel() for p in agent.actor.parameters()),
            "critic_params": sum(p.numel() for p in agent.critic.parameters()),
        }
        rows.append(row)
        print(
            f"  {label:22} batch {cfg.batch_size:3}: {t * 1e3:7.1f} ms/update, "
            f"{1 / t:6.2f} updates/s",
            flush=True,
        )
    return rows


# -- 4. learning ---------------------------------------------------------------------------------
TARGET_RETURN, TARGET_ENV_STEPS = 900.0, 100_000
HELD_EVALS = 3
"""The target is held when the mean of the last 3 evaluations within the budget is at it."""


def learning_runs(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Every seed's summary, and whether all met the target and held it."""
    return {
        "measured": True,
        "runs": summaries,
        "seeds": [r["seed"] for r in summaries],
        "all_met": all(r["target_met"] for r in summaries),
        "all_held": all(r["held"] for r in summaries),
    }


def learning_summary(run_dir: Path) -> dict[str, Any]:
    """Evaluation returns against environment (physics) steps of a ``ddpg train --pixels`` run
    on InvertedPendulum-v5, and whether it met the target."""
    import csv

    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    repeat = int(cfg["action_repeat"])
    summary_path = run_dir / "eval.json"
    final = json.loads(summary_path.read_text()) if summary_path.exists() else None

    def env_steps(row: dict[str, str]) -> tuple[int, bool]:
        """Physics steps at an evaluation, and whether they are exact: eval.csv has them
        (runs since this stop), eval.json for the last one; else agent steps x repeat."""
        if row.get("env_steps"):
            return int(float(row["env_steps"])), True
        if final and final.get("env_steps") and int(row["step"]) == final["steps"]:
            return int(final["env_steps"]), True
        return int(row["step"]) * repeat, False

    with open(run_dir / "eval.csv") as f:
        evals = []
        for r in csv.DictReader(f):
            steps, exact = env_steps(r)
            evals.append(
                {
                    "agent_steps": int(r["step"]),
                    "env_steps": steps,
                    "env_steps_exact": exact,
                    "return_mean": round(float(r["return_mean"]), 1),
                    "return_std": round(float(r["return_std"]), 1),
                }
            )
    within = [e for e in evals if e["env_steps"] <= TARGET_ENV_STEPS]
    first = next((e for e in evals if e["return_mean"] >= TARGET_RETURN), None)
    last = [e["return_mean"] for e in within[-HELD_EVALS:]]
    return {
        "measured": True,
        "run_dir": str(run_dir),
        "env": cfg["env"],
        "preset": cfg["preset"],
        "seed": cfg["seed"],
        "env_steps_note": "physics steps; where env_steps_exact is false, agent steps x "
        "action_repeat (an upper bound: an episode's last agent step may take fewer)",
        "evals": evals,
        "best_within_target_steps": max((e["return_mean"] for e in within), default=None),
        "first_eval_at_target": first,
        "target_met": first is not None and first["env_steps"] <= TARGET_ENV_STEPS,
        "last_evals": last,
        "held": len(last) == HELD_EVALS and sum(last) / len(last) >= TARGET_RETURN,
        "wall_s": final["wall_s"] if final else None,
        "steps_per_s": final["steps_per_s"] if final else None,
    }


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
    print(f"\nThe DDPG update from pixels (trainer's update on the frame replay, 64x64, {dev})")
    print(
        f"{'case':22} {'batch':>5} {'n-step':>6} {'ms':>8} {'updates/s':>10} {'x paper time':>12}"
    )
    for r in result["updates"]:
        print(
            f"{r['case']:22} {r['batch']:>5} {r['n_step']:>6} {r['update_ms']:>8.1f} "
            f"{r['updates_per_s']:>10.2f} {r['time_vs_paper']:>12.2f}"
        )
    learn = result["learning"]
    if learn.get("measured"):
        for run in learn["runs"]:
            print(f"\nLearning: {run['env']} from pixels, {run['preset']}, seed {run['seed']}")
            print(f"{'env steps':>14} {'agent steps':>12} {'eval return':>16}")
            for e in run["evals"]:
                ret = f"{e['return_mean']:.1f} ± {e['return_std']:.1f}"
                mark = "" if e["env_steps_exact"] else " (≤)"
                print(f"{e['env_steps']:>10,}{mark:4} {e['agent_steps']:>12,} {ret:>16}")
        print(
            f"\n{'seed':>4} {'first >= target (env steps)':>28} {'best within':>12} "
            f"{'last 3 evaluations':>26} {'met':>4} {'held':>5} {'wall min':>9}"
        )
        for run in learn["runs"]:
            first = f"{run['first_eval_at_target']['env_steps']:,}" if run["target_met"] else "-"
            last = " / ".join(f"{v:.0f}" for v in run["last_evals"])
            wall = f"{run['wall_s'] / 60:.1f}" if run["wall_s"] else "-"
            print(
                f"{run['seed']:>4} {first:>28} "
                f"{run['best_within_target_steps']:>12} {last:>26} "
                f"{'yes' if run['target_met'] else 'NO':>4} {'yes' if run['held'] else 'NO':>5} "
                f"{wall:>9}"
            )
        print(
            f"target: {TARGET_RETURN:.0f} within {TARGET_ENV_STEPS:,} env steps on every seed, "
            f"held (mean of the last {HELD_EVALS} evaluations within): "
            f"{'met' if learn['all_met'] and learn['all_held'] else 'NOT met'}"
        )
    else:
        print(f"\n{learn['note']}")
    print(
        f"load average 1 min before/after: {result['loadavg_1min_before']}/"
        f"{result['loadavg_1min_after']}; {cpu_model()}; wall {result['wall_s']:.1f} s"
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
    parser.add_argument("--update-iters", type=int, default=20, help="timed updates per case")
    parser.add_argument(
        "--learn-steps",
        type=int,
        default=0,
        help="also run the learning benchmark: ddpg train --pixels --preset drq for N agent "
        "steps per seed (50,000 = 100k env steps at drq's action repeat 2)",
    )
    parser.add_argument(
        "--learn-seeds", type=int, nargs="+", default=[0, 1, 2], help="its seeds (0 1 2)"
    )
    parser.add_argument(
        "--learn-out",
        type=Path,
        default=Path("runs/bench-pixels-learn"),
        help="where its runs go (ROOT/drq-sSEED; an interrupted run resumes from its checkpoint "
        "when the same command is run again)",
    )
    parser.add_argument(
        "--learning-run",
        type=Path,
        nargs="+",
        help="report finished `ddpg train --pixels` runs on InvertedPendulum-v5 instead",
    )
    parser.add_argument("--skip-render", action="store_true", help="skip the render rates")
    parser.add_argument("--quick", action="store_true", help="tiny run: a smoke test, not figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.cheetah_frames = 30, 4
        args.capacity, args.iters, args.update_iters = 2000, 20, 3
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
    print("DDPG update from pixels", flush=True)
    updates = bench_updates(args.update_iters, args.capacity, device, args.seed)
    learning: dict[str, Any] = {"measured": False, "note": LEARNING_NOTE}
    if args.learn_steps:
        runs = []
        for seed in args.learn_seeds:
            print(f"learning run: seed {seed}, {args.learn_steps} agent steps", flush=True)
            overrides = {"pixels": True, "eval_every": 5_000, "eval_episodes": 10,
                         "checkpoint_every": 5_000, "device": str(device), "threads": args.threads}  # fmt: skip
            name = f"drq-s{seed}"
            runs.append(
                run_one(PENDULUM, seed, args.learn_steps, "drq", args.learn_out, overrides, name)
            )
        learning = learning_runs([learning_summary(run) for run in runs])
    elif args.learning_run is not None:
        learning = learning_runs([learning_summary(run) for run in args.learning_run])
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
        "updates_note": (
            "DDPGAgent.update on FrameReplay.sample at each preset's batch size (n-step returns "
            "and random shift where the preset asks): the trainer's own update"
        ),
        "updates": updates,
        "learning": learning,
        "wall_s": round(wall, 2),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": loadavg_1min(),
        "threads": args.threads,
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    print_tables(result)
    write_result(args.out, result, torch=torch.__version__)
    return result


if __name__ == "__main__":
    main()
