"""Export a ``FluxTransformer2DModel`` with DeLeaker attention to ONNX.

`export_transformer_onnx` traces `FluxDeLeakerWrapper` with ``torch.onnx.export(dynamo=True)``, turns every
``torch.ops.deleaker.attention`` into one ``deleaker::DeLeakerAttention`` node (or its standard-ONNX
decomposition), checks the result (``onnx.checker`` full check, shape inference) and writes it atomically: the
files are written and checked in a temporary folder next to the destination and only then renamed into place, so
a failure leaves no partial file. Weights go to an external data file (``<name>.onnx.data``) when the model is
larger than 2 GB (or when asked).

The contract and the DeLeaker config are stored in the model's metadata (`read_export_metadata`), so an engine
builder or runtime can recover them from the ONNX file alone.

Over 400 lines, one job: the whole transformer and one attention alone (`export_attention_onnx`, for the plugin's
and the decomposition's checks and `deleaker.export.portable`) go through the same private steps (trace under the
export lock, translate, optimize, check, stage and rename); loading a model from disk is `deleaker.export.model_export`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import onnx
import torch

from deleaker.config import DeLeakerConfig, num_joint_blocks
from deleaker.errors import ConfigError, DeLeakerError, ShapeError
from deleaker.jsonio import loads_strict
from deleaker.staging import make_staging_dir, publish_staged
from deleaker.hashing import sha256_file
from deleaker.export_lock import tracing

from .contract import FluxTransformerIO, dtype_name
from .onnx_node import DOMAIN, ONNX_OPSET, OP_TYPE, register_onnx_schema, translation_table
from .wrapper import float32_rope, make_wrapper

logger = logging.getLogger(__name__)

#: Metadata keys of exported models.
META_IO = "deleaker.io"
META_CONFIG = "deleaker.config"
META_DECOMPOSED = "deleaker.decomposed"
META_ROPE_FP32 = "deleaker.rope_fp32"

#: Above this many bytes of weights, the protobuf limit forces external data.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2



class ExportError(DeLeakerError):
    """Exporting to ONNX failed (tracing, translation, or the checks of the written model)."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_transformer_onnx` wrote.

    Attributes:
        onnx_path: the ``.onnx`` file. data_path: its external data file, or None (weights inside).
        sha256: hex digest of the ``.onnx`` file; data_sha256: of the data file, or None.
        io: the contract the graph follows. config: the DeLeaker knobs baked into the node attributes.
        decomposed: True when the node was exported as standard ONNX operators.
        opset: the standard ONNX opset. num_deleaker_nodes: custom nodes in the graph (0 when decomposed).
        rope_fp32: the rotary embedding was computed in float32 (no float64 in the graph).
        seconds: wall time per phase (``export``, ``optimize``, ``save``, ``check``, ``total``).
    """

    onnx_path: Path
    data_path: Optional[Path]
    sha256: str
    data_sha256: Optional[str]
    io: FluxTransformerIO
    config: DeLeakerConfig
    decomposed: bool
    opset: int
    num_deleaker_nodes: int
    seconds: Dict[str, float]
    rope_fp32: bool = True

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form (for manifests)."""
        return {
            "onnx_path": str(self.onnx_path),
            "data_path": None if self.data_path is None else str(self.data_path),
            "sha256": self.sha256,
            "data_sha256": self.data_sha256,
            "io": self.io.to_dict(),
            "config": dataclasses.asdict(self.config),
            "decomposed": self.decomposed,
            "opset": self.opset,
            "num_deleaker_nodes": self.num_deleaker_nodes,
            "seconds": dict(self.seconds),
            "rope_fp32": self.rope_fp32,
        }


def _model_dtype(transformer: torch.nn.Module) -> torch.dtype:
    return next(transformer.parameters()).dtype


