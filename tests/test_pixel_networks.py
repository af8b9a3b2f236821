"""Pixel networks: shapes, bounds, the paper's initialisation, random shift, and the uint8 ONNX
export served by the runtime policy on real rendered frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.export import ExportError, ExportReport, export_actor
from models.pixel_networks import PixelActor, PixelCritic, PixelEncoder, random_shift
from models.policy import OnnxPolicy, PolicyError, pixel_spec_dict, probe_observations
from models.spec import PixelSpec

META = {
    "env_id": "InvertedPendulum-v5",
    "preset": "paper",
    "run_name": "unit",
    "train_steps": 0,
    "seed": 0,
    "eval_seed": 10_000,
}
LOW, HIGH = [-3.0], [3.0]


@pytest.mark.parametrize(
    ("size", "strides", "side"),
    [(64, (2, 2, 2), 7), (84, (2, 2, 2), 9), (32, (2, 2, 2), 3), (64, (2, 1, 1), 27)],
)
def test_encoder_shapes(size: int, strides: tuple[int, int, int], side: int) -> None:
    enc = PixelEncoder((9, size, size), strides)
    assert enc.feature_dim == 32 * side * side
    x = torch.randint(0, 256, (2, 9, size, size), dtype=torch.uint8)
    out = enc(x)
    assert out.shape == (2, enc.feature_dim) and out.dtype == torch.float32
    # uint8 and float 0..255 are the same input: the scaling is inside.
    torch.testing.assert_close(enc(x.float()), out)


@pytest.mark.parametrize("size", [64, 84])
def test_actor_in_bounds_and_final_init(size: int) -> None:
    torch.manual_seed(0)
    actor = PixelActor((9, size, size), [-1.0, 0.0], [1.0, 2.0])
    assert actor.head.weight.abs().max() <= 3e-4 and actor.head.bias.abs().max() <= 3e-4
    assert [m.out_features for m in actor.trunk if isinstance(m, torch.nn.Linear)] == [200, 200]
    with torch.no_grad():
        for m in actor.trunk:  # large weights to saturate the tanh
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(50)
        actor.head.weight.normal_(0, 10)
        a = actor(torch.randint(0, 256, (8, 9, size, size), dtype=torch.uint8))
    assert a.shape == (8, 2)
    assert (a[:, 0] >= -1).all() and (a[:, 0] <= 1).all()
    assert (a[:, 1] >= 0).all() and (a[:, 1] <= 2).all()
    torch.testing.assert_close(actor.action_scale, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(actor.action_bias, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("n_q", [1, 2])
def test_critic_shapes(n_q: int) -> None:
    critic = PixelCritic((9, 64, 64), 3, n_q=n_q)
    assert critic.q.head.weight.abs().max() <= 3e-4
    obs = torch.randint(0, 256, (5, 9, 64, 64), dtype=torch.uint8)
    act = torch.rand(5, 3) * 2 - 1
    q = critic(obs, act)
    assert q.shape == (n_q, 5)
    torch.testing.assert_close(critic.q1(obs, act), q[0])
    # the action enters at the second dense layer: the first takes only the features
    assert critic.q.layers[0].weight.shape[1] == critic.encoder.feature_dim
    assert critic.q.layers[1].weight.shape[1] == 200 + 3


def _shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Reference: replicate-pad by 4 and crop at (4 + dy, 4 + dx), one sample."""
    padded = torch.nn.functional.pad(x[None].float(), (4, 4, 4, 4), mode="replicate")[0]
    h, w = x.shape[-2:]
    return padded[:, 4 + dy : 4 + dy + h, 4 + dx : 4 + dx + w].to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_shift(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 9, 20, 20), generator=g).to(dtype)
    out = random_shift(x, pad=4, generator=g)
    assert out.shape == x.shape and out.dtype == dtype
    assert random_shift(x, pad=0) is x
    moved = 0
    for i in range(x.shape[0]):  # each sample is exactly one replicate-padded integer shift
        matches = [
            (dy, dx)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.equal(out[i], _shifted(x[i], dy, dx))
        ]
        assert len(matches) == 1
        moved += matches[0] != (0, 0)
    assert moved >= 12  # 1/81 chance per sample of no shift
    # reproducible with the same generator
    again = random_shift(x, 4, torch.Generator().manual_seed(1))
    assert torch.equal(again, random_shift(x, 4, torch.Generator().manual_seed(1)))


