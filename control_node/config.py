"""Typed configuration of the node, the bridges and a launch, loaded from ``launch.yaml``.

Every section is a dataclass with one docstring per field; :func:`from_mapping` turns a YAML
mapping into one, refusing unknown keys and values of the wrong type or out of range with a
message that names the key (``node.rate_hz = -5: must be > 0``).
"""

from __future__ import annotations

import ast
import errno
import functools
import inspect
import itertools
import os
import reprlib
import socket
import stat
import textwrap
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from models.spec import PixelSpec

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message names the key."""


MAX_YAML_BYTES = 256 * 1024
"""The largest YAML file read (launch.yaml, a run's config.yaml): a launch file of a hundred
bridges is about 50 kB, and libyaml composes 256 kB of the worst kind in about 0.3 s."""
MAX_YAML_VALUES = 100_000
"""The most values a YAML document may expand to, each use of an alias counting its whole
anchored value again (an alias bomb is a few hundred bytes that expand to billions)."""
BRIEF_CHARS = 80
"""The longest a value is quoted in an error message."""

_BRIEF = reprlib.Repr()  # Python 3.11's takes no arguments
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxlong, _BRIEF.maxother = 2, 60, 40, 40
_BRIEF.maxtuple = _BRIEF.maxlist = _BRIEF.maxdict = _BRIEF.maxset = 4


def brief(value: object) -> str:
    """A repr of ``value`` of at most BRIEF_CHARS characters, computed without building the
    whole repr (an aliased list of a billion items stays cheap to quote)."""
    text = _BRIEF.repr(value)
    return text if len(text) <= BRIEF_CHARS else text[: BRIEF_CHARS - 3] + "..."


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``, bounded: a regular file of at most MAX_YAML_BYTES whose
    values, aliases expanded, number at most MAX_YAML_VALUES. ConfigError naming the file."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or /dev/zero would block or never end
            raise ConfigError(f"{path}: not a regular file")
        if info.st_size > MAX_YAML_BYTES:
            raise ConfigError(
                f"{path}: {info.st_size} bytes; a config file is at most {MAX_YAML_BYTES}"
            )
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_YAML_BYTES:  # it grew since the stat
        raise ConfigError(f"{path}: more than {MAX_YAML_BYTES} bytes; too large for a config")
    loader = _Loader(raw)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values = _expanded_size(node, MAX_YAML_VALUES)
        if values > MAX_YAML_VALUES:
            raise ConfigError(
                f"{path}: expands to more than {MAX_YAML_VALUES} values (each use of an alias "
                "counts its whole value again); not a config"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML: {first[:200]}") from None
    except ConfigError:
        raise
    except (ValueError, RecursionError) as e:  # an int of 5,000 digits; nesting
        raise ConfigError(f"{path}: not a usable YAML config: {str(e)[:200]}") from None
    finally:
        loader.dispose()


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """How many values the node graph ``root`` stands for once aliases are expanded (an alias
    is the same node object as its anchor, so the graph is small; the count is not), capped at
    ``limit + 1``; a value that contains itself (``&a [*a]``) counts as over the limit.
    Iterative: no recursion limit."""
    sizes: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[yaml.Node] = [root]
    while stack:
        node = stack[-1]
        key = id(node)
        if key in sizes:
            stack.pop()
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if key in entered:  # its children are done (or one is an ancestor: a cycle)
            stack.pop()
            total = 1 + sum(sizes.get(id(c), limit + 1) for c in children)
            sizes[key] = min(limit + 1, total)
            continue
        entered.add(key)
        for child in children:
            if id(child) in entered and id(child) not in sizes:
                return limit + 1  # a cycle: it would expand forever
            if id(child) not in sizes:
                stack.append(child)
    return sizes[id(root)]


SCHED_POLICIES = ("fifo", "rr", "other")
GC_POLICIES = ("freeze", "default")
CPU_CHOICES = ("auto", "all")
MAX_RT_PRIORITY = 80


@dataclass
class RealtimeConfig:
    """Real-time settings of one process (``node.realtime``, ``bridges[].realtime``); applied
    at start-up by ``control_node/realtime.py``, which says in one line what it could not set."""

    sched_policy: str = "fifo"
    """Scheduling policy of the loop thread and ZeroMQ's I/O thread (a bridge's one priority
    above its loop): fifo, rr or other (the default time-sharing scheduler). fifo needs
    CAP_SYS_NICE or an rtprio limit."""
    sched_priority: int = 50
    """Real-time priority (1..80) with fifo or rr; the node 50 as ros2_control uses, bridges
    40; ignored with other. Kept below the kernel's own real-time threads (99)."""
    lock_memory: bool = True
    """Lock every page of the process in RAM (mlockall current and future), so the loop never
    waits for a page fault; needs CAP_IPC_LOCK or an unlimited memlock limit."""
    cpus: str | list[int] = "auto"
    """CPUs to run on: a list, all (no pinning), or auto: the launcher keeps the node and the
    bridges on separate CPUs when there are at least two (a lone process: no pinning)."""
    cpu_idle_poll: bool = True
    """While the process runs, keep idle CPUs polling instead of halting: a PM QoS request of
    0 us on /dev/cpu_dma_latency, as cyclictest makes. A halted CPU (a virtual machine's vCPU
    above all) wakes tens to hundreds of microseconds late for a message or a deadline; costs
    power on idle CPUs. Needs write access to /dev/cpu_dma_latency (root, or a udev rule)."""
    gc: str = "freeze"
    """Garbage collector: freeze (after start-up, freeze what exists; the node then collects
    only in its loop's slack before a deadline, a bridge as usual) or default (Python's own)."""

    def validate(self) -> None:
        if self.sched_policy not in SCHED_POLICIES:
            raise ConfigError(
                f"sched_policy = {brief(self.sched_policy)}: choose fifo, rr or other"
            )
        if not 1 <= self.sched_priority <= MAX_RT_PRIORITY:
            raise ConfigError(
                f"sched_priority = {self.sched_priority}: must be in 1..{MAX_RT_PRIORITY} "
                "(below the kernel's own real-time threads)"
            )
        if isinstance(self.cpus, str):
            if self.cpus not in CPU_CHOICES:
                raise ConfigError(f"cpus = {brief(self.cpus)}: a list of CPU numbers, auto or all")
        elif not self.cpus or any(c < 0 for c in self.cpus):
            raise ConfigError(f"cpus = {brief(self.cpus)}: a non-empty list of CPU numbers >= 0")
        if self.gc not in GC_POLICIES:
            raise ConfigError(f"gc = {brief(self.gc)}: choose freeze or default")


