"""The robot spec: what an actor sees and does, defined once for every part of the stack.

A :class:`RobotSpec` names the environment, the observation (shape and dtype) and the action
bounds, and, for a robot that sends rendered frames, its :class:`PixelSpec` (frame size, frames
stacked, action repeat, camera or view). The exported actor's metadata carries it; the bridge's hello,
the transition log's schema, the launch checks, the deploy checks and the trainer all read and
compare this one form. Importing this module loads numpy only: no gymnasium, MuJoCo or torch,
so the node can validate a pixel launch file without the simulator stack.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

MIN_SIZE, MAX_SIZE = 16, 256
MAX_STACK, MAX_REPEAT = 16, 16
PIXEL_KEYS = ("size", "stack", "repeat", "camera", "view")
OBS_DTYPES = {"float32": np.float32, "uint8": np.uint8}
"""Observation dtypes: float32 for state robots, uint8 for pixel robots (frames 0..255)."""


class FreeView(NamedTuple):
    """A pose of MuJoCo's free camera, for a robot whose model has no camera that sees it well.

    Its text form, ``distance=D azimuth=A elevation=E lookat=X,Y,Z`` (metres and degrees), is
    what a :class:`PixelSpec` stores and what ``--view`` takes: one canonical string, so two
    specs with the same view compare equal in metadata, hellos and log schemas."""

    distance: float
    azimuth: float
    elevation: float
    lookat: tuple[float, float, float]

    @classmethod
    def parse(cls, text: str) -> FreeView:
        """The view ``text`` describes; ValueError naming what is wrong."""
        fields = dict.fromkeys(cls._fields, "")
        for part in str(text).split():
            key, sep, value = part.partition("=")
            if not sep or key not in fields:
                raise ValueError(
                    f"pixel spec: view {text!r}: {part!r} is not one of "
                    f"{', '.join(f'{k}=...' for k in cls._fields)}"
                )
            fields[key] = value
        missing = [k for k, v in fields.items() if not v]
        if missing:
            raise ValueError(
                f"pixel spec: view {text!r} lacks {', '.join(missing)} "
                "(e.g. 'distance=2.6 azimuth=90 elevation=0 lookat=0,0,0.3')"
            )
        lookat = tuple(_view_number(text, "lookat", v) for v in fields["lookat"].split(","))
        if len(lookat) != 3:
            raise ValueError(f"pixel spec: view {text!r}: lookat needs 3 numbers, X,Y,Z")
        view = cls(
            _view_number(text, "distance", fields["distance"]),
            _view_number(text, "azimuth", fields["azimuth"]),
            _view_number(text, "elevation", fields["elevation"]),
            (lookat[0], lookat[1], lookat[2]),
        )
        if not view.distance > 0:
            raise ValueError(f"pixel spec: view {text!r}: distance must be > 0")
        if not -90 <= view.elevation <= 90:
            raise ValueError(f"pixel spec: view {text!r}: elevation must be in -90..90 degrees")
        return view

    def __str__(self) -> str:
        x, y, z = self.lookat
        return (
            f"distance={self.distance:g} azimuth={self.azimuth:g} "
            f"elevation={self.elevation:g} lookat={x:g},{y:g},{z:g}"
        )

    def camera_config(self) -> dict[str, Any]:
        """Gymnasium's ``default_camera_config`` for this pose (MuJoCo ``mjvCamera`` fields)."""
        return {
            "distance": self.distance,
            "azimuth": self.azimuth,
            "elevation": self.elevation,
            "lookat": np.array(self.lookat, dtype=np.float64),
        }


def _view_number(text: str, key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"pixel spec: view {text!r}: {key} {value!r} is not a finite number")
    return number


SUGGESTED_VIEWS: dict[str, FreeView] = {
    # Gymnasium's default looks down at 45 degrees from 2.04 m, so an upright pole off the
    # middle of the rail looks tilted in the frame: 8.1 degrees at x = 0.3, 16.7 at 0.6, past
    # the 11.5 (0.2 rad) at which the episode ends, and the cart leaves the frame beyond
    # |x| = 0.9. Pixel actors trained there drifted to x = 0.45 and fell. Level and from 2.6 m,
    # the whole rail is in the frame and the pole's angle is its true one (0.0 at every x).
    "InvertedPendulum-v5": FreeView(2.6, 90.0, 0.0, (0.0, 0.0, 0.3)),
}
"""The view a new pixel run takes for these environments unless it names a camera or view."""