SPEC = PixelSpec(size=64, stack=3, repeat=3)  # what the real-frame test renders


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[PixelActor, ExportReport]:
    torch.manual_seed(0)
    actor = PixelActor(SPEC.obs_shape, LOW, HIGH, final_init=None).eval()  # not tiny: parity
    path = tmp_path_factory.mktemp("pixel_export") / "actor.onnx"
    return actor, export_actor(actor, path, pixels=json.dumps(SPEC.to_dict()), **META)


def test_export_parity_and_metadata(exported: tuple[PixelActor, ExportReport]) -> None:
    actor, report = exported
    assert report.probes >= 1000 and report.max_abs_diff <= 1e-5
    policy = OnnxPolicy(report.path)
    meta = policy.metadata
    assert meta.obs_dtype == "uint8" and meta.obs_shape == (9, 64, 64)
    assert meta.obs_low.tolist() == [0.0] and meta.obs_high.tolist() == [255.0]
    assert PixelSpec.from_dict(pixel_spec_dict(meta) or {}) == SPEC
    assert policy.session.get_inputs()[0].type == "tensor(uint8)"
    obs = np.random.default_rng(5).integers(0, 256, (300, *SPEC.obs_shape), dtype=np.uint8)
    with torch.no_grad():
        expected = actor(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(policy(obs), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(policy(obs[3]), expected[3], rtol=0, atol=1e-5)
    probes = probe_observations(meta, 64)
    assert probes.dtype == np.uint8 and probes.shape == (64, *SPEC.obs_shape)
    assert probes.min() == 0 and probes.max() == 255


def test_export_needs_pixel_spec(tmp_path: Path) -> None:
    actor = PixelActor(SPEC.obs_shape, LOW, HIGH)
    with pytest.raises(ExportError, match="pixel spec"):
        export_actor(actor, tmp_path / "a.onnx", **META)
    assert not (tmp_path / "a.onnx").exists()


def test_pixel_model_input_must_be_uint8(
    exported: tuple[PixelActor, ExportReport], tmp_path: Path
) -> None:
    import onnx

    model = onnx.load(exported[1].path)
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    bad = tmp_path / "float_input.onnx"
    onnx.save(model, bad)
    with pytest.raises(PolicyError, match="expected uint8"):
        OnnxPolicy(bad)


def test_serves_real_frames(exported: tuple[PixelActor, ExportReport]) -> None:
    """The exported actor (one export shared with the parity test: each costs seconds) answers
    a frame stack rendered by the pipeline the trainer and the bridge use."""
    from sim_bridge.pixels import make_pixel_env

    actor, report = exported
    env = make_pixel_env("InvertedPendulum-v5", SPEC)
    try:
        assert env.action_space.low.tolist() == LOW and env.action_space.high.tolist() == HIGH
        policy = OnnxPolicy(report.path, probes=16)
        assert probe_observations(policy.metadata, 4).dtype == np.uint8
        obs, _ = env.reset(seed=0)
        for _ in range(3):
            assert obs.dtype == np.uint8 and obs.shape == SPEC.obs_shape
            action = policy(obs)
            assert action.shape == (1,) and np.isfinite(action).all()
            assert LOW[0] <= action[0] <= HIGH[0]
            with torch.no_grad():
                expected = actor(torch.from_numpy(obs)[None]).numpy()[0]
            np.testing.assert_allclose(action, expected, rtol=0, atol=1e-5)
            obs, *_ = env.step(action)
    finally:
        env.close()


def test_drq_projection_bounds_few_features() -> None:
    enc = PixelEncoder((9, 64, 64), feature_dim=50)
    assert enc.feature_dim == 50
    out = enc(torch.randint(0, 256, (4, 9, 64, 64), dtype=torch.uint8))
    assert out.shape == (4, 50) and out.abs().max() <= 1.0  # LayerNorm then tanh
    critic = PixelCritic((9, 64, 64), 2, n_q=2, action_layer=0, feature_dim=50)
    # the action joins 50 features, not 1,568: it cannot drown among them
    assert critic.q.layers[0].weight.shape[1] == 52