def _check_export_inputs(transformer: torch.nn.Module, io: FluxTransformerIO, config: DeLeakerConfig) -> None:
    if not isinstance(io, FluxTransformerIO):
        raise TypeError(f"io must be a FluxTransformerIO, got {type(io).__name__}")
    if not isinstance(config, DeLeakerConfig):
        raise TypeError(f"config must be a DeLeakerConfig (scaled to the model), got {type(config).__name__}")
    num_blocks = num_joint_blocks(transformer.config)
    if num_blocks != io.num_blocks:
        raise ShapeError(f"the contract is for {io.num_blocks} blocks per step but the transformer has {num_blocks}")
    model_dtype = dtype_name(_model_dtype(transformer))
    if model_dtype != io.dtype:
        raise ConfigError(
            f"the transformer is {model_dtype} but the contract says {io.dtype}; build the contract with "
            f"FluxTransformerIO.from_transformer or cast the model"
        )
    expected = FluxTransformerIO.from_config(
        transformer.config,
        height=io.height,
        width=io.width,
        text_len=io.text_len,
        max_entities=io.max_entities,
        vae_scale_factor=io.vae_scale_factor,
        batch=(io.batch_min, io.batch_opt, io.batch_max),
        dtype=io.dtype,
    )
    if expected != io:
        raise ShapeError(f"the contract {io} does not match the transformer's config (expected {expected})")


def _sample_batch(io: FluxTransformerIO) -> int:
    # torch.export specialises a dimension whose sample size is 1: trace with a batch of 2 when the profile allows.
    if io.batch_max == io.batch_min:
        return io.batch_min
    return min(max(io.batch_opt, 2), io.batch_max)


def _export_program(
    transformer: torch.nn.Module, io: FluxTransformerIO, config: DeLeakerConfig, decompose: bool, rope_fp32: bool
):
    wrapper = make_wrapper(transformer, io, config).eval()
    device = next(transformer.parameters()).device
    sample = io.sample_inputs(_sample_batch(io), device=device)
    rope = float32_rope(transformer) if rope_fp32 else contextlib.nullcontext()
    with tracing(), torch.no_grad(), rope:  # torch.export's state is process-wide: alone
        return torch.onnx.export(
            wrapper,
            tuple(sample.values()),
            dynamo=True,
            input_names=list(io.input_names),
            output_names=list(io.output_names),
            dynamic_shapes=io.torch_dynamic_shapes(),
            custom_translation_table=translation_table(decompose),
            opset_version=ONNX_OPSET,
            optimize=False,  # see _optimize
            verbose=False,
        )


def _optimize(model, *, rewrite: bool) -> None:
    """onnxscript's optimizer, in place; ``rewrite=False`` leaves out its pattern rewriter.

    The rewriter is what ``torch.onnx.export(optimize=True)`` runs; on the unrolled decomposition it costs minutes
    (pattern matching over every node), for nothing TensorRT or ONNX Runtime need. Constant folding, dead-code
    removal, CSE and the naming/initializer fixes run either way.
    """
    import onnxscript.optimizer
    from onnx_ir.passes import common as common_passes

    if rewrite:
        onnxscript.optimizer.optimize_ir(model)
        return
    from onnx_ir import passes
    from onnxscript.optimizer import _constant_folding

    passes.Sequential(
        common_passes.InlinePass(),
        passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                ),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)


