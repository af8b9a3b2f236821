"""The ``ddpg`` command: a thin dispatcher over the packages' own command modules.

Each subcommand lives in the package that owns it and is imported only when it runs, so
``ddpg serve`` never pays for (or imports) torch. A command module provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.cli", "train DDPG on a Gymnasium environment from state"),
    "export": ("training.export_cli", "export a run's actor to ONNX (checked for parity)"),
    "eval": ("training.eval_cli", "run an ONNX actor in the simulator and report returns"),
    "serve": ("control_node.serve_cli", "serve an ONNX actor to bridges at a fixed rate, logging"),
    "bridge": ("sim_bridge.bridge_cli", "run a Gymnasium MuJoCo environment as a robot"),
    "launch": ("control_node.launch", "start a node and its bridges from launch.yaml"),
    "status": ("control_node.admin_cli", "show a running node's status (--watch: live view)"),
    "logs": ("control_node.logs_cli", "summarise a transition log directory"),
    "retrain": ("training.retrain_cli", "continue DDPG from logged transitions; export the actor"),
    "deploy": ("control_node.deploy_cli", "hot-swap a new actor into a running node"),
    "doctor": ("control_node.doctor", "what this machine allows for real-time control"),
}


# A module an optional extra installs -> that extra (pyproject.toml). The base install is the
# robot side; a command that needs more stops with one line naming what to install.
EXTRAS: dict[str, str] = {
    "gymnasium": "sim",
    "mujoco": "sim",
    "imageio": "sim",
    "imageio_ffmpeg": "sim",
    "torch": "train",
    "onnxscript": "train",
    "tensorboard": "train",
    "matplotlib": "train",
    "tqdm": "train",
    "minari": "minari",
}


# The extra each command needs (train implies sim): named whole, so one install is enough.
COMMAND_EXTRAS: dict[str, str] = {
    "train": "train",
    "export": "train",
    "retrain": "train",
    "eval": "sim",
    "bridge": "sim",
}
IMPLIES: dict[str, tuple[str, ...]] = {"train": ("train", "sim"), "sim": ("sim",)}


def missing_extra(command: str, error: ModuleNotFoundError) -> str | None:
    """The extra to install for ``command`` when the module ``error`` names is missing: the
    command's own when it covers that module, else the module's (minari for ``--minari``);
    None for a module no extra installs."""
    extra = EXTRAS.get((error.name or "").partition(".")[0])
    needed = COMMAND_EXTRAS.get(command)
    if extra is not None and needed is not None and extra in IMPLIES[needed]:
        return needed
    return extra


def _extra_line(command: str, error: ModuleNotFoundError, extra: str) -> str:
    return (
        f"ddpg {command}: error: needs the '{extra}' extra ({error.name} is not installed): "
        f"pip install 'ddpg-control[{extra}]'"
    )


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (the usage is in --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: ddpg COMMAND [options]   (ddpg COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"ddpg: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module_name, summary = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        parser = OneLineParser(
            prog=f"ddpg {name}",
            description=summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.run(args) or 0)
    except ModuleNotFoundError as e:
        extra = missing_extra(name, e)
        if extra is None:
            raise
        print(_extra_line(name, e, extra), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
