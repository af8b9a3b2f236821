"""The runtime policy: answers single and batched observations, and refuses every bad model
with an error that names the problem. Bad models are made by editing a real exported file."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from models.export import export_actor
from models.networks import Actor
from models.policy import (
    ActorMetadata,
    OnnxPolicy,
    PolicyError,
    _direct_run,
    read_metadata,
    weights_hash,
)
from sim_bridge.envs import env_spec, make_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An InvertedPendulum-v5 actor (bounds ±3) with batch-norm input, exported once."""
    torch.manual_seed(0)
    actor = Actor(4, [-3.0], [3.0], (32, 32), obs_norm=True)
    with torch.no_grad():
        actor(torch.randn(64, 4) * 2.0 + 1.0)  # train-mode pass: non-trivial BN statistics
    path = tmp_path_factory.mktemp("policy") / "actor.onnx"
    export_actor(
        actor,
        path,
        env_id="InvertedPendulum-v5",
        preset="paper",
        run_name="fixture",
        train_steps=123,
        seed=7,
        eval_seed=10_007,
    )
    return path


def _edit(src: Path, dst: Path, change: Callable[[onnx.ModelProto], None], rehash: bool) -> Path:
    """Copy ``src`` to ``dst`` with ``change`` applied; ``rehash`` updates the model id so the
    edit is caught by a later check, not by the hash."""
    model = onnx.load(str(src))
    change(model)
    if rehash:
        _set_prop(model, "model_id", weights_hash(model))
    onnx.save(model, str(dst))
    return dst


def _set_prop(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def _scale_init(name: str, factor: float) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        for init in model.graph.initializer:
            if init.name == name:
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, name))

    return change


def _set_init(name: str, value: float) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        for init in model.graph.initializer:
            if init.name == name:
                array = np.full_like(numpy_helper.to_array(init), value)
                init.CopyFrom(numpy_helper.from_array(array, name))

    return change


def test_single_and_batch_agree(model_path: Path) -> None:
    policy = OnnxPolicy(model_path)
    obs = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    batch = policy(obs)
    assert batch.shape == (5, 1) and batch.dtype == np.float32
    singles = np.stack([policy(o) for o in obs])
    np.testing.assert_allclose(singles, batch, rtol=0, atol=1e-6)
    assert policy.provider == "CPUExecutionProvider"
    assert policy.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(PolicyError, match=r"observation of shape \(3,\)"):
        policy(np.zeros(3))


def test_bound_batches_agree_with_a_plain_run(model_path: Path) -> None:
    """The serving path: preallocated buffers bound once per batch size, run in place; the
    direct call into onnxruntime, and the public one where its internals are not there."""
    policy = OnnxPolicy(model_path)
    obs = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    expected = policy.session.run(["action"], {"obs": obs})[0]
    for n in (1, 3):
        batch = policy.batch(n)
        assert policy.batch(n) is batch and batch.obs.shape == (n, 4)
        batch.obs[...] = obs[:n]
        batch.run()
        np.testing.assert_array_equal(batch.act, expected[:n])
        assert np.shares_memory(batch.values, batch.obs) and np.shares_memory(
            batch.values, batch.act
        )
    calls: list[object] = []
    no_internals = types.SimpleNamespace(run_with_iobinding=calls.append)  # no _sess
    run = _direct_run(no_internals, "binding", np.zeros(1))  # type: ignore[arg-type]
    run()
    assert calls == ["binding"]


def test_metadata_round_trip(model_path: Path) -> None:
    meta = OnnxPolicy(model_path).metadata
    assert (meta.env_id, meta.preset, meta.run_name) == ("InvertedPendulum-v5", "paper", "fixture")
    assert (meta.train_steps, meta.seed, meta.eval_seed) == (123, 7, 10_007)
    assert meta.obs_shape == (4,) and meta.act_shape == (1,) and meta.obs_norm == "batch_norm"
    assert meta.act_low.tolist() == [-3.0] and meta.act_high.tolist() == [3.0]
    assert np.isinf(meta.obs_low).all() and np.isinf(meta.obs_high).all()
    assert meta.model_id == weights_hash(onnx.load(str(model_path)))
    again = ActorMetadata.from_props(meta.to_props())
    assert again.to_props() == meta.to_props()
    assert meta.to_dict()["obs_low"] == ["-inf"] * 4


def test_accepts_the_env_it_was_made_for(model_path: Path) -> None:
    env = make_env("InvertedPendulum-v5")
    spec = env_spec("InvertedPendulum-v5", env)
    env.close()
    assert OnnxPolicy(model_path, expect=spec).metadata.env_id == "InvertedPendulum-v5"


