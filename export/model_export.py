"""A model on disk (``tiny`` or a diffusers folder) exported to ONNX in one call: `load_transformer` (the
transformer alone, in the export's dtype, with its VAE's scale factor) and `export_model_onnx` (load, make the
contract, resolve the knobs, `deleaker.export.exporter.export_transformer_onnx`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Tuple, Union

import torch

from deleaker.config import DeLeakerConfig
from deleaker.errors import ConfigError
from deleaker.geometry import vae_scale_factor
from deleaker.jsonio import loads_strict

from .contract import FluxTransformerIO, dtype_name
from .exporter import ExportResult, export_transformer_onnx


def _vae_scale_factor(model_dir: Path) -> int:
    vae_config = model_dir / "vae" / "config.json"
    if not vae_config.is_file():
        return 8  # FLUX.1's
    try:
        config = loads_strict(vae_config.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"cannot read the VAE config {vae_config}: {str(exc):.200}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"the VAE config {vae_config} is not a JSON object")
    return vae_scale_factor({"block_out_channels": [0, 0, 0, 0], **config})


def load_transformer(
    model_path_or_tiny: Union[str, Path], precision: Union[str, torch.dtype] = "float32", *, seed: int = 0
) -> Tuple[torch.nn.Module, int]:
    """``(transformer, vae_scale_factor)`` of ``"tiny"`` (`deleaker.tiny`, weights from ``seed``) or a local folder.

    A folder is a diffusers pipeline folder (with ``transformer/`` and ``vae/``) or a transformer folder itself.
    The model is loaded on the CPU in ``precision`` (float32/float16/bfloat16, or fp32/fp16/bf16).
    """
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel

    from deleaker.models import TINY_MODEL_NAME, names_builtin_tiny
    from deleaker.tiny import build_tiny_flux_components

    try:
        dtype = dtype_name(precision)
    except ConfigError:
        dtype = None
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"precision must be float32, float16 or bfloat16 (fp32/fp16/bf16), got {precision!r}")
    torch_dtype = getattr(torch, dtype)
    if names_builtin_tiny(model_path_or_tiny):  # the string "tiny" only: Path("tiny") is a folder
        components = build_tiny_flux_components(seed)
        transformer = components["transformer"]
        scale = vae_scale_factor(components["vae"].config)
        return (transformer if torch_dtype == torch.float32 else transformer.to(torch_dtype)), scale
    path = Path(model_path_or_tiny)

    def model_class(config_path: Path) -> type:
        # FLUX.2 ([dev], [klein]) by its config's class name; anything else loads as FLUX.1.
        try:
            name = loads_strict(config_path.read_text()).get("_class_name")
        except (OSError, ValueError, RecursionError, AttributeError):
            name = None
        return Flux2Transformer2DModel if name == "Flux2Transformer2DModel" else FluxTransformer2DModel

    if (path / "transformer" / "config.json").is_file():
        cls = model_class(path / "transformer" / "config.json")
        transformer = cls.from_pretrained(path, subfolder="transformer", torch_dtype=torch_dtype)
        return transformer.eval(), _vae_scale_factor(path)
    if (path / "config.json").is_file():
        transformer = model_class(path / "config.json").from_pretrained(path, torch_dtype=torch_dtype)
        return transformer.eval(), _vae_scale_factor(path.parent)
    raise ConfigError(
        f"model must be {TINY_MODEL_NAME!r} or a local diffusers folder (with transformer/config.json), got {path}"
    )


def export_model_onnx(
    model_path_or_tiny: Union[str, Path],
    *,
    height: int,
    width: int,
    text_len: int,
    max_entities: int,
    precision: Union[str, torch.dtype],
    out_dir: Union[str, Path],
    batch: Tuple[int, int, int] = (1, 1, 4),
    decompose: bool = False,
    deleaker_config: Union[DeLeakerConfig, Mapping[str, Any], None] = None,
    seed: int = 0,
) -> ExportResult:
    """Load a model (`load_transformer`) and export it to ``out_dir`` (what ``deleaker-trt build --onnx-only`` does).

    The file is ``out_dir/transformer_{H}x{W}_t{T}_e{E}_{precision}[_decomposed].onnx``; ``deleaker_config`` is
    resolved for the model (``DeLeakerConfig.resolve``: defaults scaled to its blocks per step). Returns the
    `ExportResult` (its ``onnx_path``, ``data_path`` and hashes are the paths to record).
    """
    transformer, vae_scale_factor = load_transformer(model_path_or_tiny, precision, seed=seed)
    io = FluxTransformerIO.from_transformer(
        transformer,
        height=height,
        width=width,
        text_len=text_len,
        max_entities=max_entities,
        vae_scale_factor=vae_scale_factor,
        batch=batch,
    )
    config = DeLeakerConfig.resolve(deleaker_config, io.num_blocks)
    name = f"transformer_{height}x{width}_t{text_len}_e{max_entities}_{io.dtype}{'_decomposed' if decompose else ''}.onnx"
    return export_transformer_onnx(transformer, io, Path(out_dir) / name, config=config, decompose=decompose)
