"""LoRA adapters fused into a FLUX.1 model's weights, as diffusers applies them.

`fuse_loras` reads each adapter (`LoraAdapter`), checks it against the model before any weight changes (a
safetensors file; LoRA weights; every layer it names exists in the transformer or the CLIP text encoder, with the
shapes it has; finite numbers), then lets diffusers apply them: ``FluxPipeline.load_lora_weights`` per adapter,
``set_adapters(names, scales)``, ``fuse_lora()`` and ``unload_lora_weights()``, which leaves plain layers holding
``W + sum(scale_i * B_i A_i * alpha_i / r_i)``. Fused weights cost nothing per step, and a plain transformer exports
to ONNX and builds into engines as any other. diffusers needs ``peft`` for this (``pip install
deleaker-trt[lora]``).

DeLeaker's attention processors are left in place; `fuse_loras` checks that each joint attention still has the
processor it had, and gives DeLeaker's their block order again (`place_deleaker_processors`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .lora import LoraAdapter, LoraError
from .processor import DeLeakerFluxAttnProcessor, place_deleaker_processors

#: The components a FLUX.1 LoRA may change, as diffusers prefixes their keys.
LORA_TARGETS = ("transformer", "text_encoder")
#: diffusers' (peft's) names of the two LoRA matrices of a layer: ``A (r, in)``, ``B (out, r)``.
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"
#: Names a fused adapter has while diffusers applies it (removed with the LoRA layers once fused).
ADAPTER_NAME = "deleaker_lora_{}"


def read_lora_file(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter``'s file; raises `LoraError` unless it is a safetensors file of LoRA weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(adapter.path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraError(
            f"LoRA {adapter.path} is not a safetensors file ({str(exc):.200}); give the adapter's .safetensors file"
        ) from None
    if not any("lora" in key.lower() for key in tensors):
        raise LoraError(f"{adapter.path} holds no LoRA weights (no key names a lora layer): not a LoRA adapter")
    return tensors


def lora_state_dict(adapter: LoraAdapter, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` in diffusers' naming (``transformer.<layer>.lora_A.weight``; kohya, XLabs and BFL adapters are
    converted by ``FluxLoraLoaderMixin.lora_state_dict``). Raises `LoraError` when diffusers cannot read it."""
    from diffusers import FluxPipeline

    try:
        state_dict = FluxPipeline.lora_state_dict(dict(tensors))
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as exc:
        raise LoraError(f"LoRA {adapter.path} is not a FLUX.1 LoRA diffusers can read: {str(exc):.200}") from None
    if isinstance(state_dict, tuple):  # some diffusers versions return (state_dict, alphas)
        state_dict = state_dict[0]
    return dict(state_dict)


def _find_layer(modules: Mapping[str, torch.nn.Module], name: str) -> torch.nn.Module | None:
    # transformers' CLIPTextModel named its layers ``text_model.encoder...`` before version 5; adapters use either.
    return modules.get(name) or modules.get(name.removeprefix("text_model."))


