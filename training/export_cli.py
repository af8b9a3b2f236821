"""``ddpg export RUN_DIR``: the run's actor as ``actor.onnx``, checked for parity before writing.

This module knows the run directory layout (``config.yaml``, ``checkpoint.pt``); the export
itself (graph, metadata, parity) is :func:`models.export.export_actor`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.export import ExportReport

EXAMPLES = """\
examples:
  ddpg export runs/pendulum                      # writes runs/pendulum/actor.onnx
  ddpg export runs/pendulum --out /tmp/pend.onnx --json
"""


def export_run(
    run_dir: Path,
    out: Path | None = None,
    probes: int | None = None,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Export the actor in ``run_dir/checkpoint.pt`` to ``out`` (default ``run_dir/actor.onnx``);
    logs one line with the model id and parity and returns the path. Raises ConfigError (not a
    run dir), EnvError, or ExportError (parity or checks failed; nothing written)."""
    report = export_run_report(run_dir, out, probes)
    if log is not None:
        log(_describe(report))
    return report.path


def _describe(report: ExportReport) -> str:
    return (
        f"exported {report.path} (model id {report.model_id}, {report.size_bytes} bytes); "
        f"parity max |onnx - torch| = {report.max_abs_diff:.2e} on {report.probes} probes "
        f"(bound {report.tolerance:.2e})"
    )


def export_run_report(
    run_dir: Path, out: Path | None = None, probes: int | None = None
) -> ExportReport:
    """:func:`export_run`, returning the export report."""
    from models.export import PARITY_PROBES, export_actor
    from sim_bridge.envs import env_spec, make_env
    from training.agent import build_networks
    from training.config import ConfigError, load_config
    from training.trainer import eval_seed, read_checkpoint

    run_dir = Path(run_dir)
    cfg_path, ckpt_path = run_dir / "config.yaml", run_dir / "checkpoint.pt"
    for p in (cfg_path, ckpt_path):
        if not p.exists():
            raise ConfigError(f"{run_dir} is not a run directory: {p.name} is missing")
    cfg = load_config(cfg_path)
    state = read_checkpoint(ckpt_path)
    env = make_env(cfg.env)  # the spaces only: a pixel run's frames need no rendering here
    try:
        spec = env_spec(cfg.env, env)
        space = env.observation_space
    finally:
        env.close()
    pixel_spec = cfg.pixel_spec()
    obs_shape = pixel_spec.obs_shape if pixel_spec is not None else spec.obs_shape
    actor, _ = build_networks(cfg, obs_shape, spec.act_low, spec.act_high)
    try:
        actor.load_state_dict(state["agent"]["actor"])
    except (KeyError, RuntimeError) as e:
        raise ConfigError(f"{ckpt_path}: actor weights do not fit the run's config: {e}") from None
    if pixel_spec is not None:
        bounds = {"obs_low": [0.0], "obs_high": [255.0], "pixels": json.dumps(pixel_spec.to_dict())}
    else:
        bounds = {"obs_low": space.low.reshape(-1), "obs_high": space.high.reshape(-1)}
    path = Path(out) if out is not None else run_dir / "actor.onnx"
    return export_actor(
        actor,
        path,
        probes=probes or PARITY_PROBES,
        env_id=cfg.env,
        act_low=spec.act_low,
        act_high=spec.act_high,
        preset=cfg.preset,
        run_name=run_dir.resolve().name,
        train_steps=int(state["step"]),
        seed=cfg.seed,
        eval_seed=eval_seed(cfg),
        **bounds,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a ddpg train run directory")
    parser.add_argument(
        "--out", type=Path, metavar="PATH", help="where to write (default: RUN_DIR/actor.onnx)"
    )
    parser.add_argument(
        "--probes",
        type=int,
        default=None,
        metavar="N",
        help="probe observations for the parity check (default: 1024; at least 1000)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary to stdout")


def run(args: argparse.Namespace) -> int:
    from models.export import ExportError
    from models.policy import OnnxPolicy, PolicyError
    from sim_bridge.envs import EnvError
    from training.config import ConfigError

    try:
        report = export_run_report(args.run_dir, args.out, args.probes)
        meta = OnnxPolicy(report.path).metadata
    except (ConfigError, EnvError, ExportError, PolicyError) as e:
        print(f"ddpg export: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        summary = {
            "path": str(report.path),
            "size_bytes": report.size_bytes,
            "parity_max_abs_diff": report.max_abs_diff,
            "parity_probes": report.probes,
            "nodes": report.nodes,
            "metadata": meta.to_dict(),
        }
        print(json.dumps(summary, indent=2))
    else:
        print(_describe(report))
    return 0
