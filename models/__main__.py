"""``python -m models ACTOR.onnx``: check an exported actor and print what it says about itself.

The runtime policy's own checks (the ones the node runs before a model serves), then its
metadata: the robot it was exported for, its run and its model id. ``--json`` prints the
metadata as JSON. Exporting a run is ``ddpg export`` (the run directory is training's).
"""

from __future__ import annotations

import argparse
import json
import sys

from models.policy import OnnxPolicy, PolicyError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    parser.add_argument("model", metavar="ACTOR.onnx", help="an actor exported by ddpg export")
    parser.add_argument("--json", action="store_true", help="print the metadata as JSON")
    args = parser.parse_args(argv)
    try:
        meta = OnnxPolicy(args.model).metadata
    except PolicyError as e:
        print(f"python -m models: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(meta.to_dict(), indent=2))
        return 0
    robot = meta.robot
    pixels = "state" if robot.pixels is None else json.dumps(robot.pixels.to_dict())
    print(
        f"{args.model}: model {meta.model_id}, env {robot.env_id}, obs {robot.obs_dtype} "
        f"{list(robot.obs_shape)} ({pixels}), action bounds {robot.act_low.tolist()}.."
        f"{robot.act_high.tolist()}; {meta.preset} run {meta.run_name!r}, {meta.train_steps} "
        f"steps, seed {meta.seed}; checks passed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