def check_onnx_model(onnx_path: Union[str, Path]) -> None:
    """``onnx.checker`` (full check, with the node's schema registered) and strict shape inference on a file.

    Works on models with external data (both read the file by path). Raises `ExportError` with the checker's words.
    """
    register_onnx_schema()
    path = str(onnx_path)
    try:
        onnx.checker.check_model(path, full_check=True)
        with tempfile.TemporaryDirectory() as tmp:
            onnx.shape_inference.infer_shapes_path(path, os.path.join(tmp, "inferred.onnx"), strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported model {path} fails the ONNX checks: {exc}") from exc


@contextlib.contextmanager
def _staging_dir(final: Path) -> Iterator[Path]:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_staging_dir(final)  # a name of ours: an engine build's stale-staging cleanup may remove it
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(staged: Path, out_path: Path, *, has_data: bool) -> None:
    """Rename the staged files to their destination (`deleaker.staging.publish_staged`): the data file first, the
    ``.onnx`` last.

    An earlier ``.onnx`` of the same name is removed before its data file is replaced, so the destination never
    holds an ``.onnx`` whose data does not match it; if the last rename fails, the moved data file is removed too.
    """
    try:
        publish_staged(staged.parent, out_path)
    except OSError as exc:
        raise ExportError(f"cannot move the exported model into place at {out_path}: {exc}") from exc
    final_data = out_path.with_name(out_path.name + ".data")
    if not has_data and final_data.is_file():
        final_data.unlink()  # the data file of an earlier export of the same name


def export_transformer_onnx(
    transformer: torch.nn.Module,
    io: FluxTransformerIO,
    out_path: Union[str, Path],
    *,
    config: DeLeakerConfig,
    decompose: bool = False,
    external_data: Optional[bool] = None,
    check: bool = True,
    rope_fp32: bool = True,
) -> ExportResult:
    """Export ``transformer`` (a ``FluxTransformer2DModel``, any float dtype and device) to ``out_path``.

    Args:
        transformer: the model; its attention processors become DeLeaker processors (stock behaviour without a
            state, so this does not change its other uses). Its dtype must be ``io.dtype``.
        io: the contract (`FluxTransformerIO.from_transformer`): names, dtypes, shapes, batch profile.
        out_path: the ``.onnx`` file to write (parent folders are created). External data, when any, is
            ``<out_path>.data`` next to it.
        config: the DeLeaker knobs, already scaled to the model (``DeLeakerConfig.for_model``); they become node
            attributes (or constants of the decomposition).
        decompose: export the node as standard ONNX operators instead of the custom node.
        external_data: force (True) or forbid (False) external weights; None: only above 2 GB.
        check: run `check_onnx_model` before the files are moved into place.
        rope_fp32: compute the rotary embedding in float32 (`deleaker.export.wrapper.Float32FluxPosEmbed`), so
            the graph has no float64 tensor (TensorRT has none). False keeps diffusers' float64 angles.

    Returns: the `ExportResult`. Raises `ExportError` (tracing/translation/check failures), `ShapeError` /
    `ConfigError` (a contract that does not fit the model), TypeError (wrong argument types).
    """
    _check_export_inputs(transformer, io, config)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ConfigError(f"out_path must end in .onnx, got {out_path}")
    seconds: Dict[str, float] = {}
    start = time.perf_counter()
    try:
        program = _export_program(transformer, io, config, decompose, rope_fp32)
    except DeLeakerError:
        raise
    except Exception as exc:  # the exporter raises many types; name the phase and keep the cause
        raise ExportError(f"torch.onnx.export of the DeLeaker FLUX transformer failed: {exc}") from exc
    seconds["export"] = time.perf_counter() - start
    t0 = time.perf_counter()
    model = program.model
    _optimize(model, rewrite=not decompose)
    seconds["optimize"] = time.perf_counter() - t0
    model.metadata_props[META_IO] = json.dumps(io.to_dict(), sort_keys=True)
    model.metadata_props[META_CONFIG] = json.dumps(dataclasses.asdict(config), sort_keys=True)
    model.metadata_props[META_DECOMPOSED] = "1" if decompose else "0"
    model.metadata_props[META_ROPE_FP32] = "1" if rope_fp32 else "0"
    num_custom = sum(1 for node in model.graph.all_nodes() if node.domain == DOMAIN and node.op_type == OP_TYPE)
    if not decompose and num_custom != io.num_blocks:
        raise ExportError(f"expected {io.num_blocks} {OP_TYPE} nodes (one per joint attention), found {num_custom}")
    if decompose and num_custom:
        raise ExportError(f"the decomposed graph still has {num_custom} {OP_TYPE} nodes")

    data_name = out_path.name + ".data"
    with _staging_dir(out_path) as tmp:
        t0 = time.perf_counter()
        staged = tmp / out_path.name
        if external_data is None:
            weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
            external_data = weight_bytes > EXTERNAL_DATA_THRESHOLD
        program.save(staged, external_data=external_data)
        staged_data = tmp / data_name
        has_data = staged_data.exists()
        seconds["save"] = time.perf_counter() - t0
        if check:
            t0 = time.perf_counter()
            check_onnx_model(staged)
            seconds["check"] = time.perf_counter() - t0
        sha = sha256_file(staged)
        data_sha = sha256_file(staged_data) if has_data else None
        final_data = out_path.parent / data_name
        _move_into_place(staged, out_path, has_data=has_data)
    seconds["total"] = time.perf_counter() - start
    # The name only: callers export into staging folders that are renamed into place afterwards.
    how = "decomposed into standard ONNX operators" if decompose else f"as {num_custom} {OP_TYPE} nodes"
    logger.info("exported %s (%d joint attentions, DeLeaker %s) in %.1f s", out_path.name, io.num_blocks, how,
                seconds["total"])
    return ExportResult(
        onnx_path=out_path,
        data_path=final_data if has_data else None,
        sha256=sha,
        data_sha256=data_sha,
        io=io,
        config=config,
        decomposed=decompose,
        opset=ONNX_OPSET,
        num_deleaker_nodes=num_custom,
        seconds=seconds,
        rope_fp32=rope_fp32,
    )


def read_export_metadata(onnx_path: Union[str, Path]) -> Tuple[FluxTransformerIO, DeLeakerConfig, bool]:
    """``(io, config, decomposed)`` stored in an exported model's metadata (reads the graph, not the weights)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    missing = [key for key in (META_IO, META_CONFIG, META_DECOMPOSED) if key not in meta]
    if missing:
        raise ExportError(f"{onnx_path} lacks the DeLeaker metadata {missing}; was it written by export_transformer_onnx?")
    io = FluxTransformerIO.from_dict(loads_strict(meta[META_IO]))
    config = DeLeakerConfig(**loads_strict(meta[META_CONFIG]))
    return io, config, meta[META_DECOMPOSED] == "1"


class _AttentionOnly(torch.nn.Module):
    """One ``torch.ops.deleaker.attention`` call with fixed block place, grid and knobs (graph = one node)."""

    def __init__(self, *, block_offset: int, num_blocks: int, grid: Tuple[int, int], config: DeLeakerConfig) -> None:
        super().__init__()
        self.block_offset, self.num_blocks, self.grid, self.config = block_offset, num_blocks, grid, config

    def forward(self, q, k, v, entity_mask, history, step):
        from deleaker.library import call_attention

        return call_attention(
            q, k, v, entity_mask, history, step,
            block_offset=self.block_offset, num_blocks=self.num_blocks, grid=self.grid, config=self.config,
        )


def export_attention_onnx(
    out_path: Union[str, Path],
    *,
    batch: int,
    heads: int,
    text_len: int,
    grid: Tuple[int, int],
    head_dim: int,
    max_entities: int,
    dtype: Union[str, torch.dtype] = "float32",
    block_offset: int = 0,
    num_blocks: int = 1,
    config: DeLeakerConfig,
    decompose: bool = False,
    dynamic_batch: bool = False,
) -> Path:
    """A graph of one DeLeaker attention (for plugin and decomposition tests, and the portable conversion of
    `deleaker.export.portable`), written atomically.

    Inputs `deleaker.export.onnx_node.NODE_INPUTS`: ``q, k, v (batch, heads, text_len + gh * gw, head_dim)`` in
    ``dtype``, ``entity_mask (max_entities, text_len)`` bool, ``history (batch, max_entities, gh * gw)`` float32,
    ``step ()`` int64; outputs ``out``, ``history_out``. Static shapes, except the batch axis with
    ``dynamic_batch`` (then ``batch`` is the traced sample's, at least 2). Returns ``out_path``.
    """
    out_path = Path(out_path)
    fdt = getattr(torch, dtype_name(dtype))
    tokens = text_len + grid[0] * grid[1]
    sample_batch = max(batch, 2) if dynamic_batch else batch  # torch.export specialises a size-1 dimension
    qkv = [torch.zeros(sample_batch, heads, tokens, head_dim, dtype=fdt) for _ in range(3)]
    sample = (
        *qkv,
        torch.zeros(max_entities, text_len, dtype=torch.bool),
        torch.zeros(sample_batch, max_entities, grid[0] * grid[1]),
        torch.zeros((), dtype=torch.int64),
    )
    dynamic_shapes = None
    if dynamic_batch:
        batch_dim = torch.export.Dim("batch", min=1)
        dynamic_shapes = ({0: batch_dim}, {0: batch_dim}, {0: batch_dim}, None, {0: batch_dim}, None)
    module = _AttentionOnly(block_offset=block_offset, num_blocks=num_blocks, grid=grid, config=config)
    from .onnx_node import NODE_INPUTS, NODE_OUTPUTS

    try:
        with tracing():
            program = torch.onnx.export(
                module.eval(),
                sample,
                dynamo=True,
                input_names=list(NODE_INPUTS),
                output_names=list(NODE_OUTPUTS),
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table(decompose),
                opset_version=ONNX_OPSET,
                optimize=False,
                verbose=False,
            )
    except Exception as exc:
        raise ExportError(f"exporting one DeLeaker attention failed: {exc}") from exc
    _optimize(program.model, rewrite=False)
    with _staging_dir(out_path) as tmp:
        staged = tmp / out_path.name
        program.save(staged, external_data=False)
        check_onnx_model(staged)
        publish_staged(tmp, out_path)
    return out_path
