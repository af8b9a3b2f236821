"""The transition log: crash-safe Parquet chunks written by the control node off its hot path.

Every transition the node serves goes to :meth:`TransitionLog.append`, which only puts the object
on a deque (the control loop runs at 1 kHz on two cores, so it cannot wait for a disk). A writer
thread turns the pending rows into one Arrow table per chunk with a few vectorised numpy steps and
lets pyarrow encode and write it (pyarrow releases the GIL while it does). A chunk becomes visible
only when it is complete: it is written to a hidden temp file, fsynced, renamed to its final name
and the directory fsynced, so a crash loses at most the chunk that was still open and a reader
never sees half a chunk. Appending to a log means adding chunks; existing files are never touched.

Each chunk carries the log's :class:`LogSpec` and its schema version in its schema metadata, so
``pandas.read_parquet(chunk)`` reads it without this module, and :func:`read_logs` can refuse to
mix robots. Nothing here imports torch (or pandas): this is the serving path.

**Pixel logs** (a spec with ``pixels``, schema version 2) store each frame once. A stacked
observation shares ``stack - 1`` frames with the one before it, and ``next_obs`` all but its
newest frame with ``obs``; so a row holds ``frame``, the newest frame of ``next_obs``, and
``obs``, the whole stack, only on the first row of a segment: a run of consecutive steps of one
episode of one bridge session within one chunk (an episode's first logged step, the step after a
gap, and the first row of each bridge in each chunk, so that every chunk decodes on its own: a
lost or unreadable chunk costs only its rows, and any subset of chunks can be read). There is no
``next_obs`` column. :func:`read_pixel_segments` rebuilds the stacks bit for bit; see
``docs/transition_log.md`` for the layout and a pandas recipe. State logs (version 1) are written
exactly as before.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import math
import operator
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
"""The state layout: obs and next_obs on every row. Still what state logs are written as."""
PIXEL_SCHEMA_VERSION = 2
"""The pixel layout: a frame per row, the full stack where a segment starts (version-1 readers
refuse these chunks rather than misread them)."""

CHUNK_PREFIX = "chunk-"
TMP_PREFIX = ".tmp-"
SUFFIX = ".parquet"

# Writer CPU per 1,000-row chunk, measured with pq.write_table on this 2-core machine (median of
# 7, float32 noise observations): Pendulum (obs 3) none 1.62 ms / 99 kB, snappy 1.77 ms / 75 kB,
# zstd-1 3.01 ms / 54 kB; HalfCheetah (obs 17) none 2.38 ms / 239 kB, snappy 2.70 ms / 207 kB,
# zstd-1 3.49 ms / 176 kB. Snappy costs the writer almost nothing over no compression and still
# shrinks the repetitive columns (ids, flags, timestamps); zstd's extra 15-28 % costs 30-70 % more
# CPU, on the machine the control loop runs on. Snappy is also Parquet's most widely read codec.
COMPRESSION = "snappy"

_META = "ddpg."
_STRING_COLUMNS = ("bridge_id", "bridge_session", "model_id", "shadow_model_id")

# Rows converted per step of the writer: about 0.6 ms per GIL-holding call at most (a transpose
# of 1,024 rows), short enough to leave a 1 kHz control loop its GIL turn on time.
_BUILD_ROWS = 1024

# Process-wide counter for temp and chunk names: two logs in one process never share a name.
_NAME_SEQ = itertools.count(1)


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
    """Pixel logs: the pixel spec as JSON (size, stack, repeat, camera; normalised to sorted
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
        return meta

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> LogSpec:
        """The spec a chunk was written with; LogError if it is not a chunk this version reads."""
        meta = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
        if _META + "schema_version" not in meta:
            raise LogError("no ddpg.schema_version in its metadata: not a transition log chunk")
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
            meta[_META + "writer_pid"] = json.dumps(writer_pid)

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


# Transition fields in schema order, and the ones that are plain scalars.
_SCALAR_FIELDS: dict[str, np.dtype | None] = {  # None: a string column
    "bridge_id": None,
    "bridge_session": None,
    "episode": np.dtype(np.int64),
    "step": np.dtype(np.int64),
    "reward": np.dtype(np.float64),
    "terminated": np.dtype(bool),
    "truncated": np.dtype(bool),
    "model_id": None,
    "safe_action": np.dtype(bool),
    "action_seq": np.dtype(np.int64),
    "t_obs_ns": np.dtype(np.int64),
    "t_action_ns": np.dtype(np.int64),
    "t_next_obs_ns": np.dtype(np.int64),
    "shadow_model_id": None,
}
_ARRAY_FIELDS = ("obs", "action", "next_obs", "shadow_action")
_GET_ALL = operator.attrgetter(*_SCALAR_FIELDS, *_ARRAY_FIELDS)
_GET_ALL_NAMES = (*_SCALAR_FIELDS, *_ARRAY_FIELDS)
_GET_SIZE = operator.attrgetter("size")

# The writer builds Arrow arrays from buffers, never with pa.array(): that call imports pandas
# (about 0.3 s holding the GIL, a stall of the control loop) only to check for pandas types.


def _bitmap(flags: np.ndarray) -> pa.Buffer:
    """Arrow's bit-packed (LSB first) layout of a bool array."""
    return pa.py_buffer(np.packbits(flags, bitorder="little"))


def _numeric(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    """A numpy array as an Arrow array (zero copy except bools, which Arrow packs)."""
    values = np.ascontiguousarray(values)
    data = _bitmap(values) if values.dtype == bool else pa.py_buffer(values)
    return pa.Array.from_buffers(typ, len(values), [None, data])


def _strings(values: Sequence[Any]) -> pa.Array:
    """str objects -> StringArray via one join; TypeError for anything that is not a str."""
    n = len(values)
    distinct = set(values)
    if len(distinct) == 1:  # the usual case: one bridge, one model per chunk
        one = str.encode(next(iter(distinct)))
        offsets = np.arange(n + 1, dtype=np.int32) * np.int32(len(one))
        return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(one * n))
    encoded = list(map(str.encode, values))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
    return pa.StringArray.from_buffers(
        len(encoded), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))
    )


