"""Real ONNX actors, small on disk, that a deploy must refuse by measuring them: the shipped
pendulum actor with extra work wired into its action (times zero, so the actions stay right and
every static check passes).

``slow_actor``: ``n`` chained [1, 2048] x [2048, 2048] products per observation (4.2M
multiply-adds each; the weight is made at run time by ConstantOfShape, so the file stays tiny).
``huge_actor``: a zero tensor of ``mb`` megabytes at every run, summed into the action."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.policy import weights_hash

ROOT = Path(__file__).resolve().parents[1]
PENDULUM = ROOT / "models" / "zoo" / "inverted_pendulum" / "actor.onnx"


def _wire(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], extra: str, out: Path
) -> Path:
    """The pendulum actor with ``extra`` ([B, 1], zeros) added to its action."""
    model = onnx.load(str(PENDULUM))
    g = model.graph
    last = g.node[-1]  # Add(mul_10, action_bias) -> action
    last.output[0] = "action_pre"
    g.node.extend(nodes)
    g.initializer.extend([*inits, numpy_helper.from_array(np.zeros((), np.float32), "zero_f")])
    g.node.extend(
        [
            helper.make_node("Mul", [extra, "zero_f"], ["extra_zero"]),
            helper.make_node("Add", ["action_pre", "extra_zero"], ["action"]),
        ]
    )
    for p in model.metadata_props:
        if p.key == "model_id":
            p.value = weights_hash(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def slow_actor(out: Path, n: int, width: int = 2048) -> Path:
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    inits = [i64("w_shape", [width, width]), i64("h_shape", [1, width]), i64("axes1", [1])]
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        # [B, 1] from obs: the chain depends on the input, so it cannot be folded away
        helper.make_node("ReduceSum", ["obs", "axes1"], ["o1"], keepdims=1),
        helper.make_node("ConstantOfShape", ["h_shape"], ["ones"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Mul", ["o1", "ones"], ["h0"]),
    ]  # fmt: skip
    for i in range(n):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceSum", [f"h{n}", "axes1"], ["slow_sum"], keepdims=1))
    return _wire(nodes, inits, "slow_sum", out)


def huge_actor(out: Path, mb: int) -> Path:
    """``mb`` MB of zeros made at every run, whatever the batch: its length comes from the
    observation's width (an input shape, so onnxruntime cannot fold it away at load)."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    inits = [i64("per_width", [mb * 2**18 // 4]), i64("start1", [1]), i64("end2", [2])]
    nodes = [
        helper.make_node("Shape", ["obs"], ["obs_shape"]),
        helper.make_node("Slice", ["obs_shape", "start1", "end2"], ["width"]),  # [4]
        helper.make_node("Mul", ["width", "per_width"], ["big_shape"]),
        helper.make_node("ConstantOfShape", ["big_shape"], ["big"],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("ReduceSum", ["big"], ["big_sum"], keepdims=1),  # [1]
    ]  # fmt: skip
    return _wire(nodes, inits, "big_sum", out)
