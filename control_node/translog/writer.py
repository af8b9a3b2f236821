"""The transition log's writer: crash-safe Parquet chunks written off the control loop's hot path.

Every transition the node serves goes to :meth:`TransitionLog.append`, which only puts the object
on a deque (the control loop runs at 1 kHz on two cores, so it cannot wait for a disk). A writer
thread turns the pending rows into one Arrow table per chunk with a few vectorised numpy steps and
lets pyarrow encode and write it (pyarrow releases the GIL while it does). A chunk becomes visible
only when it is complete: it is written to a hidden temp file, fsynced, renamed to its final name
and the directory fsynced, so a crash loses at most the chunk that was still open and a reader
never sees half a chunk. Appending to a log means adding chunks; existing files are never touched.
Nothing here imports torch (or pandas): this is the serving path.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import operator
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from control_node.realtime import helper_thread
from control_node.translog.schema import (
    CHUNK_PREFIX,
    SUFFIX,
    TMP_PREFIX,
    LogError,
    LogSpec,
    Transition,
    chunk_files,
)

# Writer CPU per 1,000-row chunk, measured with pq.write_table on this 2-core machine (median of
# 7, float32 noise observations): Pendulum (obs 3) none 1.62 ms / 99 kB, snappy 1.77 ms / 75 kB,
# zstd-1 3.01 ms / 54 kB; HalfCheetah (obs 17) none 2.38 ms / 239 kB, snappy 2.70 ms / 207 kB,
# zstd-1 3.49 ms / 176 kB. Snappy costs the writer almost nothing over no compression and still
# shrinks the repetitive columns (ids, flags, timestamps); zstd's extra 15-28 % costs 30-70 % more
# CPU, on the machine the control loop runs on. Snappy is also Parquet's most widely read codec.
COMPRESSION = "snappy"

_STRING_COLUMNS = ("bridge_id", "bridge_session", "model_id", "shadow_model_id")

# Rows converted per step of the writer: about 0.6 ms per GIL-holding call at most (a transpose
# of 1,024 rows), short enough to leave a 1 kHz control loop its GIL turn on time.
_BUILD_ROWS = 1024

# Process-wide counter for temp and chunk names: two logs in one process never share a name.
_NAME_SEQ = itertools.count(1)


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


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and prove that a chunk can be written there (a file
    created, written, synced and removed, as a chunk's temp file is); LogError saying why not.
    Permissions alone do not tell: root passes them on a read-only mount."""
    if directory.exists() and not directory.is_dir():
        raise LogError(f"{directory}: exists and is not a directory")
    probe = directory / f"{TMP_PREFIX}{os.getpid()}-probe{SUFFIX}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"PAR1")
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
    except OSError as e:
        raise LogError(f"{directory}: cannot write a log chunk there ({e.strerror})") from None


def _fsync_dir(directory: Path) -> None:
    """Make a rename (or a new entry) in ``directory`` durable: fsync the directory itself."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        report: Callable[[str], None] | None = None,
    ) -> None:
        """``report`` gets one line when writing starts to fail and one when it works again
        (from the writer thread); the counters and ``last_error`` say the rest."""
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
        self._report = report or (lambda _line: None)
        self.failing = False  # the last write attempt failed (reported once until one works)
        self._failed_attempts = 0
        self._write_error = ""  # the last write failure, for the messages that cite it
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
        existed = d.exists()
        check_writable(d)
        if not existed:
            if self.fsync:
                _fsync_dir(d.parent)
            return
        chunks, _ = chunk_files(d)
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
        helper_thread()  # normal priority, never the loop's real-time one
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
                f"{self.max_backlog_bytes} bytes ({self._write_error})"  # never nested: bounded
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
                self._write_error = f"cannot write to {self.directory}: {type(e).__name__}: {e}"
                self.last_error = (
                    f"cannot write a chunk of {table.num_rows} transitions to {self.directory} "
                    f"({type(e).__name__}: {e}); {self.backlog_rows} waiting for a retry, "
                    f"{self.transitions_dropped} dropped so far"
                )
                self._retry_at = time.monotonic() + self.retry_seconds
                self._failed_attempts += 1
                if not self.failing:
                    self.failing = True
                    self._report(
                        f"log: {self.last_error}; retrying every {self.retry_seconds:g} s, "
                        f"keeping up to {self.max_backlog_bytes / 2**20:g} MiB in memory"
                    )
                return False
            if self.failing:
                self.failing = False
                self._report(
                    f"log: writing to {self.directory} again after {self._failed_attempts} "
                    f"failed attempts; {self.transitions_dropped} transitions lost so far"
                )
                self._failed_attempts = 0
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
                write_page_checksum=True,  # CRC-32 per page: the reader names a damaged chunk
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