@dataclass
class NodeConfig:
    """The control node (``ddpg serve``)."""

    model: str
    """Path of the ONNX actor to serve (relative paths are relative to launch.yaml)."""
    bind: str = "tcp://127.0.0.1:5555"
    """Where bridges connect (ZeroMQ endpoint; loopback by default, ipc:// works too)."""
    admin: str = "tcp://127.0.0.1:5556"
    """Admin endpoint answering ``ddpg status`` and ``ddpg deploy``."""
    rate_hz: float = 100.0
    """Control rate: ticks per second, each on an absolute deadline."""
    watchdog_ms: float = 100.0
    """A bridge silent for longer (a realtime bridge slower than that: for two of its steps) is
    marked stale (it resumes when it speaks again)."""
    safe_action: list[float] | None = None
    """Action sent for a non-finite observation; null means zeros, clipped to the bounds."""
    log_dir: str | None = "logs"
    """Transition log directory (Parquet chunks); null turns logging off."""
    chunk_seconds: float = 1.0
    """A log chunk is committed when it is this old: the most a crash can lose."""
    tolerate_log_errors: bool = False
    """Exit 0 at the end although the log failed to write (a full disk, ...) or lost
    transitions; the failures are printed and counted either way (false: exit 1)."""
    phase_margin_us: float = 150.0
    """How long after a realtime observation arrives the deadline of the tick that answers it
    falls (the tick wakes that late, plus the scheduler's lateness)."""
    spin_us: float = 0.0
    """Busy-wait this long before each deadline instead of sleeping (trades CPU for jitter)."""
    lockstep_spin_us: float = 500.0
    """After answering a lockstep observation, busy-wait this long for the bridge's next one
    (yielding to ZeroMQ's I/O thread): it is taken in at once, with warm caches, instead of
    after a wake-up (a core's worth of CPU while a lockstep bridge steps); 0 turns it off."""
    provider: str = "cpu"
    """onnxruntime execution provider: cpu, cuda or tensorrt."""
    max_bridges: int = 64
    """Bridges connected at once; a hello from one more is refused (error too_many_bridges)."""
    bridges_kept: int = 256
    """Gone and stale bridges remembered (in status, for a reconnect); the oldest is forgotten
    first, and any after bridge_retention_s."""
    bridge_retention_s: float = 300.0
    """A bridge gone or stale for this long is forgotten (its counts stay in the totals)."""
    max_bridge_rate_hz: float = 10_000.0
    """The fastest rate a hello may announce (faster is refused); lockstep bridges, which
    announce none, are held to it."""
    rate_headroom: float = 2.0
    """Each bridge's messages are held to this many times its announced rate, with a burst of
    one second of that (what a bridge queued while the node stalled is let through); the
    excess is dropped and counted (status: dropped_over_rate)."""
    status_bridges: int = 32
    """Status lists at most this many bridges (live first, then the most recently seen), with
    a count of every state beside them."""
    max_model_mb: float = 256.0
    """A deployed model file must be a regular file of at most this size."""
    max_model_memory_mb: float = 1024.0
    """A deploy is refused when checking and running the candidate needs more memory than this
    (measured in a probe process)."""
    max_inference_share: float = 0.5
    """A deploy is refused when the candidate's batch-1 inference (median on probes) takes more
    than this share of a period."""
    deploy_timeout_s: float = 60.0
    """A deploy whose checks have not finished in this long is given up (the slot is freed)."""
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    """Real-time scheduling, locked memory, CPUs and garbage collection (see below)."""

    def validate(self) -> None:
        self.realtime.validate()
        _positive(self, "rate_hz", "watchdog_ms", "chunk_seconds")
        _positive(self, "max_bridges", "bridge_retention_s", "max_bridge_rate_hz", "status_bridges")
        _positive(self, "max_model_mb", "max_model_memory_mb", "deploy_timeout_s")
        _non_negative(self, "bridges_kept")
        if not 1.0 <= self.rate_headroom <= 100.0:
            raise ConfigError(f"rate_headroom = {self.rate_headroom}: must be in 1..100")
        if not 0.0 < self.max_inference_share <= 1.0:
            raise ConfigError(
                f"max_inference_share = {self.max_inference_share}: must be in (0, 1]"
            )
        _non_negative(self, "phase_margin_us", "spin_us", "lockstep_spin_us")
        if self.rate_hz > 10_000:
            raise ConfigError(f"rate_hz = {self.rate_hz}: at most 10000")
        if self.provider not in ("cpu", "cuda", "tensorrt"):
            raise ConfigError(f"provider = {brief(self.provider)}: choose cpu, cuda or tensorrt")
        for key in ("bind", "admin"):
            _check_endpoint(key, getattr(self, key))
        if self.bind == self.admin:
            raise ConfigError(f"bind and admin are both {brief(self.bind)}; they must differ")
        if self.phase_margin_us * 1e-6 >= 1.0 / self.rate_hz:
            raise ConfigError(
                f"phase_margin_us = {self.phase_margin_us}: must be shorter than one period "
                f"({1e6 / self.rate_hz:.0f} us at {self.rate_hz} Hz)"
            )


