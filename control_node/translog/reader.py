"""The transition log's reader: every committed chunk of one or more log directories, as Arrow
and numpy, and the pixel segments that rebuild stacked observations bit for bit.

Reading never fails on what a crash leaves behind (a crashed writer's temp files, an unreadable
chunk): those are listed and skipped. A damaged chunk is unreadable: each page's CRC-32 is
verified, and the spec in its footer against its digest (``ddpg.spec_sha256``). Logs of different robots are refused, never mixed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from control_node.translog.schema import TMP_PREFIX, LogError, LogSpec, chunk_files


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
        chunks, temps = chunk_files(d)
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
            table = pq.read_table(path, page_checksum_verification=True)
            chunk_spec = LogSpec.from_metadata(table.schema.metadata)
            table = table.replace_schema_metadata(None).cast(chunk_spec.arrow_schema())
            size = path.stat().st_size
        except (OSError, pa.ArrowException, ValueError, TypeError, KeyError) as e:
            # LogError is a ValueError; a bit flipped in the footer (a column's name) is too
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
