"""Export an :class:`~models.networks.Actor` to ONNX as the whole deterministic policy.

The graph takes the raw observation (``obs``, float32, dynamic batch) and returns the action in
the environment's units (``action``): the observation normalisation (the standardisation of a run
trained with ``--obs-norm``, a :class:`~models.networks.StandardizedActor`, and/or batch norm),
the MLP, tanh and the scaling to the Box bounds are all inside it, so no caller has to pre- or
post-process. A standardised actor's parity probes lie around its training data. The export is
refused, and nothing is written, unless the ONNX model matches the torch actor on the probe
observations to ``tolerance`` (or, for an actor whose own float32 evaluation is less exact than
that, a few times torch's float32 error) and passes the same checks the runtime policy makes
when it loads.

A :class:`~models.pixel_networks.PixelActor` exports the same way with a uint8 ``obs`` input
``(batch, C, H, W)``: the cast and the /255 scaling are inside the graph, the metadata says
``obs_dtype="uint8"``, bounds 0..255 and the pixel spec (``pixels=json.dumps(spec.to_dict())``),
and parity is checked on random uint8 images.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from models.networks import Actor, StandardizedActor
from models.pixel_networks import PixelActor
from models.policy import (
    INPUT_NAME,
    OUTPUT_NAME,
    ActorMetadata,
    OnnxPolicy,
    PolicyError,
    probe_observations,
    weights_hash,
)

OPSET = 18
"""ONNX opset of exported actors (the torch.export-based exporter's own minimum; onnxruntime and
TensorRT have supported it for years)."""
PARITY_PROBES = 1024
PARITY_TOLERANCE = 1e-5
"""The parity bound for an actor whose float32 evaluation is this exact or better."""
PARITY_FLOAT32_FACTOR = 4.0
"""The parity bound for any actor: this many times torch's own float32 error on the probes.
A trained actor's weights and activations grow, and float32's rounding grows with them (a
HalfCheetah td3 actor at 300k steps: torch float32 7.7e-6 off the exact policy, onnxruntime
1.5e-5); a broken graph is off by orders of magnitude more."""


class ExportError(ValueError):
    """The actor cannot be exported, or the exported graph does not match it."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    model_id: str
    max_abs_diff: float
    tolerance: float
    """The bound it was held to: ``tolerance`` or, if larger, PARITY_FLOAT32_FACTOR times
    torch's own float32 error."""
    probes: int
    nodes: list[str]
    size_bytes: int


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """The exporter prints progress and warnings (torchvision ops missing, deprecations), and
    under a DEBUG root logger (pytest's) its structured trace logging costs seconds."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


StateActor = Actor | StandardizedActor


def obs_norm_kind(actor: StateActor) -> str:
    """The metadata's ``obs_norm``: what normalises the raw observation inside the graph."""
    batch_norm = isinstance(actor.obs_norm, torch.nn.BatchNorm1d)
    if isinstance(actor, StandardizedActor):
        return "standardize+batch_norm" if batch_norm else "standardize"
    return "batch_norm" if batch_norm else "none"


def _to_onnx(actor: StateActor | PixelActor) -> onnx.ModelProto:
    """torch.onnx (dynamo exporter; needs onnxscript) with a dynamic batch dimension."""
    if isinstance(actor, PixelActor):
        example = torch.zeros(2, *actor.obs_shape, dtype=torch.uint8)
    else:
        example = torch.zeros(2, actor.obs_dim)
    quiet = io.StringIO()
    with (
        _quiet_loggers("torch.onnx", "torch.export", "torch.__trace"),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(quiet),
        contextlib.redirect_stderr(quiet),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            actor,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"obs": {0: torch.export.Dim("batch")}},
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    model = program.model_proto
    # Drop exporter bookkeeping (node names, stack traces): a small graph that diffs cleanly.
    for value in (*model.graph.input, *model.graph.output):
        del value.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.metadata_props[:]
    return model


def actor_metadata(actor: StateActor | PixelActor, model_id: str, **fields: Any) -> ActorMetadata:
    """Metadata for ``actor``: shapes, dtypes and action bounds from the module; the rest
    (env_id, obs_low/obs_high, preset, run_name, train_steps, seed, eval_seed, and for a pixel
    actor ``pixels``, the spec as JSON) from ``fields``."""
    scale = actor.action_scale.detach().cpu().numpy().astype(np.float32)
    bias = actor.action_bias.detach().cpu().numpy().astype(np.float32)
    if isinstance(actor, PixelActor):
        if not fields.get("pixels"):
            raise ExportError(
                "a pixel actor needs its pixel spec: pixels=json.dumps(spec.to_dict())"
            )
        return ActorMetadata(
            model_id=model_id,
            obs_shape=actor.obs_shape,
            obs_dtype="uint8",
            obs_low=np.asarray(fields.pop("obs_low", [0.0]), dtype=np.float32).reshape(-1),
            obs_high=np.asarray(fields.pop("obs_high", [255.0]), dtype=np.float32).reshape(-1),
            act_shape=(actor.act_dim,),
            act_dtype="float32",
            act_low=np.asarray(fields.pop("act_low", bias - scale), dtype=np.float32).reshape(-1),
            act_high=np.asarray(fields.pop("act_high", bias + scale), dtype=np.float32).reshape(-1),
            obs_norm="none",
            **fields,
        )
    obs_low = np.asarray(fields.pop("obs_low", [-np.inf] * actor.obs_dim), dtype=np.float32)
    obs_high = np.asarray(fields.pop("obs_high", [np.inf] * actor.obs_dim), dtype=np.float32)
    act_low = np.asarray(fields.pop("act_low", bias - scale), dtype=np.float32)
    act_high = np.asarray(fields.pop("act_high", bias + scale), dtype=np.float32)
    return ActorMetadata(
        model_id=model_id,
        obs_shape=(actor.obs_dim,),
        obs_dtype="float32",
        obs_low=obs_low.reshape(-1),
        obs_high=obs_high.reshape(-1),
        act_shape=(actor.act_dim,),
        act_dtype="float32",
        act_low=act_low.reshape(-1),
        act_high=act_high.reshape(-1),
        obs_norm=obs_norm_kind(actor),
        **fields,
    )