@dataclass
class BridgeConfig:
    """One simulator bridge (``ddpg bridge``)."""

    env: str = "InvertedPendulum-v5"
    """Gymnasium environment id simulated as the robot."""
    id: str = "sim0"
    """Bridge id, unique per node; names the bridge in the log."""
    node: str = "tcp://127.0.0.1:5555"
    """The node's bridge endpoint."""
    mode: str = "realtime"
    """realtime: physics steps on the bridge's own clock; lockstep: waits for each action."""
    rate_hz: float | None = None
    """Realtime only: a fixed number of bridge steps per second of wall time, whatever the
    environment's dt. Unset (null): the environment's own rate, 1/dt (with pixels
    1/(dt * repeat)) times real_time_factor, so simulated time runs at wall-clock speed."""
    real_time_factor: float = 1.0
    """Realtime, with rate_hz null: simulated seconds per wall-clock second (2.0 steps twice
    as fast as real time, 0.5 half as fast)."""
    watchdog_ms: float = 100.0
    """Realtime: hold the last action this long, then apply the safe action (an action that
    came since the last step is always applied). Lockstep: wait this long for an answer before
    re-announcing to the node."""
    spin_us: float = 0.0
    """Lockstep: busy-poll this long for each answer before sleeping. Off by default: with idle
    CPUs polling (cpu_idle_poll) a sleeping bridge wakes at once, and polling the socket in a
    loop made the round trip slower (HalfCheetah p50 128 us with 2000, 80 us with 0). Where
    idle CPUs halt, 2000 saves a wake-up per step (a core's worth of CPU while it runs)."""
    step_spin_us: float = 200.0
    """Realtime: busy-poll this long before each step instead of sleeping through it, so the
    step starts on time (a wake-up from sleep came 30-50 us late here, p99 80-160 us) and its
    observation reaches the node before the tick phased for it (a fifth of a CPU at 1 kHz)."""
    seed: int = 0
    """Episode i resets with seed + i (as ddpg eval does)."""
    episodes: int = 0
    """Stop after this many episodes (0: run until stopped)."""
    max_episode_steps: int = 0
    """Truncate episodes at this length (0: the environment's own time limit). With pixels it
    counts physics steps, as the environment's own limit and the trainer do."""
    pixels: PixelSpec | None = None
    """Observe rendered frames (a mapping: size, stack, repeat, camera, view) instead of the state;
    null: state observations."""
    restart: str = "on-failure"
    """Launch only: restart policy when the bridge process dies: never, on-failure, always."""
    max_restarts: int = 3
    """Launch only: give up restarting after this many restarts."""
    realtime: RealtimeConfig = field(default_factory=lambda: RealtimeConfig(sched_priority=40))
    """Real-time settings as the node's, but priority 40: below the node, which answers it."""

    def validate(self) -> None:
        self.realtime.validate()
        if self.mode not in ("realtime", "lockstep"):
            raise ConfigError(f"mode = {brief(self.mode)}: choose realtime or lockstep")
        if self.restart not in ("never", "on-failure", "always"):
            raise ConfigError(
                f"restart = {brief(self.restart)}: choose never, on-failure or always"
            )
        _positive(self, "watchdog_ms", "real_time_factor")
        if self.rate_hz is not None and not self.rate_hz > 0:
            raise ConfigError(
                f"rate_hz = {brief(self.rate_hz)}: must be > 0, or null (unset) for the environment's own "
                "rate (1/dt times real_time_factor)"
            )
        if self.rate_hz is not None and self.real_time_factor != 1.0:
            raise ConfigError(
                f"rate_hz = {self.rate_hz} and real_time_factor = {self.real_time_factor}: set "
                "one (rate_hz fixes the step rate; real_time_factor scales the environment's 1/dt)"
            )
        _non_negative(
            self, "seed", "episodes", "max_episode_steps", "max_restarts", "spin_us", "step_spin_us"
        )
        if not self.id or not self.id.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"id = {brief(self.id)}: use letters, digits, '-' and '_'")
        _check_endpoint("node", self.node)