@dataclass(frozen=True)
class PixelSpec:
    """What a pixel policy was trained on; stored with the exported actor so serving matches.

    64 pixels as in the paper (84 as in DQN/DrQ); frames are stacked because velocity is not
    visible in one frame. A bad value raises ValueError("pixel spec: FIELD ..."), naming the
    field; the launch file's ``pixels:`` section is this class (``control_node.config``)."""

    size: int = 64
    """Square frame side in pixels (16..256), rendered natively by MuJoCo."""
    stack: int = 3
    """Frames per observation, oldest first: the observation is (3 * stack, size, size) uint8."""
    repeat: int = 3
    """Physics steps per bridge step (action repeat): rate_hz counts bridge steps."""
    camera: str | int | None = None
    """MuJoCo camera name or id (-1: the free camera); null keeps the environment's default."""
    view: str | None = None
    """The free camera's pose, 'distance=D azimuth=A elevation=E lookat=X,Y,Z' (metres,
    degrees); null keeps the environment's default. Not with a fixed camera."""

    def __post_init__(self) -> None:
        # numpy integers are accepted and stored as int, so shapes and metadata stay plain
        object.__setattr__(self, "size", _check_int("size", self.size, MIN_SIZE, MAX_SIZE))
        object.__setattr__(self, "stack", _check_int("stack", self.stack, 1, MAX_STACK))
        object.__setattr__(self, "repeat", _check_int("repeat", self.repeat, 1, MAX_REPEAT))
        if self.view is not None:
            if not isinstance(self.view, str):
                raise ValueError(f"pixel spec: view must be a string, got {self.view!r}")
            object.__setattr__(self, "view", str(FreeView.parse(self.view)))
        cam = self.camera
        if cam is None:
            return
        if isinstance(cam, str):
            if not cam:
                raise ValueError("pixel spec: camera must be a non-empty name, an id, or None")
        elif isinstance(cam, bool) or not isinstance(cam, int | np.integer):
            raise ValueError(
                f"pixel spec: camera must be a name, an id or None, got {type(cam).__name__}"
            )
        elif cam < -1:
            raise ValueError(f"pixel spec: camera id must be >= -1 (free camera), got {cam}")
        else:
            object.__setattr__(self, "camera", int(cam))
        if self.view is not None and self.camera != -1:
            raise ValueError(
                f"pixel spec: camera {self.camera!r} is a fixed camera with its own pose; a "
                "view sets the free camera's (camera null or -1)"
            )

    @property
    def free_view(self) -> FreeView | None:
        """The free camera's pose, when the spec sets one."""
        return None if self.view is None else FreeView.parse(self.view)

    @property
    def obs_shape(self) -> tuple[int, int, int]:
        """Channel-first stacked frames, oldest first: ``(3 * stack, size, size)``."""
        return (3 * self.stack, self.size, self.size)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """One channel-first RGB frame: ``(3, size, size)``."""
        return (3, self.size, self.size)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for checkpoints, ONNX metadata and the hello message. Without a
        view the key is left out: a spec is then byte for byte what it was before views."""
        d = asdict(self)
        if d["view"] is None:
            del d["view"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PixelSpec:
        """Inverse of ``to_dict``; an unknown key is an error (a typo must not pass silently)."""
        unknown = sorted(set(d) - set(PIXEL_KEYS), key=str)
        if unknown:
            raise ValueError(f"pixel spec: unknown key(s) {unknown}; known: {sorted(PIXEL_KEYS)}")
        return cls(**dict(d))


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"pixel spec: {name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"pixel spec: {name} must be in {lo}..{hi}, got {value}")
    return int(value)


def pixel_differences(
    ours: Mapping[str, Any] | None, theirs: Mapping[str, Any] | None
) -> list[str]:
    """What differs between two pixel specs (dicts as ``PixelSpec.to_dict`` writes them; None
    for state observations), as 'key A != B' strings; empty when they match. A missing
    ``camera`` is the default camera (None). Dicts, not specs: one side is often what a peer
    sent, and its differences are worth naming even where it is not a valid spec. A missing
    ``view`` is none (the environment's default)."""
    if ours is None or theirs is None:
        if ours is None and theirs is None:
            return []
        return [f"pixels {_describe_pixels(ours)} != {_describe_pixels(theirs)}"]
    keys = [*PIXEL_KEYS, *sorted(set(ours) - set(PIXEL_KEYS), key=str)]
    keys += sorted(set(theirs) - set(keys), key=str)
    return [
        f"{k} {ours.get(k)!r} != {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)
    ]


def _describe_pixels(spec: Mapping[str, Any] | None) -> str:
    return "none (state observations)" if spec is None else json.dumps(dict(spec))


def pixels_dict(pixels: PixelSpec | None) -> dict[str, Any] | None:
    """``pixels.to_dict()``, or None for state observations."""
    return None if pixels is None else pixels.to_dict()


class StoredSpec(Protocol):
    """A robot spec as files store it (an actor's metadata, a log chunk's schema): the pixel
    spec as JSON, "" for state observations."""

    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: str
    pixels: str

    @property
    def act_low(self) -> Any: ...

    @property
    def act_high(self) -> Any: ...


@dataclass(frozen=True, eq=False)
class RobotSpec:
    """What a robot (or a simulator acting as one) sends and takes; what an actor expects.

    No ``==``: the bounds are arrays; ``models.policy.check_expected`` says what differs."""

    env_id: str
    """The environment the actor was trained on (a Gymnasium id)."""
    obs_shape: tuple[int, ...]
    """One observation's shape: (obs_dim,) for state, (3 * stack, size, size) for pixels."""
    act_low: np.ndarray
    """Lower action bounds, float32, one per action dimension."""
    act_high: np.ndarray
    """Upper action bounds, float32."""
    obs_dtype: str = "float32"
    """'float32' for state observations, 'uint8' for stacked frames."""
    pixels: PixelSpec | None = None
    """The pixel pipeline of a pixel robot; None for state observations."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "obs_shape", tuple(int(d) for d in self.obs_shape))
        object.__setattr__(self, "act_low", np.asarray(self.act_low, dtype=np.float32))
        object.__setattr__(self, "act_high", np.asarray(self.act_high, dtype=np.float32))

    @property
    def obs_dim(self) -> int:
        """Values per observation (the flattened size)."""
        return math.prod(self.obs_shape)

    @property
    def act_dim(self) -> int:
        return int(self.act_low.size)

    @classmethod
    def from_stored(cls, stored: StoredSpec) -> RobotSpec:
        """The spec a file stores (``ActorMetadata``, ``LogSpec``); ValueError for a pixel spec
        that is not valid."""
        pixels = json.loads(stored.pixels) if stored.pixels else None
        return cls(
            stored.env_id,
            stored.obs_shape,
            stored.act_low,
            stored.act_high,
            stored.obs_dtype,
            None if pixels is None else PixelSpec.from_dict(pixels),
        )
