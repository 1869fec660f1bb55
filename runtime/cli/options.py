"""The options ``run``, ``verify`` and ``serve`` share (where the model comes from, what a request is) and what they
do with them: a `RuntimeSpec` for the library, progress bars, JSON reports. Light: imported before torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from deleaker.entities import DEFAULT_MAX_ENTITIES
from deleaker.export.limits import MAX_TEXT_LEN, PRECISIONS
from deleaker.plugins.kernels import MAX_ENTITIES
from deleaker.runtime.defaults import (
    BACKENDS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    DEFAULT_TEXT_LEN,
    FP8_SCALES,
    UNGUIDED_STEPS,
)

from .errors import CHECKED_FLOAT, CHECKED_INT
from .knobs import knob_option, knob_overrides


def echo_json(report: dict[str, Any]) -> None:
    # allow_nan=False: strict JSON only (the reports hold null plus a reason where a number is not finite).
    click.echo(json.dumps(report, indent=2, allow_nan=False))


def entity_list(value: str) -> tuple[str, ...]:
    # Empty items ("cat,,dog", "cat,dog,") are kept: the entity checks refuse them, as the Python API does, rather
    # than the command line guessing what a typo meant.
    return tuple(e.strip() for e in value.split(","))


def progress_factory(enabled: bool):
    """tqdm bars on stderr, one per generation (stdout stays clean for ``--json``)."""
    if not enabled:
        return None
    from tqdm import tqdm

    class _Bar:
        def __init__(self, total: int, description: str) -> None:
            # leave=True: the finished bar stays, so its last state is drawn even when a run beats tqdm's refresh.
            self._bar = tqdm(total=total, desc=description, file=sys.stderr, leave=True, unit="step")

        def update(self, done: int, total: int) -> None:
            self._bar.update(done - self._bar.n)

        def close(self) -> None:
            self._bar.close()

    return _Bar


def lora_option(more: str = ""):
    """``--lora PATH[:SCALE]`` (repeatable; `lora_adapters` turns the values into adapters)."""
    return click.option(
        "--lora",
        "loras",
        multiple=True,
        metavar="PATH[:SCALE]",
        help="A LoRA adapter (.safetensors, as diffusers' load_lora_weights reads it) fused into the model's weights "
        "with the weight SCALE (a finite number, default 1.0); repeatable, composed as diffusers' set_adapters. "
        + more,
    )


def source_options(func):
    """The options that say where the model comes from (shared by ``run`` and ``verify``)."""
    options = [
        click.option(
            "--engines",
            "engines",
            type=click.Path(path_type=Path),
            default=None,
            help="Directory of built engines/ONNX files with manifests (see `deleaker-trt build`).",
        ),
        click.option(
            "--model", "model", default=None, help="'tiny' (built-in test model) or a local diffusers FLUX folder."
        ),
        click.option(
            "--backend",
            type=click.Choice(BACKENDS),
            default=None,
            help="Transformer backend. Default: onnxruntime with --model; the artifacts' kind with --engines.",
        ),
        click.option(
            "--text-len",
            type=CHECKED_INT,
            default=None,  # None: the default for a model; engines fix T and refuse a value (`RuntimeSpec`)
            help=f"T5 tokens T, 1 to {MAX_TEXT_LEN} (--model only, default {DEFAULT_TEXT_LEN}; engines fix it).",
        ),
        click.option(
            "--max-entities",
            type=CHECKED_INT,
            default=None,
            help=f"E_max, 2 to {MAX_ENTITIES} (--model only, default {DEFAULT_MAX_ENTITIES}; engines fix it; the "
            f"kernels take at most {MAX_ENTITIES}).",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Where --model exports ONNX and --engines keeps the portable form of an engine folder's ONNX for ONNX "
            "Runtime (default $DELEAKER_CACHE or ~/.cache/deleaker-trt).",
        ),
        click.option("--device", default=None, help="torch device of the torch backend (default: cuda if available)."),
        click.option(
            "--precision",
            type=click.Choice(PRECISIONS),
            default=None,
            help="Engines of this precision (--engines only; needed when a directory has several).",
        ),
        lora_option(
            "With --engines: only the adapters and scales the engines were built with (`build --lora`); none runs "
            "them as built."
        ),
        knob_option(
            "Override a DeLeaker knob (--model only: engines are built with theirs, see `build --set`), e.g. "
            "--set k_strength=1.5; repeatable, each knob once."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def request_options(func):
    options = [
        click.option("--prompt", default=None, help="The prompt."),
        click.option("--entities", default=None, help="Comma-separated entities of the prompt, e.g. 'cat,dog'."),
        # Values are checked by the library (`ImageSettings`): one message and exit 1 for every bad value.
        click.option(
            "--seed", type=CHECKED_INT, default=0, show_default=True, help="Starting noise, an int in [0, 2**63)."
        ),
        # Defaults follow the model (the runtime fills them in): FLUX.1-schnell runs 4 steps and no guidance.
        click.option(
            "--steps",
            type=CHECKED_INT,
            default=None,
            help=f"Denoising steps, 1 to 1000 (default: {UNGUIDED_STEPS} for a model without a guidance embedding, "
            f"FLUX.1-schnell; the pipeline's own for FLUX.2; {DEFAULT_STEPS} otherwise).",
        ),
        click.option(
            "--guidance",
            type=CHECKED_FLOAT,
            default=None,
            help=f"Guidance, a finite number in [0, 100] (default: {DEFAULT_GUIDANCE:g}, FLUX.2's pipeline's own; "
            "refused for a FLUX.1 model without a guidance embedding, FLUX.1-schnell).",
        ),
        click.option(
            "--height", type=CHECKED_INT, default=None, help="Pixels (default: the engine's, 64 for tiny, else 512)."
        ),
        click.option("--width", type=CHECKED_INT, default=None, help="Pixels (default: as --height, or the engine's)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def torch_execution_options(func):
    """How the torch backend runs: ``--compile``, ``--fp8`` and ``--offload-encoders`` (other backends refuse them)."""
    func = click.option(
        "--offload-encoders",
        is_flag=True,
        help="--backend torch on a GPU only: keep the text encoders in CPU memory and move them to the GPU only to "
        "encode a new prompt (for GPUs too small for the whole pipeline).",
    )(func)
    func = click.option(
        "--fp8",
        type=click.Choice(FP8_SCALES),
        default=None,
        help="--backend torch only: the transformer blocks' linear layers in FP8 E4M3 with row-wise or per-tensor "
        "scales (embedders, norms, output projection and DeLeaker's attention keep the model's dtype).",
    )(func)
    return click.option(
        "--compile",
        "compile_model",
        is_flag=True,
        help="--backend torch only: run the transformer through torch.compile (inductor; CUDA graphs per resolution "
        "and batch on a GPU). Each new resolution compiles on its first image (its seconds are the 'compile' "
        "timing).",
    )(func)


def lora_adapters(options: tuple[str, ...]) -> tuple:
    """``--lora PATH[:SCALE]`` options as `deleaker.lora.LoraAdapter` values: the library's own checks (path is a
    file, scale finite), before torch is imported."""
    from deleaker.lora import parse_lora_option

    return tuple(parse_lora_option(text) for text in options)


def refuse_unused_guidance(spec: Any) -> None:
    """Refuse ``--guidance`` given on the command line for a model without a guidance embedding (FLUX.1-schnell):
    its images do not depend on guidance (diffusers ignores it), and an option that would be ignored silently is an
    error here, as ``--text-len`` with engines is. The model's config or the engines' manifests are read, not the
    weights. A source that cannot be read is left to the load that follows, which names the problem."""
    source = click.get_current_context().get_parameter_source("guidance")
    if source in (None, click.core.ParameterSource.DEFAULT):
        return
    from deleaker.errors import ConfigError, DeLeakerError

    try:
        if spec.model is not None:
            from deleaker.models import embeds_guidance, is_flux2_model

            # FLUX.2 [klein] has no guidance embedding but runs classifier-free guidance with it: guidance is used.
            guided = is_flux2_model(spec.model) or embeds_guidance(spec.model)
            name = f"the model {spec.model}"
        else:
            from deleaker.engines.manifest import MANIFEST_SUFFIX, EngineManifest

            manifests = [EngineManifest.read(p) for p in sorted(Path(spec.engines).glob("*" + MANIFEST_SUFFIX))]
            guided = any(bool(m.io.get("guidance_embeds", True)) for m in manifests) or not manifests
            name = f"the engines in {spec.engines}"
    except (DeLeakerError, OSError):
        return
    if not guided:
        raise ConfigError(
            f"--guidance: {name} has no guidance embedding (FLUX.1-schnell is distilled without one), so guidance "
            "does not change its images; leave --guidance out"
        )


def runtime_spec(
    engines, model, backend, text_len, max_entities, cache_dir, device, precision, overrides, compile_model=False,
    fp8=None, offload_encoders=False, loras=(),
):
    from deleaker.runtime import jobs

    if (engines is None) == (model is None):
        raise click.UsageError("give exactly one of --engines DIR or --model PATH|tiny")
    return jobs.RuntimeSpec(
        engines=engines,
        model=model,
        backend=backend,
        text_len=text_len,
        max_entities=max_entities,
        cache_dir=cache_dir,
        device=device,
        deleaker_overrides=knob_overrides(overrides),
        precision=precision,
        compile=compile_model,
        fp8=fp8,
        offload_encoders=offload_encoders,
        loras=lora_adapters(loras),
    )