@dataclass
class ContinualConfig:
    """Continual mode: retrain from the newest logs and deploy, behind an evaluation gate."""

    enabled: bool = False
    """Off by default; ``ddpg launch --continual`` turns it on."""
    every_transitions: int = 2000
    """Retrain each time this many new transitions have been committed to the log."""
    updates: int = 1000
    """DDPG updates per retraining round."""
    init: str | None = None
    """Run directory the first round continues from (checkpoint.pt, config.yaml, and the
    actor.onnx the launch checks against node.model); null starts fresh. Later rounds continue
    from the last deployed candidate."""
    eval_episodes: int = 5
    """Episodes of the candidate and of the live actor in the gate's own simulator."""
    eval_seed: int = 20000
    """Episode i of the gate's evaluation resets with eval_seed + i (the same for both)."""
    margin: float = 0.0
    """Deploy only if the candidate's mean return >= the live actor's - margin."""
    out_dir: str = "runs/continual"
    """Where each round's run directory and decisions.jsonl go (relative to launch.yaml)."""
    max_rounds: int = 0
    """Stop retraining after this many rounds (0: no limit)."""

    def validate(self) -> None:
        _positive(self, "every_transitions", "updates", "eval_episodes")
        _non_negative(self, "margin", "max_rounds", "eval_seed")


@dataclass
class LaunchConfig:
    """A deployment: one node and its bridges (``ddpg launch launch.yaml``)."""

    node: NodeConfig
    """The control node."""
    bridges: list[BridgeConfig] = field(default_factory=list)
    """Simulator bridges, each its own process; each connects to node.bind."""
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    """Retrain from the log and deploy while the loop runs (off by default)."""
    duration_s: float = 0.0
    """Stop after this many seconds of the loop, counted from when every bridge is live (0:
    until Ctrl-C); --duration overrides it."""
    ready_timeout_s: float = 30.0
    """How long to wait for the node and the bridges to come up."""

    def validate(self) -> None:
        _non_negative(self, "duration_s")
        _positive(self, "ready_timeout_s")
        ids = [b.id for b in self.bridges]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ConfigError(f"bridges: id {brief(dupes[0])} is used twice; ids must be unique")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{name} = {brief(value)}: must be > 0")


