"""``ddpg deploy MODEL.onnx``: hot-swap an actor into a running node, through its admin socket.

The node loads and checks the model off its hot path (the runtime policy's checks, and a match
with the live model's environment, so with every connected bridge) and swaps it in between two
ticks; a refused model leaves the old one serving and the reason is printed. ``--shadow`` runs
the candidate beside the live actor instead (its actions are logged, not sent; ``ddpg status``
shows how far the two disagree); ``--rollback`` returns to the previous model.

The node refuses a model file that is not a regular file or is over ``max_model_mb``, and one
whose measured batch-1 inference or memory does not fit its limits (the reason gives the
figures). Deploying needs the node's admin token, found on its own when run as the node's user
on its machine (``--token-file`` otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from control_node.admin import AdminError, add_address_arguments, admin_address, request

EXAMPLES = """\
examples:
  ddpg deploy runs/retrained/actor.onnx              # the node of ./launch.yaml
  ddpg deploy candidate.onnx --shadow                # run beside the live actor, log both
  ddpg deploy --rollback --node tcp://127.0.0.1:5556
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument("model", type=Path, nargs="?", metavar="MODEL.onnx")
    add_address_arguments(parser)
    parser.add_argument("--shadow", action="store_true", help="run beside the live actor only")
    parser.add_argument("--rollback", action="store_true", help="return to the previous model")
    parser.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        metavar="S",
        help="how long to wait for the node to load, measure and swap in the model (default: "
        "90; the node itself gives up after its deploy_timeout_s, 60 by default)",
    )
    parser.add_argument("--json", action="store_true", help="print the node's answer as JSON")


def run(args: argparse.Namespace) -> int:
    if args.rollback == (args.model is not None):
        print("ddpg deploy: error: give MODEL.onnx or --rollback (one of them)", file=sys.stderr)
        return 2
    if args.model is not None and not args.model.is_file():
        why = "not a regular file" if args.model.exists() else "no such file"
        print(f"ddpg deploy: error: {args.model}: {why}", file=sys.stderr)
        return 1
    try:
        address = admin_address(args.node, args.launch)
        if args.rollback:
            reply = request(address, "rollback", args.timeout, args.token_file)
        else:
            path = str(args.model.resolve())  # the node's working directory may differ
            reply = request(
                address, "deploy", args.timeout, args.token_file, path=path, shadow=args.shadow
            )
    except AdminError as e:
        print(f"ddpg deploy: error: {e}", file=sys.stderr)
        return 1
    deploy = reply["deploy"]
    if args.json:
        print(json.dumps(deploy, indent=2))
    elif deploy.get("rollback"):
        print(f"ddpg deploy: rolled back to {deploy['model_id']} (from {deploy['previous']})")
    elif deploy["shadow"]:
        print(f"ddpg deploy: {deploy['model_id']} runs in shadow beside {deploy['previous']}")
    else:
        print(
            f"ddpg deploy: now serving {deploy['model_id']} (was {deploy['previous']}); loaded "
            f"and swapped {deploy['request_to_swap_ms']:.0f} ms after the request"
        )
    return 0
