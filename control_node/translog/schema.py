"""The transition log's layout: what a chunk holds and how its files are named.

Each chunk carries the log's :class:`LogSpec` and its schema version in its schema metadata, so
``pandas.read_parquet(chunk)`` reads it without this package, and the reader can refuse to mix
robots. A :class:`Transition` is one row as the node hands it to the writer.

**Pixel logs** (a spec with ``pixels``, schema version 2) store each frame once. A stacked
observation shares ``stack - 1`` frames with the one before it, and ``next_obs`` all but its
newest frame with ``obs``; so a row holds ``frame``, the newest frame of ``next_obs``, and
``obs``, the whole stack, only on the first row of a segment: a run of consecutive steps of one
episode of one bridge session within one chunk (an episode's first logged step, the step after a
gap, and the first row of each bridge in each chunk, so that every chunk decodes on its own: a
lost or unreadable chunk costs only its rows, and any subset of chunks can be read). There is no
``next_obs`` column. :func:`control_node.translog.reader.read_pixel_segments` rebuilds the stacks
bit for bit; see ``docs/transition_log.md`` for the layout and a pandas recipe. State logs
(version 1) are written exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from models.spec import RobotSpec

SCHEMA_VERSION = 1
"""The state layout: obs and next_obs on every row. Still what state logs are written as."""
PIXEL_SCHEMA_VERSION = 2
"""The pixel layout: a frame per row, the full stack where a segment starts (version-1 readers
refuse these chunks rather than misread them)."""

# A log directory holds committed chunks, chunk-<utc>-<pid>-<seq>.parquet, and the writer's
# temp files, .tmp-<pid>-<seq>.parquet, until it renames them.
CHUNK_PREFIX = "chunk-"
TMP_PREFIX = ".tmp-"
SUFFIX = ".parquet"

_META = "ddpg."
_PID = _META + "writer_pid"
_DIGEST = _META + "spec_sha256"
"""SHA-256 of the other ddpg.* metadata: a flipped bit in the footer's spec (which Parquet's
page checksums do not cover) makes the chunk unreadable rather than another robot's log."""


class LogError(ValueError):
    """A log directory cannot be used as asked (another robot's log, missing, bad metadata)."""