def _non_negative(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value >= 0:
            raise ConfigError(f"{name} = {brief(value)}: must be >= 0")


def _check_endpoint(key: str, address: str) -> None:
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc") or not rest:
        raise ConfigError(
            f"{key} = {brief(address)}: not a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH)"
        )
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"{key} = {brief(address)}: expected tcp://HOST:PORT with a port number"
            )


def port_in_use(address: str) -> bool:
    """Whether a tcp:// endpoint's port is taken on this machine, as ZeroMQ's bind would find
    it (False for other transports)."""
    scheme, _, rest = address.partition("://")
    if scheme != "tcp":
        return False
    host, _, port = rest.rpartition(":")
    host = "0.0.0.0" if host == "*" else host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As ZeroMQ binds: with SO_REUSEADDR, which the TIME_WAIT connections of a node that
        # just died do not block; only a socket that listens there does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError as e:  # another error (an interface name, no such address): ZeroMQ's
            return e.errno == errno.EADDRINUSE  # bind says it in the node's one line
    return False


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """A tcp:// endpoint on a port that was free a moment ago (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


# -- loading ----------------------------------------------------------------------------------
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _coerce(where: str, kind: Any, value: Any) -> Any:
    """``value`` as the annotated type ``kind``, or a ConfigError naming ``where``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # str | int: the first that takes the value
            try:
                return _coerce(where, option, value)
            except ConfigError:
                continue
        return _coerce(where, options[-1], value)
    if isinstance(kind, type) and is_dataclass(kind):
        return from_mapping(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {brief(value)}: expected a list")
        return [_coerce(f"{where}[{i}]", args[0], v) for i, v in enumerate(value)]
    ok = {
        str: isinstance(value, str),
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
    }.get(kind)
    if ok is None:
        raise AssertionError(f"unhandled config type {kind} at {where}")
    if not ok:
        raise ConfigError(f"{where} = {brief(value)}: expected {kind.__name__}")
    return float(value) if kind is float else value


def from_mapping(cls: type[T], data: Any, where: str = "") -> T:
    """Build and validate dataclass ``cls`` from a YAML mapping; unknown keys are refused."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        key = unknown[0]
        shown = (
            key if isinstance(key, str) and key.isidentifier() and len(key) <= 40 else brief(key)
        )
        raise ConfigError(f"{prefix}{shown}: unknown key; known keys: {', '.join(names)}")
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            value = data[f.name]
            if isinstance(value, dict) and f.default_factory is not MISSING:
                default = f.default_factory()  # a section's defaults are its field's default's
                if is_dataclass(default):  # (bridges[].realtime: priority 40, not 50)
                    value = {**asdict(default), **value}
            values[f.name] = _coerce(f"{prefix}{f.name}", hints[f.name], value)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{prefix}{f.name}: required key is missing")
    try:
        obj = cls(**values)
        if hasattr(obj, "validate"):
            obj.validate()
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    except ValueError as e:  # a spec of models/ checks itself: "pixel spec: size must be ..."
        raise ConfigError(f"{prefix}{str(e).partition(': ')[2] or e}") from None
    return obj


def _actor_pixels(model: str | Path) -> dict[str, Any] | None:
    """An exported actor's pixel spec (None: a state actor), from its metadata only."""
    import onnx

    from models.policy import pixel_spec_dict, read_metadata

    return pixel_spec_dict(read_metadata(onnx.load(model, load_external_data=False)))


def _model_pixels(path: Path, cfg: LaunchConfig) -> dict[str, Any] | None:
    """The served model's pixel spec (None: a state model), from its metadata only; the node
    runs the full checks when it loads it."""
    try:
        return _actor_pixels(cfg.node.model)
    except Exception as e:  # PolicyError, or protobuf's own DecodeError for garbage
        raise ConfigError(
            f"{path}: node.model = {brief(cfg.node.model)}: not an exported actor: {e}"
        ) from None


def _check_bridge_observations(path: Path, cfg: LaunchConfig, model: dict[str, Any] | None) -> None:
    """Refuse, before anything starts, a bridge whose observations the model (pixel spec
    ``model``) cannot take: state for a pixel model, pixels for a state model, or another
    pixel spec (the node would refuse it at hello, and a launch would wait for it in vain)."""
    from models.policy import pixel_differences

    for i, b in enumerate(cfg.bridges):
        ours = None if b.pixels is None else b.pixels.to_dict()
        diff = pixel_differences(ours, model)
        if diff:
            raise ConfigError(
                f"{path}: bridges[{i}] ({b.id}): its observations do not fit node.model "
                f"({'; '.join(diff)}, bridge vs model)"
            )


def _check_continual_init(path: Path, cfg: LaunchConfig, model: dict[str, Any] | None) -> None:
    """Refuse a continual init run that sees other observations than the served model (pixel
    spec ``model``): every round would retrain it on logs it cannot read, and fail. The init
    run's exported actor says what it sees, read as the served model's is (the run's config is
    the trainer's to read: the continual process checks it when it starts)."""
    from models.spec import pixel_differences

    assert cfg.continual.init is not None
    init = Path(cfg.continual.init)
    actor = init / "actor.onnx"
    if not actor.is_file():
        raise ConfigError(
            f"{path}: continual.init = {brief(cfg.continual.init)}: no actor.onnx in {init}; "
            f"export it with: ddpg export {init}"
        )
    try:
        init_pixels = _actor_pixels(actor)
    except Exception as e:  # PolicyError, or protobuf's own DecodeError for garbage
        raise ConfigError(
            f"{path}: continual.init = {brief(cfg.continual.init)}: {actor}: not an exported actor: {e}"
        ) from None
    diff = pixel_differences(init_pixels, model)
    if diff:
        raise ConfigError(
            f"{path}: continual.init ({cfg.continual.init}) sees other observations than "
            f"node.model ({'; '.join(diff)}, init run vs model)"
        )


def _check_init_config(path: Path, init: Path) -> None:
    """Refuse a continual init run whose config.yaml is not a bounded mapping of names: its
    form is checked here, for every launch; its values are the trainer's to judge (the
    continual process and ``python -m training.continual --check`` do, before any round)."""
    data = read_yaml(init / "config.yaml")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: continual.init: {init / 'config.yaml'}: expected a mapping of config keys, "
            f"got {type(data).__name__}"
        )
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(
                f"{path}: continual.init: {init / 'config.yaml'}: key {brief(key)} is "
                f"{type(key).__name__}, not a name"
            )


