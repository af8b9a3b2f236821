"""ONNX export: the whole policy in the graph, parity with the torch actor, a valid model with
its metadata, and refusal (nothing written) when the exported graph is not the actor."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import models.export as export_module
from models.export import PARITY_TOLERANCE, ExportError, ExportReport, export_actor
from models.networks import Actor
from models.policy import OnnxPolicy, read_metadata, weights_hash

META = {
    "env_id": "Custom-v0",
    "preset": "paper",
    "run_name": "unit",
    "train_steps": 42,
    "seed": 3,
    "eval_seed": 10_003,
}


def _actor(seed: int = 0) -> Actor:
    """Asymmetric bounds (so scale and bias both matter) and fitted batch-norm statistics."""
    torch.manual_seed(seed)
    actor = Actor(5, [-3.0, 0.0], [3.0, 1.0], (48, 32), obs_norm=True)
    with torch.no_grad():
        for _ in range(5):
            actor(torch.randn(128, 5) * torch.tensor([1.0, 5.0, 0.1, 2.0, 10.0]) + 3.0)
    return actor.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Actor, ExportReport]:
    actor = _actor()
    path = tmp_path_factory.mktemp("export") / "sub" / "actor.onnx"
    return actor, export_actor(actor, path, **META)


def test_parity_with_torch_actor(exported: tuple[Actor, ExportReport]) -> None:
    actor, report = exported
    assert report.probes >= 1000 and report.max_abs_diff <= 1e-5
    policy = OnnxPolicy(report.path)
    rng = np.random.default_rng(1)
    obs = (rng.standard_normal((2000, 5)) * 4.0 + 3.0).astype(np.float32)
    with torch.no_grad():
        expected = actor(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(policy(obs), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(policy(obs[0]), expected[0], rtol=0, atol=1e-5)
    # Actions are in the env's units: both bounds are reached, neither is exceeded (beyond the
    # float32 rounding of tanh * scale + bias).
    big = policy(obs * 1000.0)
    assert big[:, 0].min() < -2.9 and big[:, 0].max() > 2.9
    assert big[:, 1].min() >= -1e-6 and big[:, 1].max() <= 1.0 + 1e-6
    assert big[:, 1].min() < 0.1 and big[:, 1].max() > 0.9


def test_graph_is_the_whole_policy_with_dynamic_batch(
    exported: tuple[Actor, ExportReport],
) -> None:
    _, report = exported
    model = onnx.load(str(report.path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops[0] == "BatchNormalization" and ops[-3:] == ["Tanh", "Mul", "Add"], ops
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("obs", "action")
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert isinstance(in_dims[0], str) and in_dims[1:] == [5]
    assert isinstance(out_dims[0], str) and out_dims[1:] == [2]
    assert report.size_bytes < 50_000  # weights plus a few hundred bytes of graph


def test_metadata_written_and_model_id_is_weights_hash(
    exported: tuple[Actor, ExportReport],
) -> None:
    _, report = exported
    model = onnx.load(str(report.path))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["format_version"] == "1"
    assert props["act_low"] == "[-3.0, 0.0]" and props["act_high"] == "[3.0, 1.0]"
    assert props["obs_shape"] == "[5]" and props["obs_dtype"] == "float32"
    assert props["obs_norm"] == "batch_norm"
    meta = read_metadata(model)
    for key, value in META.items():
        assert getattr(meta, key) == value
    assert meta.model_id == report.model_id == weights_hash(model)
    assert len(meta.model_id) == 16


def test_model_id_follows_weights_not_names(
    exported: tuple[Actor, ExportReport], tmp_path: Path
) -> None:
    actor, report = exported
    same = export_actor(actor, tmp_path / "same.onnx", **{**META, "run_name": "other"})
    assert same.model_id == report.model_id
    with torch.no_grad():
        actor.head.bias.add_(0.01)
    try:
        changed = export_actor(actor, tmp_path / "changed.onnx", **META)
    finally:
        with torch.no_grad():
            actor.head.bias.sub_(0.01)
    assert changed.model_id != report.model_id


def test_refuses_and_writes_nothing(
    exported: tuple[Actor, ExportReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    actor, _ = exported
    target = tmp_path / "bad.onnx"
    broken = _actor()
    with torch.no_grad():
        broken.body[0].weight[0, 0] = float("nan")
    with pytest.raises(ExportError, match=r"fails the runtime checks: .*non-finite"):
        export_actor(broken, target, **META)
    # A graph that is not the actor: the exported copy's output bias off by 1e-3.
    to_onnx = export_module._to_onnx

    def perturbed(module: Actor) -> onnx.ModelProto:
        wrong = copy.deepcopy(module)
        with torch.no_grad():
            wrong.head.bias[0] += 1e-3
        return to_onnx(wrong)

    monkeypatch.setattr(export_module, "_to_onnx", perturbed)
    with pytest.raises(ExportError, match=r"differ by .* tolerance .*; nothing written"):
        export_actor(actor, target, **META)
    monkeypatch.undo()
    with pytest.raises(ExportError, match="at least 1000 probe observations"):
        export_actor(actor, target, probes=10, **META)
    assert list(tmp_path.iterdir()) == []


def test_parity_bound_follows_float32_error_of_large_weights(tmp_path: Path) -> None:
    """A trained actor's larger weights make float32 itself less exact: the bound is then a few
    times torch's own float32 error, so a correct export is not refused for it."""
    actor = _actor()
    with torch.no_grad():
        for layer in actor.body:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(40.0)
    report = export_actor(actor, tmp_path / "actor.onnx", **META)
    assert report.tolerance > PARITY_TOLERANCE
    assert report.max_abs_diff <= report.tolerance
    small = export_actor(_actor(), tmp_path / "small.onnx", **META)
    assert small.tolerance == PARITY_TOLERANCE