def _flat_column(values: Sequence[Any], width: int, dtype: np.dtype) -> np.ndarray:
    """Rows of arrays -> one flat array of len(values) * width, in one C-level pass.

    Each row is flattened by ``np.concatenate(axis=None)``; the sizes are checked first, so a
    wrong-sized row raises instead of shifting every row after it.
    """
    sizes = np.fromiter(map(_GET_SIZE, values), dtype=np.int64, count=len(values))
    if (sizes != width).any():
        raise ValueError(f"an array has {int(sizes[sizes != width][0])} values, expected {width}")
    if not len(values):
        return np.empty(0, dtype=dtype)
    return np.concatenate(values, axis=None, dtype=dtype, casting="same_kind")


def _lists(
    flat: np.ndarray, typ: pa.DataType, n: int, absent: np.ndarray | None = None
) -> pa.Array:
    """n fixed-size lists over ``flat``; rows where ``absent`` is True are null."""
    values = _numeric(flat, typ.value_type)
    validity = _bitmap(~absent) if absent is not None and absent.any() else None
    return pa.Array.from_buffers(typ, n, [validity], children=[values])


def _build_table(
    rows: Sequence[Transition],
    logged_ns: Sequence[int],
    spec: LogSpec,
    schema: pa.Schema,
    carry: dict[tuple[str, str], _LastRow] | None = None,
) -> pa.Table:
    """Columnar conversion of a whole chunk: a transpose and a few numpy concatenations, no
    Python loop over rows (pixel logs: one, see :func:`_pixel_columns`; ``carry`` is its state
    across the parts of one chunk). Raises (TypeError, ValueError, ArrowException) on a
    malformed row."""
    n = len(rows)
    cols = list(zip(*map(_GET_ALL, rows), strict=True)) if n else [()] * len(_GET_ALL_NAMES)
    by_name = dict(zip(_GET_ALL_NAMES, cols, strict=True))
    arrays: dict[str, pa.Array] = {}
    for name, dtype in _SCALAR_FIELDS.items():
        if dtype is None:
            arrays[name] = _strings(by_name[name])
        else:
            arrays[name] = _numeric(np.array(by_name[name], dtype=dtype), schema.field(name).type)
    obs_type = schema.field("obs").type
    act_type = schema.field("action").type
    if spec.pixels:
        arrays["obs"], arrays["frame"] = _pixel_columns(
            by_name, spec, {} if carry is None else carry
        )
    else:
        for name in ("obs", "next_obs"):
            flat = _flat_column(by_name[name], spec.obs_size, np.dtype(spec.obs_dtype))
            arrays[name] = _lists(flat, obs_type, n)
    flat = _flat_column(by_name["action"], spec.act_dim, np.dtype(np.float32))
    arrays["action"] = _lists(flat, act_type, n)
    shadow = by_name["shadow_action"]
    absent = np.fromiter(map(operator.is_, shadow, itertools.repeat(None)), dtype=bool, count=n)
    if absent.all():
        values = np.zeros(n * spec.act_dim, dtype=np.float32)
    elif not absent.any():
        values = _flat_column(shadow, spec.act_dim, np.dtype(np.float32))
    else:
        values = np.zeros((n, spec.act_dim), dtype=np.float32)
        present = list(itertools.compress(shadow, ~absent))
        values[~absent] = _flat_column(present, spec.act_dim, values.dtype).reshape(
            n - absent.sum(), -1
        )
        values = values.reshape(-1)
    arrays["shadow_action"] = _lists(values, act_type, n, absent)
    arrays["t_logged_ns"] = _numeric(np.asarray(logged_ns, dtype=np.int64), pa.int64())
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


class _LastRow(NamedTuple):
    """The newest row of one bridge session in the open chunk, where its segment stands."""

    episode: int
    step: int
    next_obs: Any  # the array object the row was given (the node hands the next row the same)
    flat: np.ndarray  # its values, flat uint8


def _pixel_values(a: Any, size: int) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.size != size:
        raise ValueError(f"pixel observation is {a.dtype} {a.shape}; the log takes {size} uint8")
    return a.reshape(-1)


