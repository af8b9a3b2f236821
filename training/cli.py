"""``ddpg train``: every TrainConfig field is a flag; the preset fills what is not given."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import fields
from pathlib import Path

from control_node.config import ConfigError
from training.config import (
    PIXEL_PRESETS,
    PRESETS,
    TrainConfig,
    field_docs,
    load_config,
    make_config,
)

EXAMPLES = """\
examples:
  ddpg train --env Pendulum-v1 --steps 20000 --seed 0 --out runs/pendulum
  ddpg train --env HalfCheetah-v5 --preset paper --steps 1000000
  ddpg train --resume runs/pendulum --steps 40000     # continue a run to 40k steps
  ddpg train --env InvertedPendulum-v5 --pixels --steps 30000    # from 64x64 frames (drq)
  ddpg train --env InvertedPendulum-v5 --pixels --preset paper   # the paper's pixel DDPG
  ddpg train --env HalfCheetah-v5 --obs-norm                     # observation normalisation
  ddpg train --env HalfCheetah-v5 --num-envs 8 --async-envs      # 8 environments side by side
"""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(name: str) -> str:
    """The default as help text: one value, or one per preset where the presets differ."""
    base = next(f.default for f in fields(TrainConfig) if f.name == name)  # as declared
    per_preset = {p: values.get(name, base) for p, values in PRESETS.items() if p != "drq"}
    for p, values in PIXEL_PRESETS.items():
        per_preset[f"{p} --pixels"] = values.get(name, PRESETS[p].get(name, base))

    def show(v: object) -> str:
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

    if len({show(v) for v in per_preset.values()}) == 1:
        return show(base) if base != "" else '""'
    return ", ".join(f"{p}: {show(v)}" for p, v in per_preset.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    docs = field_docs()
    for f in fields(TrainConfig):
        help_text = f"{docs.get(f.name, '')} (default: {_default_text(f.name)})"
        kind = str(f.type)
        if f.name == "preset":
            parser.add_argument(
                _flag(f.name), choices=sorted(PRESETS), default=None, help=help_text
            )
        elif kind == "bool":
            parser.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            metavar = {"int": "N", "float": "X", "str": "S", "tuple[int, ...]": "W,W"}[kind]
            parser.add_argument(_flag(f.name), default=None, metavar=metavar, help=help_text)
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML file of config keys (flags given here override it)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoint (its config; --steps may extend it)",
    )
    parser.add_argument("--json", action="store_true", help="print eval.json to stdout at the end")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if args.resume is not None:
        from training.rundir import resume_config

        given = {k: v for k, v in overrides.items() if v is not None}
        allowed = {
            "steps",
            "export",
            "device",
            "eval_every",
            "eval_episodes",
            "checkpoint_every",
            "save_replay",
            "log_every",
            "compile",
            "fast_update",
            "threads",
            "num_envs",  # a resumed run starts fresh episodes in any number of environments
            "async_envs",
        }
        fixed = sorted(set(given) - allowed)
        if fixed:
            flags = ", ".join(_flag(k) for k in fixed)
            raise ConfigError(f"--resume keeps the run's own config; cannot change {flags}")
        return resume_config(args.resume, **given)
    base: dict[str, object] = {}
    if args.config is not None:
        base = load_config(args.config).to_dict()
        if args.preset is None:
            overrides["preset"] = base["preset"]
    preset = overrides.pop("preset")
    if args.config is not None and preset != base["preset"]:
        base = {}  # an explicit --preset replaces the file's preset-derived values
    merged = {
        **{k: v for k, v in base.items() if k != "preset"},
        **{k: v for k, v in overrides.items() if v is not None},
    }
    return make_config(preset, **merged)


def run(args: argparse.Namespace) -> int:
    from sim_bridge.envs import EnvError

    try:
        cfg = config_from_args(args)
        from training.trainer import Trainer

        trainer = Trainer(cfg, resume=args.resume is not None, progress=not args.no_progress)
    except (ConfigError, EnvError) as e:
        print(f"ddpg train: error: {e}", file=sys.stderr)
        return 2
    # Ctrl-C, or SIGTERM from a scheduler: finish the step, checkpoint, say how to resume.
    signal.signal(signal.SIGINT, trainer.request_stop)
    signal.signal(signal.SIGTERM, trainer.request_stop)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if summary.get("interrupted"):
        print(
            f"\ninterrupted at step {trainer.step}; checkpoint in {trainer.run_dir / 'checkpoint.pt'}; "
            f"continue with: ddpg train --resume {trainer.run_dir}",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        mean = summary["eval_return_mean"]
        shown = "n/a" if mean is None else f"{mean:.1f} ± {summary['eval_return_std']:.1f}"
        print(
            f"{cfg.env} {cfg.preset}: {summary['steps']} steps in {summary['wall_s']:.0f} s "
            f"({summary['steps_per_s']:.0f} steps/s); eval return {shown} over "
            f"{summary['episodes']} episodes; run in {trainer.run_dir}"
        )
    return 1 if summary.get("export_error") else 0
