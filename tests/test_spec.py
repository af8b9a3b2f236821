"""The robot spec (models/spec.py): one form that the actor, the bridge, the launch file and the
checks share, importable without the simulator or torch."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from control_node.argv import pixel_flags
from control_node.config import BridgeConfig, ConfigError, from_mapping
from models.policy import OnnxPolicy, PolicyError, check_expected
from models.spec import SUGGESTED_VIEWS, PixelSpec, RobotSpec
from sim_bridge.bridge_cli import add_arguments as bridge_arguments
from sim_bridge.bridge_cli import bridge_config
from sim_bridge.envs import env_spec, make_env
from sim_bridge.pixels import make_pixel_env

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "models" / "zoo"


def test_an_env_names_its_robot_spec_state_and_pixels() -> None:
    env = make_env("InvertedPendulum-v5")
    state = env_spec("InvertedPendulum-v5", env)
    env.close()
    assert (state.obs_shape, state.obs_dtype, state.pixels, state.act_dim) == (
        (4,),
        "float32",
        None,
        1,
    )
    assert state.act_low.dtype == np.float32 and state.obs_dim == 4
    pixels = PixelSpec(size=16, stack=2, repeat=2)
    env = make_pixel_env("InvertedPendulum-v5", pixels)
    seen = env_spec("InvertedPendulum-v5", env)
    env.close()
    assert (seen.obs_shape, seen.obs_dtype, seen.pixels) == ((6, 16, 16), "uint8", pixels)


def test_an_actor_carries_the_robot_spec_it_was_exported_for() -> None:
    meta = OnnxPolicy(ZOO / "inverted_pendulum_pixels" / "actor.onnx").metadata
    robot = meta.robot
    assert robot.pixels == PixelSpec() and robot.obs_shape == PixelSpec().obs_shape
    check_expected(meta, robot, "model")  # its own spec fits
    other = RobotSpec(robot.env_id, robot.obs_shape, robot.act_low, robot.act_high, "uint8",
                      PixelSpec(repeat=2))  # fmt: skip
    with pytest.raises(PolicyError, match="repeat 3 != 2"):
        check_expected(meta, other, "model")
    state = RobotSpec(robot.env_id, (4,), robot.act_low, robot.act_high)
    with pytest.raises(PolicyError, match="model observations are uint8"):
        check_expected(meta, state, "model")


def test_the_launch_files_pixel_section_is_the_pixel_spec() -> None:
    cfg = from_mapping(BridgeConfig, {"pixels": {"size": 32, "camera": "track"}}, "bridge")
    assert cfg.pixels == PixelSpec(size=32, camera="track")
    for bad, words in (
        ({"stack": 0}, "bridge.pixels.stack must be in 1..16, got 0"),
        ({"camera": -2}, "bridge.pixels.camera id must be >= -1"),
        ({"size": "64"}, "bridge.pixels.size = '64': expected int"),
        ({"view": "distance=2"}, "bridge.pixels.view 'distance=2' lacks azimuth"),
    ):
        with pytest.raises(ConfigError) as e:
            from_mapping(BridgeConfig, {"pixels": bad}, "bridge")
        assert words in str(e.value), e.value


def test_a_launch_files_view_reaches_the_bridge_through_its_flags() -> None:
    """The launcher starts each bridge with flags written from its pixel spec; the bridge
    reads them back into the same spec, view included (a view holds spaces: one argument)."""
    side = str(SUGGESTED_VIEWS["InvertedPendulum-v5"])
    launch = from_mapping(BridgeConfig, {"pixels": {"repeat": 2, "view": side}}, "bridge")
    flags = pixel_flags(launch.pixels)
    assert flags[flags.index("--view") + 1] == side
    parser = argparse.ArgumentParser()
    bridge_arguments(parser)
    assert bridge_config(parser.parse_args(flags)).pixels == launch.pixels