def test_refuses_model_for_another_env(model_path: Path) -> None:
    env = make_env("Pendulum-v1")
    spec = env_spec("Pendulum-v1", env)
    env.close()
    with pytest.raises(
        PolicyError, match="exported for env 'InvertedPendulum-v5', not 'Pendulum-v1'"
    ):
        OnnxPolicy(model_path, expect=spec)


def test_refuses_missing_empty_and_truncated_files(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read model file"):
        OnnxPolicy(tmp_path / "nope.onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(PolicyError, match="file is empty"):
        OnnxPolicy(empty)
    data = model_path.read_bytes()
    for n in (len(data) // 2, len(data) - 7):
        cut = tmp_path / f"cut{n}.onnx"
        cut.write_bytes(data[:n])
        with pytest.raises(PolicyError, match=r"cut\d+\.onnx: not a readable ONNX model \(trunc"):
            OnnxPolicy(cut)


@pytest.mark.parametrize(
    ("name", "change", "rehash", "message"),
    [
        (
            "nan_weights",
            _scale_init("body.0.weight", float("nan")),
            False,
            r"weight 'body.0.weight' holds \d+ non-finite value",
        ),
        (
            "tampered_weights",
            _scale_init("head.weight", 1.5),
            False,
            "weights hash .* does not match metadata model_id",
        ),
        (
            "missing_field",
            lambda m: m.metadata_props.remove(
                next(p for p in m.metadata_props if p.key == "env_id")
            ),
            False,
            "metadata field 'env_id' is missing",
        ),
        (
            "no_metadata",
            lambda m: m.ClearField("metadata_props"),
            False,
            "'format_version' is missing; not a model exported by ddpg export",
        ),
        (
            "future_format",
            lambda m: _set_prop(m, "format_version", "99"),
            False,
            "format_version '99' is not supported",
        ),
        (
            "malformed_field",
            lambda m: _set_prop(m, "act_low", "[-3, oops]"),
            False,
            "metadata field 'act_low' = .* is malformed",
        ),
        (
            "renamed_input",
            lambda m: (
                m.graph.input[0].__setattr__("name", "x"),
                m.graph.node[0].input.__setitem__(0, "x"),
            ),
            False,
            r"graph inputs \['x'\] .* expected \['obs'\]",
        ),
        (
            "shape_disagrees_with_metadata",
            lambda m: (
                _set_prop(m, "obs_shape", "[5]"),
                _set_prop(m, "obs_low", '["-inf", "-inf", "-inf", "-inf", "-inf"]'),
                _set_prop(m, "obs_high", '["inf", "inf", "inf", "inf", "inf"]'),
            ),
            False,
            r"'obs' has shape \['batch', 4\], but the metadata says \[5\]",
        ),
        (
            "action_not_scaled_to_bounds",
            _scale_init("action_scale", 10.0),
            True,
            r"action\[0\] reaches .* outside its bounds \[-3, 3\]",
        ),
        (
            "non_finite_outputs",
            lambda m: (  # scale and bias 3e38: tanh * scale + bias overflows float32
                _scale_init("action_scale", 1e38)(m),
                _set_init("action_bias", 3e38)(m),
            ),
            True,
            "non-finite action value",
        ),
    ],
)
def test_refuses_bad_model(
    model_path: Path,
    tmp_path: Path,
    name: str,
    change: Callable[[onnx.ModelProto], None],
    rehash: bool,
    message: str,
) -> None:
    bad = _edit(model_path, tmp_path / f"{name}.onnx", change, rehash)
    with pytest.raises(PolicyError, match=message) as info:
        OnnxPolicy(bad)
    assert f"{name}.onnx" in str(info.value)  # every message names the file


def test_unavailable_gpu_provider_falls_back_with_one_line(
    model_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    policy = OnnxPolicy(model_path, provider="cuda")
    err = capfd.readouterr().err
    if policy.provider == "CUDAExecutionProvider":
        pytest.skip("CUDA works here; nothing falls back")
    assert policy.provider == "CPUExecutionProvider"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [
        "policy: CUDAExecutionProvider unavailable (no GPU, or its CUDA/cuDNN/TensorRT "
        "libraries are missing); using CPUExecutionProvider"
    ]
    with pytest.raises(PolicyError, match="unknown provider 'tpu'"):
        OnnxPolicy(model_path, provider="tpu")


def test_runtime_policy_never_imports_torch(model_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "import models, models.policy, models.spec\n"
        f"p = models.policy.OnnxPolicy({str(model_path)!r})\n"
        "p(np.zeros(4)); p(np.zeros((3, 4))); p.metadata.robot\n"
        "for heavy in ('torch', 'gymnasium', 'mujoco'):\n"
        "    assert heavy not in sys.modules, f'{heavy} was imported'\n"
        "print('ok', p.model_id)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")
    assert read_metadata(onnx.load(str(model_path))).model_id in out.stdout
