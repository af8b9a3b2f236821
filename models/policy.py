"""The runtime policy: an exported ONNX actor served by onnxruntime, checked before it serves.

Nothing here imports torch, so the control node and ``ddpg eval`` start fast and stay small.
A model is refused, with an error that names the problem, unless it parses and passes
``onnx.checker``, carries every metadata field of :data:`METADATA_FORMAT`, has finite weights
whose hash is its model id, has one input ``obs`` and one output ``action`` shaped as its
metadata says, answers probe observations with finite actions inside its action bounds, and (when
the caller says what it expects) was exported for the caller's environment.

Batch-1 latency is what a fixed-rate control loop pays every tick, so the default session is
tuned for it: one intra-op thread, no spinning, and preallocated input/output buffers bound once
with IOBinding.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from models.spec import OBS_DTYPES, PixelSpec, RobotSpec, pixel_differences, pixels_dict

METADATA_FORMAT = 1
"""Version of the metadata layout below; bump it when a field changes meaning or is added."""
INPUT_NAME = "obs"
OUTPUT_NAME = "action"
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
DEFAULT_PROBES = 256
DEFAULT_MAX_BYTES = 256 * 2**20
"""The largest model file read (a deploy's limit is the node's ``max_model_mb``)."""
_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}  # fmt: skip


class PolicyError(ValueError):
    """An ONNX actor is unusable or is not what the caller expects; the message says why."""


# -- metadata ---------------------------------------------------------------------------------
def _encode_floats(values: Sequence[float]) -> str:
    """JSON list of floats; infinities as the strings "inf"/"-inf" (JSON has no infinity)."""
    out: list[float | str] = []
    for v in values:
        v = float(v)
        out.append(v if math.isfinite(v) else ("inf" if v > 0 else "-inf"))
    return json.dumps(out)


def _decode_floats(text: str) -> np.ndarray:
    values = json.loads(text)
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) or v in ("inf", "-inf") for v in values
    ):
        raise ValueError("expected a JSON list of numbers")
    return np.array([float(v) for v in values], dtype=np.float32)


def _decode_shape(text: str) -> tuple[int, ...]:
    values = json.loads(text)
    if not isinstance(values, list) or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError("expected a JSON list of positive integers")
    return tuple(values)


@dataclass(frozen=True)
class ActorMetadata:
    """What an exported actor says about itself; stored as string ``metadata_props``."""

    model_id: str
    """Content hash of the weights (see :func:`weights_hash`)."""
    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: str
    obs_low: np.ndarray
    obs_high: np.ndarray
    act_shape: tuple[int, ...]
    act_dtype: str
    act_low: np.ndarray
    act_high: np.ndarray
    obs_norm: str
    """How observations are normalised inside the graph: 'none', 'batch_norm', 'standardize'
    (the training run's running mean and variance, fixed: ``--obs-norm``) or
    'standardize+batch_norm' (both, in that order)."""
    preset: str
    run_name: str
    train_steps: int
    seed: int
    eval_seed: int
    """Seed of the trainer's deterministic evaluation, so ``ddpg eval`` can reproduce it."""
    format_version: int = METADATA_FORMAT
    pixels: str = ""
    """Pixel models only: the ``models.spec.PixelSpec`` as JSON (size, stack, repeat,
    camera, view). Optional: "" for state models, which write no such field, so their files are
    unchanged and files from before pixel models still load."""

    @property
    def robot(self) -> RobotSpec:
        """The robot this actor was exported for: what a bridge's hello and a deploy must match."""
        return RobotSpec.from_stored(self)

    def to_props(self) -> dict[str, str]:
        props: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _OPTIONAL_FIELDS and value == "":
                continue
            if isinstance(value, np.ndarray):
                props[f.name] = _encode_floats(value.tolist())
            elif isinstance(value, tuple):
                props[f.name] = json.dumps(list(value))
            else:
                props[f.name] = str(value)
        return props

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (lists for shapes and bounds, "inf" for infinite bounds)."""
        props = self.to_props()
        return {
            f.name: json.loads(props[f.name])
            if isinstance(getattr(self, f.name), np.ndarray | tuple)
            else getattr(self, f.name)
            for f in fields(self)
            if f.name in props
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> ActorMetadata:
        """Parse ``metadata_props``; a missing or malformed field is named in the error."""
        version = props.get("format_version")
        if version is None:
            raise PolicyError(
                f"{source}: metadata field 'format_version' is missing; not a model exported by "
                "ddpg export"
            )
        if version != str(METADATA_FORMAT):
            raise PolicyError(
                f"{source}: metadata format_version {version!r} is not supported "
                f"(this runtime reads {METADATA_FORMAT})"
            )
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in props:
                if f.name in _OPTIONAL_FIELDS:
                    continue
                raise PolicyError(f"{source}: metadata field {f.name!r} is missing")
            text = props[f.name]
            try:
                if f.name in ("obs_low", "obs_high", "act_low", "act_high"):
                    values[f.name] = _decode_floats(text)
                elif f.name in ("obs_shape", "act_shape"):
                    values[f.name] = _decode_shape(text)
                elif f.name in ("train_steps", "seed", "eval_seed", "format_version"):
                    values[f.name] = int(text)
                else:
                    values[f.name] = text
            except ValueError as e:
                raise PolicyError(
                    f"{source}: metadata field {f.name!r} = {text!r} is malformed: {e}"
                ) from None
        meta = cls(**values)
        meta._check_consistent(source)
        return meta

    def _check_consistent(self, source: str) -> None:
        obs_n, act_n = math.prod(self.obs_shape), math.prod(self.act_shape)
        problems = []
        if self.obs_dtype not in OBS_DTYPES:
            problems.append(f"obs_dtype {self.obs_dtype!r} is not one of {sorted(OBS_DTYPES)}")
        if self.act_dtype != "float32":
            problems.append(f"act_dtype {self.act_dtype!r} is not 'float32'")
        # Pixel bounds may be one value for every pixel (0..255): 2 x 36,864 copies of the same
        # number at 9x64x64 would be most of the metadata.
        n_bounds = (1, obs_n) if self.obs_dtype == "uint8" else (obs_n,)
        if self.obs_low.size not in n_bounds or self.obs_high.size not in n_bounds:
            problems.append(f"obs bounds do not have {obs_n} values (obs_shape {self.obs_shape})")
        if self.obs_dtype == "uint8":
            problems += _pixel_problems(self.pixels, self.obs_shape)
        elif self.pixels:
            problems.append(f"pixels is set ({self.pixels!r}) but obs_dtype is {self.obs_dtype!r}")
        if len(self.act_shape) != 1:
            problems.append(f"act_shape {self.act_shape} is not 1-D")
        if self.act_low.size != act_n or self.act_high.size != act_n:
            problems.append(
                f"action bounds do not have {act_n} values (act_shape {self.act_shape})"
            )
        elif not (np.isfinite(self.act_low).all() and np.isfinite(self.act_high).all()):
            problems.append("action bounds are not finite")
        elif not (self.act_low <= self.act_high).all():
            problems.append("action low bound exceeds high bound")
        if self.obs_norm not in OBS_NORMS:
            problems.append(f"obs_norm {self.obs_norm!r} is not one of {list(OBS_NORMS)}")
        if problems:
            raise PolicyError(f"{source}: inconsistent metadata: {'; '.join(problems)}")


_OPTIONAL_FIELDS = frozenset({"pixels"})
OBS_NORMS = ("none", "batch_norm", "standardize", "standardize+batch_norm")
_ONNX_TYPES = {"float32": "tensor(float)", "uint8": "tensor(uint8)"}


def pixel_spec_dict(meta: ActorMetadata) -> dict[str, Any] | None:
    """The pixel spec of a pixel model as a dict (``PixelSpec.from_dict`` takes it); None for a
    state model. Kept as a dict so this module does not import the simulator side."""
    return json.loads(meta.pixels) if meta.pixels else None


def _pixel_problems(pixels: str, obs_shape: tuple[int, ...]) -> list[str]:
    """A uint8 model must name its pixel spec, a valid one, and the spec must give its
    observation shape."""
    if not pixels:
        return ["obs_dtype is 'uint8' but the pixel spec (metadata field 'pixels') is missing"]
    try:
        spec = PixelSpec.from_dict(json.loads(pixels))
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not a map, a bad value
        return [f"pixels {pixels!r} is not a JSON pixel spec with size, stack and repeat ({e})"]
    if tuple(obs_shape) != spec.obs_shape:
        return [f"obs_shape {obs_shape} does not match the pixel spec {pixels}"]
    return []


def weights_hash(model: onnx.ModelProto) -> str:
    """The model id: sha256 over the initializers (name, dtype, shape, bytes) in name order,
    first 16 hex digits. Metadata is left out, so re-exporting the same weights keeps the id."""
    h = hashlib.sha256()
    for init in sorted(model.graph.initializer, key=lambda t: t.name):
        array = np.ascontiguousarray(numpy_helper.to_array(init))
        h.update(f"{init.name}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def read_metadata(model: onnx.ModelProto, source: str = "model") -> ActorMetadata:
    return ActorMetadata.from_props({p.key: p.value for p in model.metadata_props}, source)


# -- checks -----------------------------------------------------------------------------------
def read_model_file(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a model file, refused unless it is a regular file of at most ``max_bytes``:
    opened without blocking (a FIFO never answers a blocking open) and measured before it is
    read (``/dev/zero`` never ends)."""
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise PolicyError(f"{source}: cannot read model file: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
            raise PolicyError(f"{source}: is {kind}, not a regular model file")
        if st.st_size > max_bytes:
            raise PolicyError(
                f"{source}: {st.st_size / 2**20:.1f} MB, over the limit of {max_bytes / 2**20:g} MB"
            )
        os.set_blocking(fd, True)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PolicyError(f"{source}: grew past the limit of {max_bytes / 2**20:g} MB while read")
    return data


def time_batch1(
    policy: OnnxPolicy, max_runs: int = 200, max_s: float = 1.0, give_up_ns: int | None = None
) -> list[int]:
    """Batch-1 inference times (ns) on probe observations, as the loop runs it (the bound
    batch of 1): up to ``max_runs`` runs or ``max_s`` seconds, after 3 warm-up runs; stops
    after 3 runs once the median is over ``give_up_ns``."""  # fmt: skip
    one = policy.batch(1)
    probes = probe_observations(policy.metadata, 16, seed=1)
    for i in range(3):
        one.obs[0] = probes[i]
        one.run()
    times: list[int] = []
    end = time.monotonic() + max_s
    while len(times) < max_runs and (len(times) < 3 or time.monotonic() < end):
        one.obs[0] = probes[len(times) % len(probes)]
        t0 = time.perf_counter_ns()
        one.run()
        times.append(time.perf_counter_ns() - t0)
        if (
            give_up_ns is not None
            and len(times) >= 3
            and sorted(times)[len(times) // 2] > give_up_ns
        ):
            break
    return times


def load_checked_proto(data: bytes, source: str) -> tuple[onnx.ModelProto, ActorMetadata]:
    """Parse and statically check a serialized actor: structure, metadata, weights, model id."""
    if not data:
        raise PolicyError(f"{source}: file is empty")
    try:
        model = onnx.load_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise PolicyError(
            f"{source}: not a readable ONNX model (truncated or corrupt?): {e}"
        ) from None
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PolicyError(f"{source}: fails onnx.checker: {first}") from None
    meta = read_metadata(model, source)
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise PolicyError(
                f"{source}: weight {init.name!r} holds {bad} non-finite value(s) (NaN/inf)"
            )
    actual = weights_hash(model)
    if actual != meta.model_id:
        raise PolicyError(
            f"{source}: weights hash {actual} does not match metadata model_id {meta.model_id} "
            "(weights changed after export?)"
        )
    return model, meta


def _check_io(session: ort.InferenceSession, meta: ActorMetadata, source: str) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
        raise PolicyError(
            f"{source}: graph inputs {[i.name for i in inputs]} and outputs "
            f"{[o.name for o in outputs]}; expected ['{INPUT_NAME}'] and ['{OUTPUT_NAME}']"
        )
    for arg, shape, dtype in (
        (inputs[0], meta.obs_shape, meta.obs_dtype),
        (outputs[0], meta.act_shape, "float32"),
    ):
        if arg.type != _ONNX_TYPES[dtype]:
            raise PolicyError(f"{source}: {arg.name!r} has type {arg.type}, expected {dtype}")
        dims = list(arg.shape)
        if len(dims) != 1 + len(shape) or isinstance(dims[0], int):
            raise PolicyError(
                f"{source}: {arg.name!r} has shape {dims}, expected [batch, *{list(shape)}] "
                "with a dynamic batch dimension"
            )
        if tuple(dims[1:]) != shape:
            raise PolicyError(
                f"{source}: {arg.name!r} has shape {dims}, but the metadata says {list(shape)}"
            )


def check_expected(meta: ActorMetadata, expect: RobotSpec, source: str) -> None:
    """Refuse a model exported for another robot: environment id, observation dtype, pixel
    spec (two pixel specs of one shape, another action repeat, camera or view, are different
    robots), observation shape and action bounds must all be the model's."""
    if meta.env_id != expect.env_id:
        raise PolicyError(
            f"{source}: model was exported for env {meta.env_id!r}, not {expect.env_id!r}"
        )
    if expect.obs_dtype != meta.obs_dtype:
        raise PolicyError(
            f"{source}: model observations are {meta.obs_dtype}, env {expect.env_id!r} sends "
            f"{expect.obs_dtype}"
        )
    if diff := pixel_differences(pixel_spec_dict(meta), pixels_dict(expect.pixels)):
        raise PolicyError(
            f"{source}: model pixel spec differs from the one expected for env "
            f"{expect.env_id!r}: {'; '.join(diff)} (model vs expected)"
        )
    if tuple(meta.obs_shape) != tuple(expect.obs_shape):
        raise PolicyError(
            f"{source}: model observations are {meta.obs_shape}, env {expect.env_id!r} has "
            f"{tuple(expect.obs_shape)}"
        )
    low, high = expect.act_low, expect.act_high
    if low.shape != meta.act_low.shape or not (
        np.array_equal(low, meta.act_low) and np.array_equal(high, meta.act_high)
    ):
        raise PolicyError(
            f"{source}: model action bounds [{meta.act_low.tolist()}, {meta.act_high.tolist()}] "
            f"differ from env {expect.env_id!r}'s [{low.tolist()}, {high.tolist()}]"
        )


def probe_observations(meta: ActorMetadata, n: int, seed: int = 0, wide: bool = True) -> np.ndarray:
    """Deterministic probe inputs: standard normal (with ``wide``, a quarter of them scaled by 10
    to reach saturation), clipped to the observation bounds where those are finite. For a pixel
    model (``obs_dtype`` uint8): uniform random uint8 images within the bounds (0..255)."""
    rng = np.random.default_rng(seed)
    if meta.obs_dtype == "uint8":
        low = np.broadcast_to(meta.obs_low, (math.prod(meta.obs_shape),))
        high = np.broadcast_to(meta.obs_high, (math.prod(meta.obs_shape),))
        lo = np.clip(low, 0, 255).astype(np.int64).reshape(meta.obs_shape)
        hi = np.clip(high, 0, 255).astype(np.int64).reshape(meta.obs_shape)
        return rng.integers(lo, hi, size=(n, *meta.obs_shape), endpoint=True, dtype=np.uint8)
    x = rng.standard_normal((n, *meta.obs_shape)).astype(np.float32)
    if wide:
        x[: n // 4] *= 10.0
    low, high = meta.obs_low.reshape(meta.obs_shape), meta.obs_high.reshape(meta.obs_shape)
    return np.clip(x, low, high).astype(np.float32)


def _check_outputs(actions: np.ndarray, meta: ActorMetadata, source: str) -> None:
    if not np.isfinite(actions).all():
        bad = int(actions.size - np.isfinite(actions).sum())
        raise PolicyError(f"{source}: {bad} non-finite action value(s) on probe observations")
    # tanh * scale + bias may land one float32 ulp outside a bound; more than that is a bug.
    tol = 1e-5 * np.maximum(1.0, np.maximum(np.abs(meta.act_low), np.abs(meta.act_high)))
    below = actions < meta.act_low - tol
    above = actions > meta.act_high + tol
    if below.any() or above.any():
        i = int(np.argmax((below | above).any(axis=0)))
        raise PolicyError(
            f"{source}: action[{i}] reaches [{actions[:, i].min():.4g}, {actions[:, i].max():.4g}] "
            f"on probe observations, outside its bounds [{meta.act_low[i]:.4g}, "
            f"{meta.act_high[i]:.4g}] (is the tanh output scaled to the bounds in the graph?)"
        )


# -- sessions ---------------------------------------------------------------------------------
def session_options(tuned: bool = True, threads: int = 1) -> ort.SessionOptions:
    """Tuned for batch-1 latency: ``threads`` intra-op threads, sequential, no spinning."""
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only; provider fallback is reported once by us
    if tuned:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def _make_session(
    data: bytes, provider: str, so: ort.SessionOptions, source: str
) -> ort.InferenceSession:
    """A session on ``provider``; a GPU provider that is missing or cannot start falls back to
    the CPU with one line on stderr (instead of onnxruntime's screenful)."""
    if provider not in PROVIDERS:
        raise PolicyError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    if provider != "cpu":
        reason = f"{wanted} is not in this onnxruntime build"
        if wanted in ort.get_available_providers():
            reason = "no GPU, or its CUDA/cuDNN/TensorRT libraries are missing"
            ort.set_default_logger_severity(4)
            try:
                session = ort.InferenceSession(
                    data, so, providers=[wanted, "CPUExecutionProvider"], enable_fallback=0
                )
                if session.get_providers()[0] == wanted:
                    return session
            except Exception:  # onnxruntime says why at length; the line below says it short
                pass
            finally:
                ort.set_default_logger_severity(2)  # onnxruntime's default: warnings
        print(
            f"policy: {wanted} unavailable ({reason}); using CPUExecutionProvider", file=sys.stderr
        )
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise PolicyError(f"{source}: onnxruntime cannot load it: {e}") from None


class OnnxPolicy:
    """A checked ONNX actor: ``policy(obs)`` for one observation ``obs_shape`` -> ``(act_dim,)``
    or a batch ``(B, *obs_shape)`` -> ``(B, act_dim)``, in the environment's units.

    ``expect`` (a ``RobotSpec``) makes loading fail unless the model was exported for that
    environment. ``provider`` is 'cpu' (default; fastest for small MLPs), 'cuda' or 'tensorrt';
    an unavailable one falls back to the CPU with one line on stderr.
    """

    def __init__(
        self,
        path: str | Path,
        expect: RobotSpec | None = None,
        provider: str = "cpu",
        threads: int = 1,
        probes: int = DEFAULT_PROBES,
        data: bytes | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        """``data``: the file's bytes, already read (a deploy reads them once, so what is
        measured and what serves are the same); else ``path`` is read (:func:`read_model_file`
        with ``max_bytes``)."""
        self.path = Path(path)
        source = str(self.path)
        if data is None:
            data = read_model_file(self.path, max_bytes)
        _, self.metadata = load_checked_proto(data, source)
        meta = self.metadata
        if expect is not None:
            check_expected(meta, expect, source)
        self.session = _make_session(data, provider, session_options(True, threads), source)
        self.provider = self.session.get_providers()[0]
        _check_io(self.session, meta, source)
        self.obs_shape = meta.obs_shape
        self.act_dim = meta.act_shape[0]
        try:
            actions = self._run_batch(probe_observations(meta, probes))
        except Exception as e:
            raise PolicyError(f"{source}: fails on probe observations: {e}") from None
        _check_outputs(actions, meta, source)
        # Preallocated buffers bound once per batch size (the loop's usual batch of 1 is made
        # here, off the loop's thread when a deploy loads it); views and the bound method are
        # looked up once, not per call: each lookup costs ~0.3 µs.
        self._obs_dtype = OBS_DTYPES[meta.obs_dtype]
        self._batches: dict[int, BoundBatch] = {}
        self._one = self.batch(1)
        self._obs1_view, self._act1_view = self._one.obs[0], self._one.act[0]

    @property
    def model_id(self) -> str:
        return self.metadata.model_id

    def _run_batch(self, obs: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: obs})[0]

    def batch(self, n: int) -> BoundBatch:
        """Buffers for a batch of ``n`` observations, bound to the session once (kept per
        ``n``): write the observations into ``.obs``, call ``.run()``, read ``.act``."""
        bound = self._batches.get(n)
        if bound is None:
            bound = self._batches[n] = BoundBatch(self, n)
        return bound

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=self._obs_dtype)
        if obs.shape == self.obs_shape:
            self._obs1_view[...] = obs
            self._one.run()
            return self._act1_view.copy()
        if obs.ndim == len(self.obs_shape) + 1 and obs.shape[1:] == self.obs_shape:
            return self._run_batch(np.ascontiguousarray(obs))
        raise PolicyError(
            f"observation of shape {obs.shape}; this policy takes {self.obs_shape} or "
            f"(batch, {', '.join(map(str, self.obs_shape))})"
        )


class BoundBatch:
    """Observation and action buffers for ``n`` rows, preallocated and bound with IOBinding on
    the CPU provider, so a run copies nothing in or out: ``run()`` reads ``obs`` and writes
    ``act`` in place (the next run overwrites it). Other providers run the session on ``obs``
    and copy the result into ``act``.

    ``values`` holds every float of the batch: float32 observations and the actions share one
    buffer (each part 64-byte aligned, zeros between them), so one pass checks both for
    non-finite values; with uint8 observations it is ``act``."""

    __slots__ = ("act", "obs", "run", "values")

    def __init__(self, policy: OnnxPolicy, n: int) -> None:
        meta, session = policy.metadata, policy.session
        obs_dtype, act_size = OBS_DTYPES[meta.obs_dtype], n * policy.act_dim
        obs_size = n * math.prod(meta.obs_shape)
        if obs_dtype == np.float32:
            act_at = -(-obs_size // 16) * 16  # in floats: 16 floats are 64 bytes
            raw = np.zeros(act_at + act_size + 16, dtype=np.float32)
            start = (-raw.ctypes.data % 64) // 4
            self.values = raw[start : start + act_at + act_size]
            self.obs = self.values[:obs_size].reshape(n, *meta.obs_shape)
            self.act = self.values[act_at:].reshape(n, policy.act_dim)
        else:
            self.obs = np.zeros((n, *meta.obs_shape), dtype=obs_dtype)
            self.act = self.values = np.zeros((n, policy.act_dim), dtype=np.float32)
        if policy.provider == "CPUExecutionProvider":
            binding = session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, self.obs)
            binding.bind_output(
                OUTPUT_NAME, "cpu", 0, np.float32, self.act.shape, self.act.ctypes.data
            )
            self.run: Callable[[], None] = _direct_run(session, binding, self.act)
        else:
            run, act, feed = session.run, self.act, {INPUT_NAME: self.obs}

            def run_copy() -> None:
                act[...] = run([OUTPUT_NAME], feed)[0]

            self.run = run_copy


def _direct_run(
    session: ort.InferenceSession, binding: ort.IOBinding, act: np.ndarray
) -> Callable[[], None]:
    """``session.run_with_iobinding(binding)`` without its Python wrapper, which checks for
    WebGPU graph capture on every call (a CPU session never captures): ~1 µs, and ~8 µs with
    cold caches, of a ~7 µs run. The wrapper's own attributes are private, so this falls back
    to the public call unless the direct one is there and writes the same actions into ``act``
    (the bound output)."""
    public = functools.partial(session.run_with_iobinding, binding)
    inner, bound = getattr(session, "_sess", None), getattr(binding, "_iobinding", None)
    if inner is None or bound is None or not hasattr(inner, "run_with_iobinding"):
        return public
    direct = functools.partial(inner.run_with_iobinding, bound, None)
    try:
        public()
        expected = act.copy()
        act[...] = np.nan
        direct()
        same = np.array_equal(act, expected)
    except Exception:  # an onnxruntime whose internals differ: the public call
        return public
    return direct if same else public