def _pixel_columns(
    cols: dict[str, Sequence[Any]], spec: LogSpec, carry: dict[tuple[str, str], _LastRow]
) -> tuple[pa.Array, pa.Array]:
    """The ``obs`` and ``frame`` columns of a pixel chunk.

    A row continues its bridge session's segment when the session's previous row in this chunk
    is the step before in the same episode and its next_obs is this row's obs (the same array
    from the node; compared by value otherwise): then obs is rebuilt from frames already stored
    and stays null. Every row's next_obs must be its obs shifted by one frame, or the frame alone
    would not rebuild it: such a row raises ValueError (the writer drops it, counted) rather
    than being stored wrong. One Python pass: per row a few µs, against ~12 kB of frame."""
    n, fs, size = len(cols["obs"]), spec.frame_size, spec.obs_size
    frames = np.empty((n, fs), dtype=np.uint8)
    present = np.zeros(n, dtype=bool)
    stacks: list[np.ndarray] = []
    last = dict(carry)  # committed to carry only when the whole part converts
    keys = zip(
        cols["bridge_id"], cols["bridge_session"], cols["episode"], cols["step"], strict=True
    )
    for i, (obs, nxt, (bridge, session, episode, step)) in enumerate(
        zip(cols["obs"], cols["next_obs"], keys, strict=True)
    ):
        o, x = _pixel_values(obs, size), _pixel_values(nxt, size)
        if not np.array_equal(o[fs:], x[:-fs]):
            raise ValueError("pixel transition whose next_obs is not obs shifted by one frame")
        frames[i] = x[-fs:]
        prev = last.get((bridge, session))
        if (
            prev is None
            or (prev.episode, prev.step) != (episode, step - 1)
            or not (prev.next_obs is obs or np.array_equal(prev.flat, o))
        ):
            present[i] = True
            stacks.append(o)
        last[(bridge, session)] = _LastRow(episode, step, nxt, x)
    carry.clear()
    carry.update(last)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(present * np.int64(size), out=offsets[1:])
    data = np.concatenate(stacks) if stacks else np.empty(0, dtype=np.uint8)
    validity = None if present.all() else _bitmap(present)
    obs_col = pa.Array.from_buffers(
        pa.large_binary(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    frame_col = pa.Array.from_buffers(pa.binary(fs), n, [None, pa.py_buffer(frames)])
    return obs_col, frame_col


def _fsync_dir(directory: Path) -> None:
    """Make a rename (or a new entry) in ``directory`` durable: fsync the directory itself."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunk_files(directory: Path) -> tuple[list[Path], list[Path]]:
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


def _writer_alive(temp: Path) -> bool:
    """Whether the process named in ``.tmp-<pid>-<n>.parquet`` runs on this machine, in which
    case the file is a chunk being written, not a crashed writer's leftover."""
    try:
        pid = int(temp.name[len(TMP_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return False
    return True


class _Flush:
    """A marker put on the queue by flush(): the writer answers it once every row before it has
    been handled, which needs no counter shared between appending threads."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


def _close_at_exit(ref: weakref.ReferenceType[TransitionLog]) -> None:
    log = ref()
    if log is not None:
        log.close()


class TransitionLog:
    """An append-only transition log directory, written by a background thread.

    ``append`` is the control loop's only cost. Counters are plain attributes, each written by
    one thread (``transitions_appended`` by the appending thread, the others by the writer), so
    any thread may read them without a lock. With several appending threads no row is lost
    (deque.append is atomic) but ``transitions_appended`` may undercount.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        spec: LogSpec,
        chunk_seconds: float = 1.0,
        chunk_rows: int = 50_000,
        fsync: bool = True,
        max_backlog_bytes: int = 256 * 2**20,
        retry_seconds: float = 1.0,
    ) -> None:
        if not chunk_seconds > 0 or chunk_rows < 1:
            raise ValueError(
                f"chunk_seconds {chunk_seconds} and chunk_rows {chunk_rows} must be >0"
            )
        self.directory = Path(directory)
        self.spec = spec
        self.chunk_seconds = float(chunk_seconds)
        self.chunk_rows = int(chunk_rows)
        self.fsync = fsync
        self.max_backlog_bytes = int(max_backlog_bytes)
        self.retry_seconds = float(retry_seconds)
        self._open_directory()
        self._schema = spec.arrow_schema(writer_pid=os.getpid())

        self.transitions_appended = 0
        self.transitions_committed = 0
        self.chunks_committed = 0
        self.bytes_committed = 0
        self.write_errors = 0
        self.last_error = ""
        self._dropped = 0  # by the writer: bad rows, backlog over its limit
        self._dropped_late = 0  # by append: rows that came after close
        self.backlog_rows = 0  # converted rows waiting for a write to succeed
        self._backlog: deque[tuple[pa.Table, int]] = deque()  # (table, first row's wall ns)
        self._backlog_bytes = 0
        self._retry_at = 0.0

        self._queue: deque[Transition | _Flush] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._closed = False
        # Wake often enough to honour chunk_seconds, rarely enough to cost nothing.
        self._poll = min(0.05, max(0.005, self.chunk_seconds / 4))
        self._thread = threading.Thread(
            target=self._run, name=f"translog:{self.directory.name}", daemon=True
        )
        self._thread.start()
        # A process that exits without close() still commits what it appended.
        self._at_exit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)

    # -- construction --------------------------------------------------------------------------

    def _open_directory(self) -> None:
        """Create the directory, or check that the chunks already there are of this spec."""
        d = self.directory
        if d.exists() and not d.is_dir():
            raise LogError(f"{d}: exists and is not a directory")
        if not d.exists():
            d.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                _fsync_dir(d.parent)
            return
        chunks, _ = _chunk_files(d)
        # Writers only add chunks of their own spec, so the newest readable chunk speaks for all.
        for path in reversed(chunks):
            try:
                metadata = pq.read_schema(path).metadata
            except (OSError, pa.ArrowException):
                continue  # a corrupt chunk is the reader's to report
            try:
                theirs = LogSpec.from_metadata(metadata)
            except LogError as e:
                raise LogError(f"{d}: {path.name}: {e}; not appending to it") from e
            diff = theirs.differences(self.spec)
            if diff:
                raise LogError(
                    f"{d} holds the log of another robot ({'; '.join(diff)}, log vs this "
                    "writer); use another directory"
                )
            return

    # -- the hot path --------------------------------------------------------------------------

    def append(self, t: Transition) -> None:
        """Hand a transition to the writer: a deque append, no copy, no conversion.

        The caller must not modify ``t`` or its arrays afterwards. After close() the row is
        dropped and counted (``transitions_dropped``), never raised, so a control loop racing
        a shutdown does not crash.
        """
        if self._closed:
            self._dropped_late += 1
            self.last_error = "append after close: transition dropped"
            return
        self._queue.append(t)
        self.transitions_appended += 1

    # -- control -------------------------------------------------------------------------------

    @property
    def transitions_dropped(self) -> int:
        return self._dropped + self._dropped_late

    @property
    def transitions_pending(self) -> int:
        """Appended but neither committed nor dropped yet (queued, open chunk, or backlog)."""
        return self.transitions_appended - self.transitions_committed - self._dropped

    @property
    def writer_alive(self) -> bool:
        return self._thread.is_alive()

    def flush(self, timeout: float | None = None) -> bool:
        """Commit everything appended so far; True when it all reached disk (False: write errors,
        see ``last_error``, or the timeout passed)."""
        if not self._thread.is_alive():
            return not self._queue and self.backlog_rows == 0
        marker = _Flush()
        self._queue.append(marker)
        self._wake.set()
        return marker.done.wait(timeout) and marker.ok

    def close(self, timeout: float | None = None) -> bool:
        """Commit everything and stop the writer; idempotent. True when every appended
        transition was committed; False when some were dropped (``transitions_dropped``,
        ``last_error``: bad rows, a disk that refused the last attempt) or the join timed out."""
        if not self._closed:
            self._closed = True
            atexit.unregister(self._at_exit)
            self._stop = True
            self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        # Rows appended while close() ran, after the writer's last look at the queue.
        # The writer is gone, so its counters are ours now.
        late = sum(1 for item in self._queue if not isinstance(item, _Flush))
        for item in self._queue:
            if isinstance(item, _Flush):
                item.done.set()
        self._queue.clear()
        if late:
            self._dropped += late
            self.last_error = f"{late} transitions appended during close were dropped"
        if self.backlog_rows:
            self._dropped += self.backlog_rows
            self.last_error = f"dropped {self.backlog_rows} unwritten at close: {self.last_error}"
            self._backlog.clear()
            self._backlog_bytes = self.backlog_rows = 0
        return self.transitions_pending == 0 and self.transitions_dropped == 0

    def __enter__(self) -> TransitionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        rows: list[Transition] = []
        logged: list[int] = []
        opened = 0  # monotonic ns of the open chunk's first row
        opened_wall = 0
        chunk_ns = int(self.chunk_seconds * 1e9)
        while True:
            self._wake.wait(self._poll)
            self._wake.clear()
            stopping = self._stop
            try:
                now = time.monotonic_ns()
                queue = self._queue
                while queue:
                    item = queue.popleft()
                    if type(item) is _Flush:
                        try:
                            if rows:
                                self._seal(rows, logged, opened_wall)
                                rows, logged = [], []
                            item.ok = self._write_backlog(force=True)
                        finally:
                            item.done.set()  # a flush() caller never waits forever
                        continue
                    if not rows:
                        opened, opened_wall = now, time.time_ns()
                    rows.append(item)  # type: ignore[arg-type]
                    logged.append(now)
                    if len(rows) >= self.chunk_rows:
                        self._seal(rows, logged, opened_wall)
                        rows, logged = [], []
                if rows and (stopping or time.monotonic_ns() - opened >= chunk_ns):
                    self._seal(rows, logged, opened_wall)
                    rows, logged = [], []
                if self._backlog:
                    self._write_backlog(force=stopping)
            except Exception as e:  # a bug here must not stop logging for good
                self.write_errors += 1
                self.last_error = f"writer: {type(e).__name__}: {e}"
            if stopping and not self._queue:
                return

    def _seal(self, rows: list[Transition], logged: list[int], opened_wall: int) -> None:
        """Convert the open chunk to a table and queue it for writing (then try to write).

        Converted in slices of _BUILD_ROWS: each numpy/arrow call holds the GIL for the whole
        call, so bounded slices bound how long the control loop can wait for it.
        """
        parts = []
        carry: dict[tuple[str, str], _LastRow] = {}  # pixel segments run across the parts
        for i in range(0, len(rows), _BUILD_ROWS):
            part, stamps = rows[i : i + _BUILD_ROWS], logged[i : i + _BUILD_ROWS]
            try:
                parts.append(_build_table(part, stamps, self.spec, self._schema, carry))
            except Exception:
                parts.append(self._build_checked(part, stamps, carry))
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if table.num_rows:
            self._backlog.append((table, opened_wall))
            self._backlog_bytes += table.nbytes
            self.backlog_rows += table.num_rows
        # Bounded memory while the disk refuses: drop the oldest chunks, counted.
        while self._backlog_bytes > self.max_backlog_bytes and len(self._backlog) > 1:
            old, _ = self._backlog.popleft()
            self._backlog_bytes -= old.nbytes
            self.backlog_rows -= old.num_rows
            self._dropped += old.num_rows
            self.last_error = (
                f"dropped {old.num_rows} transitions: unwritten backlog over "
                f"{self.max_backlog_bytes} bytes ({self.last_error})"
            )
        self._write_backlog(force=False)

    def _build_checked(
        self,
        rows: list[Transition],
        logged: list[int],
        carry: dict[tuple[str, str], _LastRow],
    ) -> pa.Table:
        """Slow path, only after the vectorised build failed: find and drop the malformed rows."""
        good_rows: list[Transition] = []
        good_logged: list[int] = []
        reason = ""
        for row, stamp in zip(rows, logged, strict=True):
            try:
                row.obs, row.next_obs = np.asarray(row.obs), np.asarray(row.next_obs)
                row.action = np.asarray(row.action)
                if row.shadow_action is not None:
                    row.shadow_action = np.asarray(row.shadow_action)
                _build_table([row], [stamp], self.spec, self._schema)
            except Exception as e:
                reason = reason or f"{type(e).__name__}: {e}"
                continue
            good_rows.append(row)
            good_logged.append(stamp)
        bad = len(rows) - len(good_rows)
        if bad:
            self._dropped += bad
            self.last_error = f"dropped {bad} malformed transitions, e.g. {reason}"
        try:
            return _build_table(good_rows, good_logged, self.spec, self._schema, carry)
        except Exception as e:
            self._dropped += len(good_rows)
            self.last_error = f"dropped {len(good_rows)} transitions: {type(e).__name__}: {e}"
            return self._schema.empty_table()

    def _write_backlog(self, force: bool) -> bool:
        """Write the sealed chunks in order; after a failure wait ``retry_seconds`` unless
        forced (flush, close). True when nothing is left unwritten."""
        if not force and time.monotonic() < self._retry_at:
            return not self._backlog
        while self._backlog:
            table, wall_ns = self._backlog[0]
            try:
                self._write_chunk(table, wall_ns)
            except Exception as e:
                self.write_errors += 1
                self.last_error = (
                    f"cannot write a chunk of {table.num_rows} transitions to {self.directory} "
                    f"({type(e).__name__}: {e}); {self.backlog_rows} waiting for a retry, "
                    f"{self.transitions_dropped} dropped so far"
                )
                self._retry_at = time.monotonic() + self.retry_seconds
                return False
            self._backlog.popleft()
            self._backlog_bytes -= table.nbytes
            self.backlog_rows -= table.num_rows
            self.transitions_committed += table.num_rows
            self.chunks_committed += 1
        return True

    def _write_chunk(self, table: pa.Table, wall_ns: int) -> None:
        """temp file -> fsync -> rename -> fsync(dir): the chunk appears whole or not at all."""
        pid = os.getpid()
        seq = next(_NAME_SEQ)
        temp = self.directory / f"{TMP_PREFIX}{pid}-{seq}{SUFFIX}"
        stamp = datetime.fromtimestamp(wall_ns / 1e9, UTC).strftime("%Y%m%dT%H%M%S.%f")
        final = self.directory / f"{CHUNK_PREFIX}{stamp}-{pid}-{seq:06d}{SUFFIX}"
        try:
            # pyarrow writes through its own file (no Python file object), GIL released.
            pq.write_table(
                table,
                temp,
                compression=COMPRESSION,
                use_dictionary=list(_STRING_COLUMNS),
            )
            fd = os.open(temp, os.O_RDONLY)
            try:
                if self.fsync:
                    os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if final.exists():  # never replace a chunk, whoever wrote it
                raise FileExistsError(f"{final.name} exists")
            os.rename(temp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        self.bytes_committed += size
        if self.fsync:
            try:
                _fsync_dir(self.directory)
            except OSError as e:  # the chunk is in place; only its durability is in doubt
                self.write_errors += 1
                self.last_error = f"fsync of {self.directory} after {final.name}: {e}"


# -- reading -------------------------------------------------------------------------------------


@dataclass
class LogContents:
    """Everything committed in one or more log directories of the same spec."""

    spec: LogSpec | None
    table: pa.Table  # all committed rows, concatenated, in chunk-name order
    chunks: list[Path]  # readable committed chunks
    unreadable: list[tuple[Path, str]]  # committed-looking files that failed to read, and why
    leftovers: list[Path]  # .tmp-* files of a writer that crashed (ignored)
    dirs: list[Path] = field(default_factory=list)
    bytes: int = 0  # total size of the readable chunks


def read_logs(dirs: Sequence[Path], warn: Callable[[str], None] | None = None) -> LogContents:
    """Read every committed chunk of ``dirs``.

    A crashed writer's temp files and unreadable chunks are listed (and passed to ``warn``, one
    line each), never fatal: a log must stay usable after a crash. Directories (or chunks) of
    different specs, and a missing directory, raise LogError.
    """
    warn = warn or (lambda _line: None)
    dirs = [Path(d) for d in dirs]
    found: list[tuple[str, int, Path]] = []
    leftovers: list[Path] = []
    for i, d in enumerate(dirs):
        if not d.exists():
            raise LogError(f"{d}: no such directory")
        if not d.is_dir():
            raise LogError(f"{d}: not a directory")
        chunks, temps = _chunk_files(d)
        found += [(p.name, i, p) for p in chunks]
        for temp in temps:
            if not _writer_alive(temp):
                leftovers.append(temp)
                warn(f"{temp}: temp file of a writer that stopped mid-chunk; ignored")
    found.sort(key=lambda x: (x[0], x[1]))

    spec: LogSpec | None = None
    spec_from: Path | None = None
    tables: list[pa.Table] = []
    readable: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    total_bytes = 0
    for _, _, path in found:
        try:
            table = pq.read_table(path)
            chunk_spec = LogSpec.from_metadata(table.schema.metadata)
            table = table.replace_schema_metadata(None).cast(chunk_spec.arrow_schema())
            size = path.stat().st_size
        except (OSError, pa.ArrowException, LogError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            unreadable.append((path, reason))
            warn(f"{path}: unreadable chunk, skipped: {reason}")
            continue
        if spec is None:
            spec, spec_from = chunk_spec, path
        elif diff := spec.differences(chunk_spec):
            raise LogError(
                f"{spec_from} and {path} are logs of different robots: {'; '.join(diff)}"
            )
        tables.append(table.replace_schema_metadata(None))
        readable.append(path)
        total_bytes += size
    if spec is None:
        table = pa.schema([]).empty_table()
    else:
        table = pa.concat_tables(tables) if tables else spec.arrow_schema().empty_table()
        table = table.replace_schema_metadata(spec.metadata())
    return LogContents(
        spec=spec,
        table=table,
        chunks=readable,
        unreadable=unreadable,
        leftovers=leftovers,
        dirs=dirs,
        bytes=total_bytes,
    )


def _list_values(table: pa.Table, column: str, width: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(N*width flat values, null mask or None) of a fixed-size-list column, without copying row
    by row. ``.values`` (not ``.flatten()``) keeps the slots of null rows, so rows stay aligned."""
    arr = table.column(column).combine_chunks()
    n = len(arr)
    values = arr.values.slice(arr.offset * width, n * width)
    flat = values.to_numpy(zero_copy_only=False)
    mask = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
    return flat, mask


def obs_array(table: pa.Table, column: str, spec: LogSpec) -> np.ndarray:
    """An observation column ("obs", "next_obs") as an (N, *obs_shape) array of the obs dtype.
    Pixel logs have no such columns (each frame is stored once): LogError pointing to
    :func:`read_pixel_segments`."""
    if spec.pixels:
        raise LogError(
            f"a pixel log stores each frame once, not {column!r} per row: rebuild the stacked "
            "observations with read_pixel_segments (or PixelSegment.observations)"
        )
    flat, _ = _list_values(table, column, spec.obs_size)
    return flat.astype(spec.obs_dtype, copy=False).reshape(-1, *spec.obs_shape)


def action_array(table: pa.Table, column: str, spec: LogSpec) -> np.ndarray:
    """An action column ("action", "shadow_action") as an (N, act_dim) float32 array; null rows
    (no shadow model) are NaN."""
    flat, mask = _list_values(table, column, spec.act_dim)
    out = flat.astype(np.float32).reshape(-1, spec.act_dim)
    if mask is not None:
        out[mask] = np.nan
    return out


@dataclass
class PixelSegment:
    """A maximal run of consecutive steps of one episode of one bridge session, from a pixel
    log: ``obs0`` and ``frames`` hold every stacked observation of the run, each frame once.

    The observation before step ``first_step + i`` is the last ``stack`` frames of
    ``obs0``'s frames followed by ``frames[:i]``; the one after it adds ``frames[i]``
    (:meth:`observations` builds them all). A run ends at ``terminated``/``truncated`` or where
    a step is missing. Arrays may be read-only views of the log's buffers.
    """

    bridge_id: str
    session: str
    episode: int
    first_step: int
    obs0: np.ndarray
    """(3 * stack, H, W) uint8: the stacked observation before the first step, oldest first."""
    frames: np.ndarray
    """(T, 3, H, W) uint8: the newest frame after each step."""
    action: np.ndarray
    """(T, act_dim) float32: the action applied at each step."""
    reward: np.ndarray
    """(T,) float32."""
    terminated: np.ndarray
    """(T,) bool; only the last step can be true."""
    truncated: np.ndarray
    """(T,) bool; only the last step can be true."""
    model_id: np.ndarray
    """(T,) str objects: the model that chose each action ("" for the bridge's safe action)."""
    safe: np.ndarray
    """(T,) bool: the safe action was applied."""
    stack: int

    def __len__(self) -> int:
        return len(self.frames)

    def observations(self) -> np.ndarray:
        """All ``T + 1`` stacked observations, ``(T + 1, 3 * stack, H, W)`` uint8: ``[i]`` is
        the obs of step ``i``, ``[i + 1]`` its next_obs. A copy ``T + 1`` stacks large: for
        checks and small logs; a replay buffer should keep ``frames`` once."""
        c, h, w = self.frames.shape[1:] if len(self.frames) else (3, *self.obs0.shape[1:])
        seq = np.concatenate([self.obs0.reshape(self.stack, c, h, w), self.frames])
        windows = np.lib.stride_tricks.sliding_window_view(seq, self.stack, axis=0)
        return np.moveaxis(windows, -1, 1).reshape(len(seq) - self.stack + 1, -1, h, w)


def read_pixel_segments(
    paths: Sequence[Path], warn: Callable[[str], None] | None = None
) -> list[PixelSegment]:
    """Every segment of the pixel log directories ``paths`` (read as :func:`read_logs` does),
    ordered by bridge session (first seen first), episode and step; LogError for a state log.

    Segments are joined across chunks where the steps are consecutive and the next chunk's stored
    stack equals the rebuilt one, so a segment is maximal whatever the chunking."""
    contents = read_logs(paths, warn)
    if contents.spec is not None and not contents.spec.pixels:
        raise LogError(
            f"{', '.join(map(str, paths))}: a state log (obs {contents.spec.obs_shape} "
            f"{contents.spec.obs_dtype}), not pixels: read it with read_logs and obs_array"
        )
    return pixel_segments(contents, warn)


def pixel_segments(
    contents: LogContents, warn: Callable[[str], None] | None = None
) -> list[PixelSegment]:
    """The segments of an already read pixel log (see :func:`read_pixel_segments`)."""
    spec, t = contents.spec, contents.table
    if spec is None or t.num_rows == 0:
        return []
    n, stack, fshape = t.num_rows, spec.stack, spec.frame_shape
    codes = [
        pc.dictionary_encode(t.column(c).combine_chunks()) for c in ("bridge_id", "bridge_session")
    ]
    bridge, session = (np.asarray(c.indices, dtype=np.int64) for c in codes)
    episode, step = t.column("episode").to_numpy(), t.column("step").to_numpy()
    terminated = t.column("terminated").to_numpy()
    truncated = t.column("truncated").to_numpy()
    obs_col = t.column("obs").combine_chunks()
    has_obs = obs_col.is_valid().to_numpy(zero_copy_only=False)
    frame_col = t.column("frame").combine_chunks()
    flat = np.frombuffer(frame_col.buffers()[1], dtype=np.uint8)
    frames = flat[frame_col.offset * spec.frame_size :][: n * spec.frame_size].reshape(n, *fshape)

    order = np.lexsort((step, episode, session, bridge))  # stable: ties keep chunk order
    b, s, e, st = bridge[order], session[order], episode[order], step[order]
    ends = (terminated | truncated)[order]
    follows = np.zeros(n, dtype=bool)
    follows[1:] = (
        (b[1:] == b[:-1]) & (s[1:] == s[:-1]) & (e[1:] == e[:-1]) & (st[1:] == st[:-1] + 1)
    )
    follows[1:] &= ~ends[:-1]
    has = has_obs[order]

    def stored(i: int) -> np.ndarray:  # the stack stored on table row i
        return np.frombuffer(obs_col[i].as_buffer(), dtype=np.uint8).reshape(spec.obs_shape)

    # A row with a stored stack that follows its predecessor (the first row of a chunk) joins
    # the segment when that stack is the rebuilt one; the rows before it settle where it starts.
    starts = ~follows
    start_of = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    newest_start = 0
    for p in np.flatnonzero(follows & has):
        first = max(int(start_of[p - 1]), newest_start)
        window = _rebuilt(
            stored(int(order[first])) if has[first] else None, frames, order, first, p, stack
        )
        if window is None or not np.array_equal(
            window.reshape(spec.obs_shape), stored(int(order[p]))
        ):
            starts[p] = True
            newest_start = p

    action = action_array(t, "action", spec)
    reward = t.column("reward").to_numpy().astype(np.float32)
    model_id = t.column("model_id").to_numpy(zero_copy_only=False)
    safe = t.column("safe_action").to_numpy()
    names = [c.dictionary.to_pylist() for c in codes]
    bounds = [*np.flatnonzero(starts).tolist(), n]
    segments: list[PixelSegment] = []
    lost = 0
    for lo, hi in itertools.pairwise(bounds):
        rows = order[lo:hi]
        first = int(rows[0])
        if not has[lo]:  # its stack was in a chunk that is not here: cannot be rebuilt
            lost += hi - lo
            continue
        contiguous = int(rows[-1]) - first == hi - lo - 1 and bool((np.diff(rows) == 1).all())
        segments.append(
            PixelSegment(
                bridge_id=names[0][bridge[first]],
                session=names[1][session[first]],
                episode=int(episode[first]),
                first_step=int(step[first]),
                obs0=stored(first),
                frames=frames[first : int(rows[-1]) + 1] if contiguous else frames[rows],
                action=action[rows],
                reward=reward[rows],
                terminated=terminated[rows],
                truncated=truncated[rows],
                model_id=model_id[rows],
                safe=safe[rows],
                stack=stack,
            )
        )
    if lost and warn is not None:
        warn(
            f"{lost} transitions skipped: the chunk holding their segment's first stack is missing"
        )
    return segments


def _rebuilt(
    obs0: np.ndarray | None, frames: np.ndarray, order: np.ndarray, first: int, p: int, stack: int
) -> np.ndarray | None:
    """The stacked next_obs of sorted row ``p - 1``, in the segment starting at sorted row
    ``first`` with stored stack ``obs0`` (None when that stack is missing and it is needed)."""
    newest = frames[order[max(first, p - stack) : p]]
    if len(newest) == stack:
        return newest
    if obs0 is None:
        return None
    return np.concatenate([obs0.reshape(stack, *frames.shape[1:])[len(newest) :], newest])


# -- summary -------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {"return_mean": None, "return_std": None, "return_min": None, "return_max": None}
    a = np.asarray(values, dtype=np.float64)
    return {
        "return_mean": float(a.mean()),
        "return_std": float(a.std()),
        "return_min": float(a.min()),
        "return_max": float(a.max()),
    }


def _utc_of(chunk: Path) -> str | None:
    """The UTC time in a chunk's name (its first row), ISO 8601."""
    try:
        stamp = chunk.name[len(CHUNK_PREFIX) :].split("-", 1)[0]
        when = datetime.strptime(stamp, "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
    except ValueError:
        return None
    return when.isoformat().replace("+00:00", "Z")


def _episodes(t: pa.Table) -> tuple[dict[str, list[float]], list[float], int]:
    """(complete returns per model, returns of mixed-model episodes, partial episodes)."""
    keys = ["bridge_id", "bridge_session", "episode"]
    terminal = pc.or_(t.column("terminated"), t.column("truncated"))
    rows = t.select([*keys, "step", "reward"]).append_column("terminal", terminal)
    episodes = rows.group_by(keys).aggregate(
        [("reward", "sum"), ("step", "count_distinct"), ("step", "min"), ("terminal", "max")]
    )
    ends = rows.filter(terminal).group_by(keys).aggregate([("step", "min")])
    ends = ends.rename_columns([*keys, "end_step"])
    chosen = t.filter(pc.not_equal(t.column("model_id"), "")).select([*keys, "model_id"])
    owners = chosen.group_by(keys).aggregate([("model_id", "count_distinct"), ("model_id", "min")])
    episodes = episodes.join(ends, keys, join_type="left outer")
    episodes = episodes.join(owners, keys, join_type="left outer").to_pydict()
    per_model: dict[str, list[float]] = {}
    mixed: list[float] = []
    partial = 0
    for terminal_seen, first, distinct, end, ret, n_models, model in zip(
        episodes["terminal_max"],
        episodes["step_min"],
        episodes["step_count_distinct"],
        episodes["end_step"],
        episodes["reward_sum"],
        episodes["model_id_count_distinct"],
        episodes["model_id_min"],
        strict=True,
    ):
        if not terminal_seen:
            continue  # still running (or its end was lost): no return yet
        if first != 0 or distinct != end + 1:
            partial += 1
            continue
        if (n_models or 0) > 1:
            mixed.append(float(ret))
        else:
            per_model.setdefault(model or "", []).append(float(ret))
    return per_model, mixed, partial


def _frame_counts(spec: LogSpec | None, t: pa.Table) -> dict[str, Any]:
    """Pixel logs: the spec, frames stored (one per row, plus a stack where a segment starts)
    and per transition (1 would be perfect; obs + next_obs per row would be 2 * stack)."""
    if spec is None or not spec.pixels:
        keys = ("pixels", "frame_bytes", "segment_starts", "frames_stored", "frames_per_transition")
        return dict.fromkeys(keys)
    stacks = t.num_rows - t.column("obs").null_count
    frames = t.num_rows + spec.stack * stacks
    return {
        "pixels": spec.pixel_spec,
        "frame_bytes": spec.frame_size,
        "segment_starts": stacks,
        "frames_stored": frames,
        "frames_per_transition": frames / t.num_rows if t.num_rows else None,
    }


def summarize(contents: LogContents) -> dict[str, Any]:
    """A JSON-ready summary of a log: counts, episodes, and returns per model.

    An episode is (bridge_id, bridge_session, episode). ``episodes_completed`` counts terminal
    rows (terminated or truncated). A return (the sum of rewards) is reported only for an episode
    whose rows cover steps 0..terminal without a gap; the others ("episodes_partial": a crash, a
    node started mid-episode) would make a model look better or worse than it was. An episode
    belongs to a model when every action the node chose in it came from that model; actions the
    bridge chose itself (model_id "") do not change that. Episodes under two or more models are
    "mixed" and counted apart. Times are the writer's monotonic clock (``t_logged_ns``) and the
    UTC in the chunk names.
    """
    t = contents.table
    spec = contents.spec
    out: dict[str, Any] = {
        "dirs": [str(d) for d in contents.dirs],
        "schema_version": spec.schema_version if spec is not None else None,
        "env_id": spec.env_id if spec else None,
        "obs_shape": list(spec.obs_shape) if spec else None,
        "obs_dtype": spec.obs_dtype if spec else None,
        "act_dim": spec.act_dim if spec else None,
        "chunks": len(contents.chunks),
        "bytes": contents.bytes,
        "transitions": t.num_rows,
        "bytes_per_transition": contents.bytes / t.num_rows if t.num_rows else None,
        **_frame_counts(spec, t),
        "bridges": [],
        "bridge_sessions": 0,
        "episodes_completed": 0,
        "episodes_partial": 0,
        "safe_actions": 0,
        "models": {},
        "mixed_model_episodes": {"episodes": 0, **_stats([])},
        "first_logged_ns": None,
        "last_logged_ns": None,
        "span_s": None,
    }
    if spec is not None and t.num_rows:
        per_model_returns, mixed, partial = _episodes(t)
        safe = pc.cast(t.column("safe_action"), pa.int64())
        counts = (
            pa.table({"model_id": t.column("model_id"), "safe": safe})
            .group_by("model_id")
            .aggregate([([], "count_all"), ("safe", "sum")])
            .to_pydict()
        )
        models: dict[str, dict[str, Any]] = {}
        for model in sorted(set(counts["model_id"]) | set(per_model_returns)):
            returns = per_model_returns.get(model, [])
            models[model] = {"transitions": 0, "safe_actions": 0, "episodes": len(returns)}
            models[model].update(_stats(returns))
        for model, n, n_safe in zip(
            counts["model_id"], counts["count_all"], counts["safe_sum"], strict=True
        ):
            models[model].update(transitions=n, safe_actions=n_safe)
        terminal = pc.or_(t.column("terminated"), t.column("truncated"))
        logged = t.column("t_logged_ns")
        first, last = pc.min(logged).as_py(), pc.max(logged).as_py()
        sessions = t.select(["bridge_id", "bridge_session"]).group_by(
            ["bridge_id", "bridge_session"]
        )
        out.update(
            bridges=sorted(pc.unique(t.column("bridge_id")).to_pylist()),
            bridge_sessions=sessions.aggregate([]).num_rows,
            episodes_completed=pc.sum(pc.cast(terminal, pa.int64())).as_py(),
            episodes_partial=partial,
            safe_actions=pc.sum(safe).as_py(),
            models=models,
            mixed_model_episodes={"episodes": len(mixed), **_stats(mixed)},
            first_logged_ns=first,
            last_logged_ns=last,
            span_s=(last - first) / 1e9,
        )
    out["first_chunk_utc"] = _utc_of(contents.chunks[0]) if contents.chunks else None
    out["last_chunk_utc"] = _utc_of(contents.chunks[-1]) if contents.chunks else None
    out["unreadable"] = [{"path": str(p), "reason": r} for p, r in contents.unreadable]
    out["leftovers"] = [str(p) for p in contents.leftovers]
    return out