def _around_training_data(
    module: StandardizedActor, probes: np.ndarray, meta: ActorMetadata
) -> np.ndarray:
    """Standard-normal probes moved to where the training observations were (mean + z * std),
    within the observation bounds: around zero, a standardised actor with far-off means would
    only be probed where its inputs are clipped."""
    mean = module.standardize.mean.numpy().astype(np.float64)
    std = 1.0 / module.standardize.inv_std.numpy().astype(np.float64)
    moved = mean + probes.astype(np.float64) * std
    low, high = meta.obs_low.reshape(meta.obs_shape), meta.obs_high.reshape(meta.obs_shape)
    return np.clip(moved, low, high).astype(np.float32)


def export_actor(
    actor: StateActor | PixelActor,
    path: str | Path,
    *,
    probes: int = PARITY_PROBES,
    tolerance: float = PARITY_TOLERANCE,
    **metadata: Any,
) -> ExportReport:
    """Write ``actor`` (eval mode, CPU, float32) to ``path`` with its metadata.

    ``metadata`` are :class:`ActorMetadata` fields: at least env_id, preset, run_name,
    train_steps, seed and eval_seed; obs_low/obs_high default to unbounded and act_low/act_high
    to the actor's own bounds. Raises :class:`ExportError` (writing nothing) when the ONNX model
    differs from the torch actor by more than ``tolerance`` on ``probes`` observations or fails
    the runtime policy's checks.
    """
    if probes < 1000:
        raise ExportError(f"probes = {probes}: parity needs at least 1000 probe observations")
    if isinstance(actor, PixelActor) and not metadata.get("pixels"):
        raise ExportError("a pixel actor needs its pixel spec: pixels=json.dumps(spec.to_dict())")
    path = Path(path)
    module = copy.deepcopy(actor).to("cpu", torch.float32).eval()
    model = _to_onnx(module)
    model_id = weights_hash(model)
    meta = actor_metadata(module, model_id, **metadata)
    onnx.helper.set_model_props(model, meta.to_props())
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported graph fails onnx.checker: {e}") from None
    data = model.SerializeToString()

    # Parity and the runtime checks, on the exact bytes about to be written.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    try:
        try:
            policy = OnnxPolicy(tmp)
        except PolicyError as e:
            raise ExportError(f"exported model fails the runtime checks: {e}") from None
        # The reference is the torch actor evaluated in float64: float32 GEMMs in torch and
        # onnxruntime sum in different orders, and each alone is a few 1e-6 off the exact
        # policy; comparing against the exact one keeps the 1e-5 bound about the export.
        obs = probe_observations(meta, probes, seed=1, wide=False)
        if isinstance(module, StandardizedActor):
            obs = _around_training_data(module, obs, meta)
        with torch.no_grad():
            exact = copy.deepcopy(module).double()
            # uint8 probes go in as float64 0..255: the encoder's cast and /255 then run in
            # float64 too.
            expected = exact(torch.from_numpy(obs).double()).numpy()
        # Compared in the tanh's own units: an action scale of 3 multiplies the same float32
        # error by 3, which says nothing about the export.
        scale = np.maximum(1.0, (meta.act_high - meta.act_low) / 2.0)
        got = policy(obs)
        diff = float(np.max(np.abs(got - expected) / scale))
        single = float(np.max(np.abs(policy(obs[0]) - expected[0]) / scale))
        diff = max(diff, single)
        with torch.no_grad():
            float32 = module(torch.from_numpy(obs)).numpy()
        float32_diff = float(np.max(np.abs(float32 - expected) / scale))
        bound = max(tolerance, PARITY_FLOAT32_FACTOR * float32_diff)
        if not diff <= bound:  # also catches NaN
            raise ExportError(
                f"ONNX and torch actors differ by {diff:.3g} (max abs, in units of the action "
                f"scale) on {probes} probe observations; tolerance {bound:g} (torch float32: "
                f"{float32_diff:.3g} off the exact policy); nothing written"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(
        path=path,
        model_id=model_id,
        max_abs_diff=diff,
        tolerance=bound,
        probes=probes,
        nodes=[n.op_type for n in model.graph.node],
        size_bytes=len(data),
    )