def check_lora_fits(
    adapter: LoraAdapter,
    state_dict: Mapping[str, torch.Tensor],
    components: Mapping[str, Any],
    targets: Sequence[str] = LORA_TARGETS,
) -> int:
    """Raise `LoraError` unless every LoRA layer of ``state_dict`` is a linear layer of one of ``targets`` with
    the shapes the adapter gives it (``A (r, in)``, ``B (out, r)``) and every tensor is finite; returns the layers
    changed. Nothing is changed: this runs on every adapter before the first is applied."""
    modules = {target: dict(components[target].named_modules()) for target in LORA_TARGETS if components.get(target)}
    layers = 0
    for key, tensor in state_dict.items():
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            raise LoraError(f"LoRA {adapter.path}: {key} holds values that are not finite numbers")
        if not key.endswith(_LORA_A):
            continue
        target, _, name = key.removesuffix(_LORA_A).partition(".")
        if target not in LORA_TARGETS:
            raise LoraError(
                f"LoRA {adapter.path} changes {key.split('.')[0]!r}, which a FLUX.1 pipeline does not have (its LoRA "
                f"layers are in {LORA_TARGETS}): an adapter for another model"
            )
        if target not in targets:
            raise LoraError(
                f"LoRA {adapter.path} also changes the {target} ({name}), which runs outside an engine (an engine "
                f"holds the transformer only): engines take adapters for {' and '.join(targets)} only; run this one "
                "with --model (the torch or onnxruntime backend)"
            )
        layer = _find_layer(modules.get(target, {}), name)
        if layer is None:
            raise LoraError(
                f"LoRA {adapter.path} changes the layer {target}.{name}, which this model does not have: an adapter "
                "for another model"
            )
        down, up = tensor, state_dict.get(key.removesuffix(_LORA_A) + _LORA_B)
        if up is None:
            raise LoraError(f"LoRA {adapter.path}: {key} has no {_LORA_B.strip('.')} beside it: a damaged adapter")
        if not isinstance(layer, torch.nn.Linear):
            raise LoraError(f"LoRA {adapter.path} changes {target}.{name}, a {type(layer).__name__}, not a linear layer")
        fits = down.ndim == 2 and up.ndim == 2 and up.shape[1] == down.shape[0]
        if not fits or down.shape[1] != layer.in_features or up.shape[0] != layer.out_features:
            raise LoraError(
                f"LoRA {adapter.path} does not fit {target}.{name}: the layer maps {layer.in_features} -> "
                f"{layer.out_features} features, the adapter's A is {tuple(down.shape)} and B "
                f"{None if up is None else tuple(up.shape)}: an adapter for another model"
            )
        layers += 1
    if layers == 0:
        raise LoraError(f"LoRA {adapter.path} changes no layer of a FLUX.1 transformer or CLIP text encoder")
    return layers


def fuse_loras(
    components: Mapping[str, Any], adapters: Sequence[LoraAdapter], *, targets: Sequence[str] = LORA_TARGETS
) -> None:
    """Fuse ``adapters`` (with their scales, composed as diffusers' ``set_adapters``) into the weights of
    ``components`` (``FluxPipeline.components``; the transformer and CLIP text encoder change in place).

    Every adapter is read and checked against the model first (`check_lora_fits`, ``targets`` the components it
    may change): a bad one raises `LoraError` with no weight changed. Raises `LoraError` when ``peft`` (which diffusers' LoRA loading needs) is missing."""
    if not adapters:
        return
    from diffusers import FluxTransformer2DModel

    transformer = components.get("transformer")
    if not isinstance(transformer, FluxTransformer2DModel):
        # FLUX.2 has its own LoRA loader (Flux2LoraLoaderMixin) and layer names; not wired up here yet.
        raise LoraError(
            f"LoRA adapters apply to FLUX.1 transformers (FluxTransformer2DModel) here, not to "
            f"{type(transformer).__name__}"
        )
    checked = []
    for adapter in adapters:
        tensors = read_lora_file(adapter)
        check_lora_fits(adapter, lora_state_dict(adapter, tensors), components, targets)
        checked.append(tensors)
    try:
        import peft  # noqa: F401  (diffusers' LoRA loading runs on it)
    except ImportError:
        raise LoraError("LoRA adapters need the peft package: pip install 'deleaker-trt[lora]'") from None
    from diffusers import FluxPipeline

    processors = {name: type(p) for name, p in transformer.attn_processors.items()}
    pipe = FluxPipeline(**{name: components.get(name) for name in _PIPELINE_PARTS})
    names = [ADAPTER_NAME.format(i) for i in range(len(adapters))]
    try:
        for name, tensors in zip(names, checked):
            pipe.load_lora_weights(dict(tensors), adapter_name=name)  # a copy: loading may pop converted keys
        pipe.set_adapters(names, [adapter.scale for adapter in adapters])
        pipe.fuse_lora(components=list(targets), lora_scale=1.0, adapter_names=names)
    finally:
        # Plain layers again (with the adapters fused). After a failure inside diffusers the weights may be partly
        # changed: the caller discards these components (the runtime and the build load them for this use only).
        pipe.unload_lora_weights()
    after = {name: type(p) for name, p in transformer.attn_processors.items()}
    if after != processors:
        raise LoraError("applying the LoRA adapters replaced the transformer's attention processors")
    if any(issubclass(kind, DeLeakerFluxAttnProcessor) for kind in after.values()):
        place_deleaker_processors(transformer)


#: The arguments of ``FluxPipeline(...)``.
_PIPELINE_PARTS = (
    "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer", "image_encoder",
    "feature_extractor",
)
