"""The robot side on its own: a fresh virtual environment with only the base package (no torch,
gymnasium or MuJoCo installed) serves a shipped actor, runs the robot client library against
it, reads the logs, and names the extra to install for each command it cannot run.

Builds the venv from this tree with pip (its cache and the package index must be reachable):
about 25 s here with a warm pip cache.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from loop_helpers import PENDULUM, ROOT, STARTED, wait_for

from control_node.config import free_tcp_endpoint

PACKAGE = ("pyproject.toml", "README.md", "models", "control_node", "sim_bridge", "training")
HEAVY = ("torch", "gymnasium", "mujoco", "minari", "tensorboard", "matplotlib")

CLIENT = """
import json, sys
import numpy as np
from models.spec import RobotSpec
from sim_bridge.client import RobotClient

spec = RobotSpec("InvertedPendulum-v5", (4,), [-3.0], [3.0])
with RobotClient(spec, node=sys.argv[1], bridge_id="arm0", mode="lockstep") as client:
    welcome = client.connect(timeout_s=20)
    obs = np.zeros(4, np.float32)
    client.begin_episode(obs)
    seqs = []
    for i in range(20):
        answer = client.answer(timeout_s=10)
        seqs.append(answer.seq)
        obs = (obs + 0.01 * answer.action[0]).astype(np.float32)
        client.send_step(obs, 1.0, i == 19, False, answer)
print(json.dumps({"model_id": welcome.model_id, "seqs": seqs, "sent": client.transitions_sent}))
"""


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv holding the base install of a copy of this tree (the build writes nothing
    into the working tree)."""
    tmp = tmp_path_factory.mktemp("base")
    src = tmp / "src"
    src.mkdir()
    for name in PACKAGE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    yield venv
    shutil.rmtree(tmp, ignore_errors=True)


def _run(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_the_base_install_holds_no_simulator_nor_trainer(base_venv: Path, tmp_path: Path) -> None:
    code = (
        "import importlib.util, json\n"
        f"print(json.dumps([m for m in {HEAVY!r} if importlib.util.find_spec(m)]))\n"
    )
    done = _run(base_venv, "python", "-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_base_install_serves_a_robot_client_and_reads_its_logs(
    base_venv: Path, tmp_path: Path
) -> None:
    bind, admin, logs = free_tcp_endpoint(), free_tcp_endpoint(), tmp_path / "logs"
    node = subprocess.Popen(
        [str(base_venv / "bin" / "ddpg"), "serve", "--model", str(PENDULUM), "--bind", bind,
         "--admin", admin, "--log-dir", str(logs), "--rate-hz", "100", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    STARTED.append(node)  # killed after the test if it fails
    wait_for(
        "the node's status",
        lambda: (
            _run(base_venv, "ddpg", "status", "--node", admin, "--json", cwd=tmp_path).returncode
            == 0
        ),
        timeout=60,
    )
    (tmp_path / "robot.py").write_text(textwrap.dedent(CLIENT))
    robot = _run(base_venv, "python", str(tmp_path / "robot.py"), bind, cwd=tmp_path)
    assert robot.returncode == 0, robot.stderr
    got = json.loads(robot.stdout)
    assert got["seqs"] == list(range(1, 21)) and got["sent"] == 20
    node.send_signal(signal.SIGTERM)
    out, err = node.communicate(timeout=60)
    assert node.returncode == 0, err
    final = json.loads(out)
    assert final["model_id"] == got["model_id"] and final["transitions_logged"] == 20

    read = _run(base_venv, "ddpg", "logs", str(logs), "--json", cwd=tmp_path)
    assert read.returncode == 0, read.stderr
    summary = json.loads(read.stdout)
    assert summary["transitions"] == 20 and summary["episodes_completed"] == 1
    assert list(summary["models"]) == [got["model_id"]]


@pytest.mark.parametrize(
    ("argv", "extra", "missing"),
    [
        (("train", "--env", "Pendulum-v1", "--steps", "10"), "train", "gymnasium"),
        (("retrain", "--logs", "logs", "--out", "runs/x"), "train", "torch"),
        (("export", "runs/x"), "train", "torch"),
        (("eval", "--help"), "sim", "gymnasium"),
        (("bridge", "--duration", "1"), "sim", "gymnasium"),
        (("logs", ".", "--to-minari", "robot-v0"), "minari", "minari"),
    ],
)
def test_a_command_whose_extra_is_missing_says_which_in_one_line(
    base_venv: Path, tmp_path: Path, argv: tuple[str, ...], extra: str, missing: str
) -> None:
    done = _run(base_venv, "ddpg", *argv, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"ddpg {argv[0]}: error: needs the '{extra}' extra ({missing} is not installed): "
        f"pip install 'ddpg-control[{extra}]'\n"
    )
    assert not (tmp_path / "runs").exists()
