"""Continual mode's init run: the launch checks its exported actor, and the continual trainer
(``python -m training.continual``) its config, each refusing in one line; with ``--continual``
the launch runs that check (``--check``) before it starts anything.

The bug these pin down: a malformed ``continual.init`` config.yaml raised the trainer's own
ConfigError inside the launch check, which only caught the launcher's, so ``ddpg launch`` (and
the continual process) stopped with a traceback. There is one ConfigError now, and the launch
check reads the init run's actor.onnx, as it reads the served model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from loop_helpers import DDPG, ENV, PENDULUM, write_launch

from control_node.config import ConfigError, load_launch

ZOO = PENDULUM.parent
BAD_VALUE = "actor_lr = 'fast' is not a valid float"


def init_run(tmp_path: Path, *, config: str | None, actor: bool = True) -> Path:
    """A copy of the shipped run (links to its files), its config.yaml replaced by ``config``."""
    init = tmp_path / "init"
    init.mkdir()
    for name in ("checkpoint.pt", "actor.onnx") if actor else ("checkpoint.pt",):
        (init / name).symlink_to(ZOO / name)
    (init / "config.yaml").write_text(
        config if config is not None else (ZOO / "config.yaml").read_text()
    )
    return init


def continual_launch(tmp_path: Path, init: Path) -> Path:
    return write_launch(
        tmp_path,
        continual={"enabled": True, "init": str(init), "out_dir": str(tmp_path / "continual")},
    )


MALFORMED = "env: InvertedPendulum-v5\nactor_lr: fast\n"


def test_the_launch_check_reads_the_init_actor_not_its_config(tmp_path: Path) -> None:
    # the config is the continual trainer's to read; the launch loads whatever it says
    launch = continual_launch(tmp_path, init_run(tmp_path, config=MALFORMED))
    cfg = load_launch(launch, check_ports=False)
    assert cfg.continual.init == str(tmp_path / "init")


@pytest.mark.parametrize(
    ("defect", "words"),
    [
        ("no_actor", "no actor.onnx in {init}; export it with: ddpg export {init}"),
        ("garbage_actor", "actor.onnx: not an exported actor"),
    ],
)
def test_an_init_run_without_a_usable_actor_is_refused_in_one_line(
    tmp_path: Path, defect: str, words: str
) -> None:
    init = init_run(tmp_path, config=None, actor=defect != "no_actor")
    if defect == "garbage_actor":
        (init / "actor.onnx").unlink()
        (init / "actor.onnx").write_bytes(b"not a model")
    with pytest.raises(ConfigError) as e:
        load_launch(continual_launch(tmp_path, init), check_ports=False)
    assert words.format(init=init) in str(e.value), e.value
    assert "continual.init = " in str(e.value) and "\n" not in str(e.value)


def test_a_malformed_init_config_stops_the_continual_trainer_in_one_line(tmp_path: Path) -> None:
    init = init_run(tmp_path, config=MALFORMED)
    done = subprocess.run(
        [sys.executable, "-m", "training.continual", str(continual_launch(tmp_path, init))],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == f"continual: error: {init / 'config.yaml'}: {BAD_VALUE}"
    assert not (tmp_path / "continual").exists()  # stopped before its first round


def test_ddpg_launch_with_a_malformed_init_config_refuses_in_one_line(tmp_path: Path) -> None:
    # --continual: the launch runs the trainer's own check first, so nothing starts at all
    init = init_run(tmp_path, config=MALFORMED)
    done = subprocess.run(
        [*DDPG, "launch", str(continual_launch(tmp_path, init)), "--duration", "8", "--quiet"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        f"ddpg launch: error: continual mode: {init / 'config.yaml'}: {BAD_VALUE}"
    ), done.stderr
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").iterdir())
