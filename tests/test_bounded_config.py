"""Hostile config files are refused quickly, in one short line, with little memory.

The probe these pin down (issue 15, finding 5): a 301-byte alias bomb in launch.yaml took
``ddpg launch`` 79 s and 8.8 GB to print a 2 GB one-line error (the offending value's whole
repr); a 50 MB list parsed for minutes; a run's config.yaml with non-string keys raised a bare
TypeError. Every YAML file is now read by ``read_yaml``: a regular file of at most
MAX_YAML_BYTES, aliases expanded to at most MAX_YAML_VALUES values, values quoted by ``brief``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from loop_helpers import DDPG, ENV, PENDULUM, write_launch

from control_node.config import (
    BRIEF_CHARS,
    MAX_YAML_BYTES,
    MAX_YAML_VALUES,
    ConfigError,
    LaunchConfig,
    brief,
    from_mapping,
    load_launch,
)
from training.config import load_config, make_config

ZOO = PENDULUM.parent


def bomb(key: str, levels: int = 9) -> str:
    """``key: [&a [x * 9], &b [*a * 9], ...]``: about 300 bytes that stand for 9**9 values."""
    names = "abcdefghijklmnop"[:levels]
    parts = [f"&a [{','.join(['x'] * 9)}]"]
    parts += [f"&{c} [{','.join(['*' + p] * 9)}]" for p, c in itertools.pairwise(names)]
    return f"{key}: [{', '.join(parts)}]\n"


def refused(path: Path, load=load_launch) -> str:  # type: ignore[no-untyped-def]
    """The one-line message ``load`` refuses ``path`` with, checked to take little memory."""
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as e:
            load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message[:1000]
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB to refuse {path}"
    return message


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    path = tmp_path / "launch.yaml"
    path.write_text(f"node: {{model: {PENDULUM}}}\n" + bomb("duration_s"))
    assert path.stat().st_size < 400
    assert f"expands to more than {MAX_YAML_VALUES} values" in refused(path)


def test_a_value_that_contains_itself_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "launch.yaml"
    path.write_text(f"node: {{model: {PENDULUM}}}\nbridges: &b [*b]\n")
    assert "expands to more than" in refused(path)


def test_aliases_within_the_budget_still_work(tmp_path: Path) -> None:
    node = json.loads(write_launch(tmp_path).read_text())["node"]
    rt = "{sched_policy: other, lock_memory: false}"
    path = tmp_path / "anchored.yaml"
    path.write_text(
        f"node: {json.dumps(node)}\nbridges:\n  - {{id: a, realtime: &rt {rt}}}\n"
        "  - {id: b, realtime: *rt}\n"
    )
    cfg = load_launch(path, check_ports=False)
    assert [b.realtime.sched_policy for b in cfg.bridges] == ["other", "other"]
    assert [b.realtime.sched_priority for b in cfg.bridges] == [40, 40]


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "launch.yaml"
    with path.open("w") as f:
        f.write(f"node: {{model: {PENDULUM}}}\nbridges: [")
        f.write("1," * 25_000_000 + "1]\n")  # 50 MB: libyaml alone would take over a minute
    t0 = time.monotonic()
    message = refused(path)
    assert f"a config file is at most {MAX_YAML_BYTES}" in message
    assert time.monotonic() - t0 < 5.0


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "launch.yaml"
    os.mkfifo(fifo)
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(refused(fifo)), daemon=True)
    reader.start()
    reader.join(5.0)
    if reader.is_alive():  # unblock it: open the FIFO's other end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO as launch.yaml blocked")
    assert result == [f"{fifo}: not a regular file"]
    assert refused(Path("/dev/zero")) == "/dev/zero: not a regular file"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("x" * 200_000, "node.bind = 'xxxx"),
        (list(range(50_000)), "node.bind = [0, 1, 2, 3, ...]: expected str"),
        ({f"k{i}": i for i in range(50_000)}, "node.bind = {'k0': 0, 'k1': 1"),
    ],
)
def test_wrong_values_are_quoted_briefly(value: object, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_mapping(LaunchConfig, {"node": {"model": "m.onnx", "bind": value}})
    assert words in str(e.value) and len(str(e.value)) < 200, str(e.value)[:500]


def test_an_unknown_key_is_quoted_briefly() -> None:
    with pytest.raises(ConfigError) as e:
        from_mapping(LaunchConfig, {"node": {"model": "m.onnx"}, "k" * 100_000: 1})
    assert str(e.value).startswith("'kkkk") and len(str(e.value)) < 200


def test_brief_is_short_and_cheap_for_any_value() -> None:
    nested: list[object] = [0]
    for _ in range(30):  # 2**30 leaves by reference: a full repr would never finish
        nested = [nested, nested]
    for value in ("y" * 10**6, nested, 10**4000, {i: [i] * 1000 for i in range(1000)}):
        assert len(brief(value)) <= BRIEF_CHARS
    assert brief("fast") == "'fast'" and brief(5) == "5"


# -- a run's config.yaml: the trainer's ConfigError is the one ConfigError ----------------------
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("1: 2\nenv: Pendulum-v1\n", "key 1 is int, not a name"),
        ("actor_lr: fast\n", "actor_lr = 'fast' is not a valid float"),
        ("- a\n- b\n", "expected a mapping of config keys, got list"),
        ("env: [unclosed\n", "not valid YAML"),
        ("env: \x00\n", "not valid YAML"),
        ("env: " + "9" * 5000 + "\n", "not a usable YAML config"),
        (bomb("actor_hidden"), f"expands to more than {MAX_YAML_VALUES} values"),
        ("actor_hidden: [" + "7," * 200_000 + "7]\n", "a config file is at most"),
    ],
)
def test_a_malformed_run_config_raises_the_one_config_error(
    tmp_path: Path, text: str, words: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    message = refused(path, load=load_config)
    assert message.startswith(f"{path}: ") and words in message, message


def test_make_config_quotes_a_huge_value_briefly() -> None:
    with pytest.raises(ConfigError) as e:
        make_config(None, env="Pendulum-v1", actor_hidden="1," * 100_000 + "x")
    assert "actor_hidden = ['1', '1', '1', '1', ...] is not" in str(e.value), e.value


# -- ddpg launch: a malformed continual init is one line, with and without --continual -----------
def init_run(tmp_path: Path, config: str) -> Path:
    init = tmp_path / "init"
    init.mkdir()
    for name in ("checkpoint.pt", "actor.onnx"):
        (init / name).symlink_to(ZOO / name)
    (init / "config.yaml").write_text(config)
    return init


@pytest.mark.parametrize(
    ("config", "continual", "words"),
    [
        ("1: 2\n", False, "config.yaml: key 1 is int, not a name"),
        ("1: 2\n", True, "config.yaml: key 1 is int, not a name"),
        (bomb("env"), False, "config.yaml: expands to more than"),
        ("- just a list\n", True, "config.yaml: expected a mapping of config keys, got list"),
    ],
)
def test_ddpg_launch_refuses_a_malformed_init_in_one_line(
    tmp_path: Path, config: str, continual: bool, words: str
) -> None:
    init = init_run(tmp_path, config)
    launch = write_launch(tmp_path, continual={"init": str(init), "out_dir": str(tmp_path / "c")})
    flags = ["--continual"] if continual else []
    done = subprocess.run(
        [*DDPG, "launch", str(launch), "--duration", "5", "--quiet", *flags],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpg launch: error: "), done.stderr
    assert words in lines[0], lines[0]
