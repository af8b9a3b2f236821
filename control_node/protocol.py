"""The wire protocol between bridges and the node (documented for other languages in
``docs/protocol.md``).

A message is a ZeroMQ multipart message: one msgpack header frame, then one raw frame per array.
The header is a map with the protocol version ``v``, the message ``type``, the type's fields and
``arrays``: a list of ``[name, dtype, shape]`` describing the frames that follow, in order, as
C-contiguous little-endian bytes. Nothing is ever pickled. :func:`decode` checks everything a
peer could get wrong and raises :class:`ProtocolError` with a code and a reason, which the node
sends back and counts.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}

HELLO, WELCOME, OBS, ACTION, ERROR, BYE = "hello", "welcome", "obs", "action", "error", "bye"

# Required header fields per message type: name -> accepted Python types after msgpack decoding.
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)
_LIST = (list,)
FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    HELLO: {
        "bridge_id": _STR,
        "session": _STR,
        "env_id": _STR,
        "obs_shape": _LIST,
        "obs_dtype": _STR,
        "act_low": _LIST,
        "act_high": _LIST,
        "mode": _STR,
        "rate_hz": _NUM,
        "pid": _INT,
    },
    WELCOME: {"model_id": _STR, "rate_hz": _NUM, "watchdog_ms": _NUM, "pid": _INT},
    OBS: {
        "bridge_id": _STR,
        "episode": _INT,
        "step": _INT,
        "reward": _NUM,
        "terminated": _BOOL,
        "truncated": _BOOL,
        "applied_seq": _INT,
        "applied_safe": _BOOL,
        "t_obs_ns": _INT,
        "t_send_ns": _INT,
    },
    ACTION: {
        "seq": _INT,
        "episode": _INT,
        "step": _INT,
        "model_id": _STR,
        "safe": _BOOL,
        "t_obs_ns": _INT,
        "t_recv_ns": _INT,
        "t_send_ns": _INT,
    },
    ERROR: {"code": _STR, "reason": _STR},
    BYE: {"reason": _STR},
}
# Arrays per message type: name -> required? ("action" on an observation is the action the bridge
# applied to produce it; absent on the first observation of an episode).
ARRAYS: dict[str, dict[str, bool]] = {
    HELLO: {"safe_action": False},
    WELCOME: {"safe_action": True},
    OBS: {"obs": True, "action": False},
    ACTION: {"action": True},
    ERROR: {},
    BYE: {},
}
MODES = ("realtime", "lockstep")

# The fast check of a message's fields: every required field at once, by the exact Python type
# msgpack gives it in the usual case (a number as a float). A header that fails it (a missing
# field, a wrong type, a number sent as an int) takes the field-by-field check, which accepts
# or refuses it with the reason it always gave.
_USUAL = {_INT: int, _NUM: float, _STR: str, _BOOL: bool, _LIST: list}
_FAST_FIELDS = {
    t: (operator.itemgetter(*f), tuple(_USUAL[types] for types in f.values()))
    for t, f in FIELDS.items()
    if len(f) > 1
}
_FINITE = {
    t: tuple(n for n, types in f.items() if types is _NUM and n != "reward")
    for t, f in FIELDS.items()
}
_LAYOUTS: dict[str, list[tuple[list[Any], tuple[tuple[str, np.dtype, tuple[int, ...], int], ...]]]]
_LAYOUTS = {t: [] for t in FIELDS}
"""Per type, the array specs already accepted (at most ``_MAX_LAYOUTS``) and their layouts: a
bridge sends the same one or two spec lists all its life, so one list comparison replaces
checking each spec."""
_MAX_LAYOUTS = 8
_unpackb = msgpack.unpackb


def short(value: Any, limit: int = 64) -> str:
    """``repr(value)`` cut to ``limit`` characters, for log lines and error replies: a peer's
    value can be megabytes long or hold control bytes (repr escapes them; a str's repr is
    taken of at most ``4 * limit`` characters of it, so a huge one costs nothing)."""
    if isinstance(value, str | bytes) and len(value) > 4 * limit:
        value = value[: 4 * limit]
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def max_frame_bytes(obs_nbytes: int) -> int:
    """The largest frame a node accepts (ZeroMQ's MAXMSGSIZE, applied per frame): a header, or
    one observation array."""
    return max(MAX_HEADER_BYTES, obs_nbytes)


class ProtocolError(ValueError):
    """A message that cannot be accepted. ``code`` is a short machine-readable word (counted per
    code by the node); the message text is the human reason sent back to the peer."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class Message:
    type: str
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def now_ns() -> int:
    """The shared clock: CLOCK_MONOTONIC is system-wide, so processes on one machine agree."""
    return time.monotonic_ns()


def set_timer_slack(ns: int = 1000) -> None:
    """Ask Linux to wake this thread within ``ns`` of its timeouts: the default slack of 50 us
    is a twentieth of a 1 kHz period. Ignored where prctl is unavailable."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, ns, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def encode(
    msg_type: str, fields: dict[str, Any], arrays: dict[str, np.ndarray] | None = None
) -> list[bytes | memoryview]:
    """Frames for ``socket.send_multipart`` (arrays are sent zero-copy as memoryviews)."""
    specs: list[list[Any]] = []
    buffers: list[bytes | memoryview] = []
    for name, array in (arrays or {}).items():
        a = np.ascontiguousarray(array)
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        a = a.astype(dtype, copy=False)
        specs.append([name, dtype.name, list(a.shape)])
        buffers.append(memoryview(a).cast("B"))
    header = {"v": PROTOCOL_VERSION, "type": msg_type, **fields, "arrays": specs}
    return [msgpack.packb(header, use_bin_type=True), *buffers]


class ActionFrames:
    """The frames of an ``action`` message, byte for byte what :func:`encode` makes of the
    serving fields (in their order), from a template: the constant parts of the header are
    packed once, and each call packs only the fields in one msgpack call (no dict, no array
    specs). For actions with ``safe`` false (a safe action carries a ``note``: use
    :func:`encode`). One per thread: it keeps a msgpack packer."""

    def __init__(self, act_dim: int) -> None:
        pack = msgpack.Packer(use_bin_type=True).pack
        # a map of 11 keys: v, type, the 8 fields, arrays (fixmap: 0x80 | 11)
        self._head = b"\x8b" + pack("v") + pack(PROTOCOL_VERSION) + pack("type") + pack(ACTION)
        self._tail = pack("arrays") + pack([["action", "float32", [act_dim]]])
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def __call__(
        self,
        seq: int,
        episode: int,
        step: int,
        model_id: str,
        t_obs_ns: int,
        t_recv_ns: int,
        t_send_ns: int,
        action: np.ndarray,
    ) -> list[bytes]:
        """``action``: float32, C-contiguous, ``act_dim`` values (little-endian machines)."""
        # the 8 key/value pairs packed as one 16-item array: its items are the map's entries,
        # after a 3-byte array16 header (0xdc 0x00 0x10)
        pairs = self._pack(
            (
                "seq", seq, "episode", episode, "step", step, "model_id", model_id,
                "safe", False, "t_obs_ns", t_obs_ns, "t_recv_ns", t_recv_ns,
                "t_send_ns", t_send_ns,
            )
        )  # fmt: skip
        return [self._head + pairs[3:] + self._tail, action.tobytes()]


def decode(frames: Sequence[bytes | memoryview]) -> Message:
    """Parse and check one message; raises :class:`ProtocolError` naming the first problem.

    The arrays are read-only views of their frames (no copy); ``fields`` is the header itself
    less ``v``, ``type`` and ``arrays``."""
    if not frames:
        raise ProtocolError("bad_frames", "empty message")
    frame = frames[0]
    if len(frame) > MAX_HEADER_BYTES:  # before any copy: the size is known without one
        raise ProtocolError("bad_header", f"header is {len(frame)} bytes (max {MAX_HEADER_BYTES})")
    try:
        header = _unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several types for garbage
        raise ProtocolError("bad_header", f"header is not msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", f"header is a msgpack {type(header).__name__}, not a map")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_version", f"protocol version {version!r} is not supported (this node speaks 1)"
        )
    msg_type = header.get("type")
    if not isinstance(msg_type, str) or msg_type not in FIELDS:
        raise ProtocolError("bad_type", f"unknown message type {msg_type!r}")
    fast = _FAST_FIELDS.get(msg_type)
    try:
        usual = fast is not None and tuple(map(type, fast[0](header))) == fast[1]
    except KeyError:  # a field is missing: the full check names it
        usual = False
    if usual:
        for name in _FINITE[msg_type]:
            if not math.isfinite(header[name]):
                raise ProtocolError("bad_field", f"{msg_type}: field {name!r} is not finite")
    else:
        _check_fields(msg_type, header)
    specs = header.pop("arrays", [])
    del header["v"], header["type"]
    return Message(msg_type, header, _arrays_fast(msg_type, specs, frames))


def _check_fields(msg_type: str, header: dict[str, Any]) -> None:
    for name, types in FIELDS[msg_type].items():
        if name not in header:
            raise ProtocolError("bad_field", f"{msg_type}: field {name!r} is missing")
        value = header[name]
        # bool is an int in Python; an int field must not accept True, nor a bool field 1.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(
                "bad_field",
                f"{msg_type}: field {name!r} = {value!r} should be "
                f"{' or '.join(t.__name__ for t in types)}",
            )
        if isinstance(value, float) and not math.isfinite(value) and name != "reward":
            raise ProtocolError("bad_field", f"{msg_type}: field {name!r} is not finite")


def _arrays_fast(
    msg_type: str, specs: Any, frames: Sequence[bytes | memoryview]
) -> dict[str, np.ndarray]:
    """Views of the array frames; specs seen before skip the per-spec checks. Only the frame
    count and lengths can then be wrong, and they are checked in the order ``_arrays`` checks
    them, so the first problem named is the same."""
    layout = _known_layout(msg_type, specs)
    if layout is None:
        out = _arrays(msg_type, specs, frames[1:])  # checks everything, or raises
        seen = _LAYOUTS[msg_type]
        if len(seen) >= _MAX_LAYOUTS:
            del seen[0]
        layout = tuple((name, a.dtype, a.shape, a.nbytes) for name, a in out.items())
        seen.append(([[n, d, list(s)] for n, d, s in specs], layout))
        return out
    if len(layout) != len(frames) - 1:
        raise ProtocolError(
            "bad_array",
            f"{msg_type}: header describes {len(layout)} array(s) but {len(frames) - 1} "
            "frame(s) follow it",
        )
    out = {}
    frombuffer = np.frombuffer
    for (name, dtype, shape, nbytes), buf in zip(layout, frames[1:], strict=True):
        if len(buf) != nbytes:
            raise ProtocolError(
                "bad_shape",
                f"{msg_type}: array {name!r} is {len(buf)} bytes; {dtype.name} {list(shape)} "
                f"needs {nbytes}",
            )
        a = frombuffer(buf, dtype=dtype)
        out[name] = a if len(shape) == 1 else a.reshape(shape)
    return out


def _known_layout(msg_type: str, specs: Any) -> tuple[Any, ...] | None:
    for known, layout in _LAYOUTS[msg_type]:
        if specs == known:
            # == takes True and 17.0 for 1 and 17: a shape must hold ints
            for spec in specs:
                for d in spec[2]:
                    if type(d) is not int:
                        return None
            return layout
    return None


def _arrays(
    msg_type: str, specs: Any, buffers: Sequence[bytes | memoryview]
) -> dict[str, np.ndarray]:
    if not isinstance(specs, list):
        raise ProtocolError("bad_array", f"{msg_type}: 'arrays' must be a list")
    if len(specs) != len(buffers):
        raise ProtocolError(
            "bad_array",
            f"{msg_type}: header describes {len(specs)} array(s) but {len(buffers)} "
            "frame(s) follow it",
        )
    allowed = ARRAYS[msg_type]
    out: dict[str, np.ndarray] = {}
    for spec, buf in zip(specs, buffers, strict=True):
        if (
            not isinstance(spec, list)
            or len(spec) != 3
            or not isinstance(spec[0], str)
            or not isinstance(spec[2], list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in spec[2])
        ):
            raise ProtocolError(
                "bad_array", f"{msg_type}: array spec {spec!r} is not [name, dtype, shape]"
            )
        name, dtype_name, shape = spec
        if not isinstance(dtype_name, str):
            raise ProtocolError("bad_dtype", f"{msg_type}: array {name!r} dtype is not a string")
        if name not in allowed:
            raise ProtocolError("bad_array", f"{msg_type}: unexpected array {name!r}")
        if name in out:
            raise ProtocolError("bad_array", f"{msg_type}: array {name!r} appears twice")
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise ProtocolError(
                "bad_dtype",
                f"{msg_type}: array {name!r} has dtype {dtype_name!r}; allowed: {sorted(DTYPES)}",
            )
        expected = math.prod(shape) * dtype.itemsize
        if len(buf) != expected:
            raise ProtocolError(
                "bad_shape",
                f"{msg_type}: array {name!r} is {len(buf)} bytes; {dtype_name} {shape} needs "
                f"{expected}",
            )
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    for name, required in allowed.items():
        if required and name not in out:
            raise ProtocolError("bad_array", f"{msg_type}: array {name!r} is missing")
    return out


# -- message builders (one place that knows each message's fields) ----------------------------
def hello(
    bridge_id: str,
    session: str,
    env_id: str,
    obs_shape: Sequence[int],
    obs_dtype: str,
    act_low: np.ndarray,
    act_high: np.ndarray,
    mode: str,
    rate_hz: float,
    pid: int,
    pixels: dict[str, Any] | None = None,
) -> list[bytes | memoryview]:
    """``pixels``: the bridge's pixel spec (size, stack, repeat, camera) when it sends rendered
    frames; a state bridge leaves the field out, so its hello is byte for byte as before."""
    extra = {} if pixels is None else {"pixels": dict(pixels)}
    return encode(
        HELLO,
        {
            "bridge_id": bridge_id,
            "session": session,
            "env_id": env_id,
            "obs_shape": [int(d) for d in obs_shape],
            "obs_dtype": obs_dtype,
            "act_low": [float(x) for x in act_low],
            "act_high": [float(x) for x in act_high],
            "mode": mode,
            "rate_hz": float(rate_hz),
            "pid": pid,
            **extra,
        },
    )


def error(code: str, reason: str) -> list[bytes | memoryview]:
    return encode(ERROR, {"code": code, "reason": reason})