@dataclass(frozen=True)
class LogSpec:
    """What every row of a log directory shares; stored in each chunk's Parquet schema metadata."""

    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: str  # a numpy dtype name: "float32" for state, "uint8" for pixels
    act_low: tuple[float, ...]
    act_high: tuple[float, ...]
    pixels: str = ""
    """Pixel logs: the pixel spec as JSON (size, stack, repeat, camera, view; normalised to sorted
    keys); "" for the state layout."""

    def __post_init__(self) -> None:
        # Normalise (lists, numpy scalars, dtype objects) so that specs compare and serialise
        # exactly, and refuse what the schema cannot hold before any file is written.
        try:
            shape = tuple(int(d) for d in self.obs_shape)
            dtype = np.dtype(self.obs_dtype)
            low = tuple(float(v) for v in self.act_low)
            high = tuple(float(v) for v in self.act_high)
        except (TypeError, ValueError) as e:
            raise LogError(f"bad log spec: {e}") from e
        if not isinstance(self.env_id, str) or not self.env_id:
            raise LogError(f"bad log spec: env_id {self.env_id!r} must be a non-empty string")
        if any(d < 1 for d in shape):
            raise LogError(f"bad log spec: obs_shape {shape} has a dimension below 1")
        if dtype.kind not in "biuf" or dtype.byteorder == ">":
            raise LogError(f"bad log spec: obs_dtype {dtype} is not a native numeric dtype")
        if not low or len(low) != len(high):
            raise LogError(f"bad log spec: act_low {low} and act_high {high} differ in length")
        if not all(math.isfinite(v) for v in low + high) or any(
            lo > hi for lo, hi in zip(low, high, strict=True)
        ):
            raise LogError(f"bad log spec: action bounds {low}..{high} must be finite, low <= high")
        object.__setattr__(self, "obs_shape", shape)
        object.__setattr__(self, "obs_dtype", dtype.name)
        object.__setattr__(self, "act_low", low)
        object.__setattr__(self, "act_high", high)
        if self.pixels:
            object.__setattr__(self, "pixels", _check_pixels(self.pixels, shape, dtype))

    @classmethod
    def of(cls, robot: RobotSpec) -> LogSpec:
        """The log layout of ``robot`` (an actor's ``metadata.robot``): what the node logs."""
        return cls(
            env_id=robot.env_id,
            obs_shape=robot.obs_shape,
            obs_dtype=robot.obs_dtype,
            act_low=tuple(float(x) for x in robot.act_low),
            act_high=tuple(float(x) for x in robot.act_high),
            pixels="" if robot.pixels is None else json.dumps(robot.pixels.to_dict()),
        )

    @property
    def robot(self) -> RobotSpec:
        """The robot that wrote this log, in the one form the rest of the stack compares."""
        return RobotSpec.from_stored(self)

    @property
    def pixel_spec(self) -> dict[str, Any] | None:
        """The pixel spec (``PixelSpec.from_dict`` takes it); None for a state log."""
        return json.loads(self.pixels) if self.pixels else None

    @property
    def stack(self) -> int:
        """Frames per stacked observation (0 for a state log)."""
        spec = self.pixel_spec
        return int(spec["stack"]) if spec else 0

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """One frame, ``(3, size, size)``: the observation's channels split into ``stack``."""
        c, h, w = self.obs_shape
        return (c // self.stack, h, w)

    @property
    def frame_size(self) -> int:
        return math.prod(self.frame_shape)

    @property
    def schema_version(self) -> int:
        return PIXEL_SCHEMA_VERSION if self.pixels else SCHEMA_VERSION

    @property
    def act_dim(self) -> int:
        return len(self.act_low)

    @property
    def obs_size(self) -> int:
        """Values per observation: obs is stored flattened, one fixed-size list per row."""
        return math.prod(self.obs_shape)

    def differences(self, other: LogSpec) -> list[str]:
        """The fields that differ, as 'name A != B' strings (empty when the specs match)."""
        return [
            f"{name} {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in ("env_id", "obs_shape", "obs_dtype", "act_low", "act_high", "pixels")
            if getattr(self, name) != getattr(other, name)
        ]

    def metadata(self) -> dict[str, str]:
        """The schema metadata of a chunk (values are JSON; no writer pid)."""
        meta = {
            _META + "schema_version": json.dumps(self.schema_version),
            _META + "env_id": json.dumps(self.env_id),
            _META + "obs_shape": json.dumps(list(self.obs_shape)),
            _META + "obs_dtype": json.dumps(self.obs_dtype),
            _META + "act_low": json.dumps(list(self.act_low)),
            _META + "act_high": json.dumps(list(self.act_high)),
        }
        if self.pixels:
            meta[_META + "pixels"] = self.pixels  # already JSON: a JSON object
            meta[_META + "frame_shape"] = json.dumps(list(self.frame_shape))
        meta[_DIGEST] = _spec_digest(meta)
        return meta

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> LogSpec:
        """The spec a chunk was written with; LogError if it is not a chunk this version reads."""
        try:
            meta = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
        except UnicodeDecodeError as e:
            raise LogError(f"damaged metadata: {e}") from None
        if _META + "schema_version" not in meta:
            raise LogError("no ddpg.schema_version in its metadata: not a transition log chunk")
        if _DIGEST in meta and meta[_DIGEST] != _spec_digest(meta):  # chunks before it: none
            raise LogError("damaged metadata: its spec does not match its ddpg.spec_sha256")
        try:
            version = json.loads(meta[_META + "schema_version"])
            if version not in (SCHEMA_VERSION, PIXEL_SCHEMA_VERSION):
                raise LogError(
                    f"schema version {version}; this version of ddpg reads {SCHEMA_VERSION} "
                    f"(state) and {PIXEL_SCHEMA_VERSION} (pixels)"
                )
            pixels = meta.get(_META + "pixels", "")
            if (version == PIXEL_SCHEMA_VERSION) != bool(pixels):
                raise LogError(f"schema version {version} with pixels = {pixels!r}")
            return cls(
                env_id=json.loads(meta[_META + "env_id"]),
                obs_shape=tuple(json.loads(meta[_META + "obs_shape"])),
                obs_dtype=json.loads(meta[_META + "obs_dtype"]),
                act_low=tuple(json.loads(meta[_META + "act_low"])),
                act_high=tuple(json.loads(meta[_META + "act_high"])),
                pixels=pixels,
            )
        except KeyError as e:
            raise LogError(f"metadata lacks {e.args[0]}") from e
        except json.JSONDecodeError as e:
            raise LogError(f"bad metadata: {e}") from e

    def arrow_schema(self, writer_pid: int | None = None) -> pa.Schema:
        """The chunk schema; only shadow_action may be null (no candidate model running)."""
        obs_type = pa.list_(pa.from_numpy_dtype(np.dtype(self.obs_dtype)), self.obs_size)
        act_type = pa.list_(pa.float32(), self.act_dim)
        meta = self.metadata()
        if writer_pid is not None:
            meta[_PID] = json.dumps(writer_pid)

        def req(name: str, typ: pa.DataType) -> pa.Field:
            return pa.field(name, typ, nullable=False)

        obs, next_obs = req("obs", obs_type), req("next_obs", obs_type)
        if self.pixels:  # raw bytes: Parquet stores them flat, 10x faster than lists of uint8
            shape, frame = json.dumps(list(self.obs_shape)), json.dumps(list(self.frame_shape))
            obs = pa.field(
                "obs",
                pa.large_binary(),
                nullable=True,
                metadata={"dtype": "uint8", "shape": shape, "doc": _OBS_DOC},
            )
            next_obs = pa.field(
                "frame",
                pa.binary(self.frame_size),
                nullable=False,
                metadata={"dtype": "uint8", "shape": frame, "doc": _FRAME_DOC},
            )
        return pa.schema(
            [
                req("bridge_id", pa.string()),
                req("bridge_session", pa.string()),
                req("episode", pa.int64()),
                req("step", pa.int64()),
                obs,
                req("action", act_type),
                req("reward", pa.float64()),
                next_obs,
                req("terminated", pa.bool_()),
                req("truncated", pa.bool_()),
                req("model_id", pa.string()),
                req("safe_action", pa.bool_()),
                req("action_seq", pa.int64()),
                req("t_obs_ns", pa.int64()),
                req("t_action_ns", pa.int64()),
                req("t_next_obs_ns", pa.int64()),
                req("t_logged_ns", pa.int64()),
                req("shadow_model_id", pa.string()),
                pa.field("shadow_action", act_type, nullable=True),
            ],
            metadata=meta,
        )


_OBS_DOC = (
    "stacked frames before this step, C-order uint8 (3*stack, H, W), oldest frame first; "
    "only on the first row of a segment, null where the previous row's stack shifted by one "
    "frame plus that row's frame rebuilds it"
)
_FRAME_DOC = "the newest frame after this step (of next_obs), C-order uint8 (3, H, W)"


def _spec_digest(meta: dict[str, str]) -> str:
    """The digest of a chunk's spec keys (every ddpg.* key but the digest and the writer pid)."""
    keys = sorted(k for k in meta if k.startswith(_META) and k not in (_DIGEST, _PID))
    text = json.dumps([[k, meta[k]] for k in keys])
    return json.dumps(hashlib.sha256(text.encode()).hexdigest())  # JSON, as every ddpg.* value


def _check_pixels(pixels: str, shape: tuple[int, ...], dtype: np.dtype) -> str:
    """The pixel spec as sorted-key JSON, or LogError if it does not describe ``shape``."""
    try:
        spec = json.loads(pixels)
        size, stack = spec["size"], spec["stack"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (size, stack)):
            raise TypeError("size and stack must be integers")
    except (TypeError, ValueError, KeyError) as e:
        raise LogError(f"bad log spec: pixels {pixels!r} is not a pixel spec ({e})") from e
    if dtype != np.uint8 or shape != (3 * stack, size, size):
        raise LogError(
            f"bad log spec: pixels {pixels} needs uint8 observations {(3 * stack, size, size)}, "
            f"not {dtype} {shape}"
        )
    return json.dumps(spec, sort_keys=True)


@dataclass(slots=True)
class Transition:
    """One control step of one bridge, as the robot lived it."""

    bridge_id: str
    bridge_session: str  # random hex per bridge process; (bridge_id, session, episode) = episode
    episode: int
    step: int  # index in its episode, 0-based: obs is at step, next_obs at step + 1
    obs: np.ndarray  # obs_shape (or flattened), the log's obs dtype (pixels: stored once, above)
    action: np.ndarray  # (act_dim,) float32: the action the robot actually applied
    reward: float
    next_obs: np.ndarray
    terminated: bool
    truncated: bool
    model_id: str  # model that chose the action ("" when the bridge applied its safe action)
    safe_action: bool  # the action was the safe action (non-finite input, watchdog, ...)
    action_seq: int  # node's sequence number of the action (-1 when the bridge chose it)
    t_obs_ns: int  # time.monotonic_ns() when the bridge observed obs
    t_action_ns: int  # when the node sent the action (0 if unknown)
    t_next_obs_ns: int  # when the bridge observed next_obs
    shadow_model_id: str = ""  # candidate model run beside the live one
    shadow_action: np.ndarray | None = None  # its action (not applied); null when absent


def chunk_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(committed-looking chunk files in name order, temp files) of a log directory."""
    chunks: list[Path] = []
    temps: list[Path] = []
    for entry in os.scandir(directory):
        if not entry.name.endswith(SUFFIX):
            continue
        if entry.name.startswith(CHUNK_PREFIX):
            chunks.append(Path(entry.path))
        elif entry.name.startswith(TMP_PREFIX):
            temps.append(Path(entry.path))
    chunks.sort(key=lambda p: p.name)
    temps.sort(key=lambda p: p.name)
    return chunks, temps