def load_launch(path: Path, check_ports: bool = True) -> LaunchConfig:
    """Load ``launch.yaml``; the model path is resolved against the file's directory and must
    exist, and (with ``check_ports``) the node's ports must be free."""
    data = read_yaml(path)
    try:
        cfg = from_mapping(LaunchConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    model = Path(cfg.node.model)
    if not model.is_absolute():
        model = (path.parent / model).resolve()
    if not model.is_file():
        raise ConfigError(f"{path}: node.model = {brief(cfg.node.model)}: no such file ({model})")
    cfg.node.model = str(model)
    model_pixels = _model_pixels(path, cfg)
    _check_bridge_observations(path, cfg, model_pixels)
    if cfg.node.log_dir is not None and not Path(cfg.node.log_dir).is_absolute():
        cfg.node.log_dir = str((path.parent / cfg.node.log_dir).resolve())
    cont = cfg.continual
    cont.out_dir = str((path.parent / cont.out_dir).resolve())
    if cont.init is not None:
        init = (path.parent / cont.init).resolve()
        if not (init / "checkpoint.pt").is_file():
            raise ConfigError(
                f"{path}: continual.init = {brief(cont.init)}: no checkpoint.pt in {init}"
            )
        cont.init = str(init)
        _check_continual_init(path, cfg, model_pixels)
        _check_init_config(path, init)
    for key in ("bind", "admin") if check_ports else ():
        address = getattr(cfg.node, key)
        if port_in_use(address):
            raise ConfigError(f"{path}: node.{key} = {brief(address)}: port is already in use")
    for raw, b in zip(data.get("bridges") or [], cfg.bridges, strict=True):
        if "node" not in raw:  # bridges connect to the node of this file unless told otherwise
            b.node = cfg.node.bind
        elif b.node != cfg.node.bind:
            raise ConfigError(
                f"{path}: bridges[{b.id}].node = {brief(b.node)} is not node.bind {brief(cfg.node.bind)}"
            )
    return cfg
