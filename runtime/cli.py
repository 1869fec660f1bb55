"""``deleaker-trt``: the command line. Each command parses its options into a config object, calls one library
function (``deleaker.runtime.jobs``), prints, and exits non-zero on a `DeLeakerError` (message on stderr, no
traceback) or a usage error (click's exit code 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from deleaker.errors import DeLeakerError

from .defaults import BACKENDS, DEFAULT_GUIDANCE, DEFAULT_MAX_ENTITIES, DEFAULT_STEPS, DEFAULT_TEXT_LEN

#: Exit code of a typed error (bad input, incompatible engine, verification beyond tolerance).
EXIT_ERROR = 1


class DeLeakerCliError(click.ClickException):
    """A library error shown as ``error: <message>`` on stderr, exit code 1."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _fail(exc: DeLeakerError) -> DeLeakerCliError:
    return DeLeakerCliError(str(exc))


def _entities(value: str) -> tuple[str, ...]:
    return tuple(e.strip() for e in value.split(",") if e.strip())


def _progress_factory(enabled: bool):
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


def _source_options(func):
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
            type=click.IntRange(1, 512),
            default=DEFAULT_TEXT_LEN,
            show_default=True,
            help="T5 tokens T (--model only; engines fix it).",
        ),
        click.option(
            "--max-entities",
            type=click.IntRange(2, 16),
            default=DEFAULT_MAX_ENTITIES,
            show_default=True,
            help="E_max (--model only; engines fix it).",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Where --model exports ONNX (default $DELEAKER_CACHE or ~/.cache/deleaker-trt).",
        ),
        click.option("--device", default=None, help="torch device of the torch backend (default: cuda if available)."),
        click.option(
            "--precision",
            type=click.Choice(("fp16", "bf16", "fp8")),
            default=None,
            help="Engines of this precision (--engines only; needed when a directory has several).",
        ),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KNOB=VALUE",
            help="Override a DeLeaker knob (--model only), e.g. --set k_strength=1.5; repeatable.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _request_options(func):
    options = [
        click.option("--prompt", default=None, help="The prompt."),
        click.option("--entities", default=None, help="Comma-separated entities of the prompt, e.g. 'cat,dog'."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True),
        click.option("--steps", type=click.IntRange(1, 1000), default=DEFAULT_STEPS, show_default=True),
        click.option("--guidance", type=float, default=DEFAULT_GUIDANCE, show_default=True),
        click.option("--height", type=int, default=None, help="Pixels (default: the engine's, 64 for tiny, else 512)."),
        click.option("--width", type=int, default=None, help="Pixels (default: as --height)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _overrides(values: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """``("k_strength=1.5", "use_history=false")`` -> ``(("k_strength", 1.5), ("use_history", False))``."""
    parsed = []
    for item in values:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected KNOB=VALUE, got {item!r}", param_hint="--set")
        try:
            value = json.loads(text.strip().lower() if text.strip().lower() in ("true", "false") else text)
        except json.JSONDecodeError:
            raise click.BadParameter(f"{name}: {text!r} is not a number or true/false", param_hint="--set") from None
        parsed.append((name.strip(), value))
    return tuple(parsed)


def _runtime_spec(engines, model, backend, text_len, max_entities, cache_dir, device, precision, overrides):
    from . import jobs

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
        deleaker_overrides=_overrides(overrides),
        precision=precision,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deleaker-trt")
@click.option("--verbose", is_flag=True, help="Show the libraries' own warnings (transformers, torch's exporter).")
def main(verbose: bool) -> None:
    """DeLeaker for FLUX.1: entity leakage mitigation with ONNX Runtime, TensorRT or PyTorch."""
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep the terminal for our own output: the libraries' notices (transformers' torchvision notice, the ONNX
    exporter's registration warnings) say nothing actionable to a user of this command. The CLI is the process's
    entry point, so it may set these process-wide; the library API never does."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # Deprecation notices address developers of this package, not users of the command.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|diffusers|onnxscript)\.")


@main.command()
@_source_options
@_request_options
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("out.png"),
    show_default=True,
    help="Output PNG (single prompt).",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(path_type=Path),
    default=None,
    help="JSONL batch (prompt, entities, optional seed per line); resumes where it stopped.",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path),
    default=Path("out"),
    show_default=True,
    help="Output directory of a --prompts batch (NNNN.png per line).",
)
@click.option("--compare", is_flag=True, help="Also render plain FLUX (same seed); save both side by side.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
def run(
    engines,
    model,
    backend,
    text_len,
    max_entities,
    cache_dir,
    device,
    precision,
    overrides,
    prompt,
    entities,
    seed,
    steps,
    guidance,
    height,
    width,
    out,
    prompts_file,
    out_dir,
    compare,
    as_json,
    no_progress,
) -> None:
    """Generate images with DeLeaker (one --prompt, or a --prompts batch)."""
    from . import jobs
    from .runtime import GenerationRequest

    try:
        spec = _runtime_spec(engines, model, backend, text_len, max_entities, cache_dir, device, precision, overrides)
    except DeLeakerError as exc:
        raise _fail(exc) from None
    width = height if width is None else width
    height = width if height is None else height
    try:
        if prompts_file is not None:
            if prompt is not None or entities is not None:
                raise click.UsageError("--prompts replaces --prompt/--entities; give one or the other")
            defaults = GenerationRequest("", (), seed=seed, steps=steps, guidance=guidance, height=height, width=width)
            job = jobs.batch_job(spec, prompts_file, out_dir, defaults=defaults, compare=compare)
        else:
            if prompt is None or entities is None:
                raise click.UsageError("give --prompt and --entities (or a --prompts FILE.jsonl batch)")
            request = GenerationRequest(prompt, _entities(entities), seed, steps, guidance, height, width)
            job = jobs.single_job(spec, request, out, compare=compare)
        report = jobs.run_job(job, progress_factory=_progress_factory(not no_progress))
    except DeLeakerError as exc:
        raise _fail(exc) from None

    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    for item in report.items:
        if item.skipped:
            click.echo(f"{item.out}: exists, skipped")
            continue
        t = item.timings
        extra = f", compare {item.compare_out}" if item.compare_out else ""
        click.echo(
            f"{item.out}: {item.width}x{item.height}, {item.steps} steps, {report.backend}{extra} | "
            f"backend load {t['backend_load']:.2f}s encode {t['encode']:.2f}s denoise {t['denoise']:.2f}s "
            f"decode {t['decode']:.2f}s total {t['total']:.2f}s"
        )


@main.command()
@_source_options
@_request_options
@click.option(
    "--max-rel-err",
    type=float,
    default=1e-2,
    show_default=True,
    help="Largest allowed per-step latent relative error vs PyTorch.",
)
@click.option(
    "--min-psnr", type=float, default=30.0, show_default=True, help="Smallest allowed final-image PSNR (dB) vs PyTorch."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
def verify(
    engines,
    model,
    backend,
    text_len,
    max_entities,
    cache_dir,
    device,
    precision,
    overrides,
    prompt,
    entities,
    seed,
    steps,
    guidance,
    height,
    width,
    max_rel_err,
    min_psnr,
    as_json,
    no_progress,
) -> None:
    """Run one prompt on a backend and on PyTorch; fail beyond tolerance (latent rel. error per step, PSNR)."""
    from . import jobs
    from .runtime import GenerationRequest

    try:
        spec = _runtime_spec(engines, model, backend, text_len, max_entities, cache_dir, device, precision, overrides)
    except DeLeakerError as exc:
        raise _fail(exc) from None
    if prompt is None or entities is None:
        raise click.UsageError("give --prompt and --entities")
    width = height if width is None else width
    height = width if height is None else height
    try:
        request = GenerationRequest(prompt, _entities(entities), seed, steps, guidance, height, width)
        report = jobs.verify(
            jobs.VerifyJob(spec, request, max_rel_err=max_rel_err, min_psnr=min_psnr),
            progress_factory=_progress_factory(not no_progress),
        )
    except DeLeakerError as exc:
        raise _fail(exc) from None
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        steps_text = " ".join(f"{e:.2e}" for e in report.step_rel_err)
        click.echo(f"backend {report.backend} vs torch: latent rel. error per step {steps_text}")
        click.echo(
            f"final image PSNR {report.psnr_db:.2f} dB (min {min_psnr}); max rel. error "
            f"{max(report.step_rel_err):.2e} (max {max_rel_err})"
        )
    if not report.passed:
        raise DeLeakerCliError(
            f"{report.backend} differs from PyTorch beyond tolerance (max rel. error {max(report.step_rel_err):.2e} "
            f"> {max_rel_err} or PSNR {report.psnr_db:.2f} dB < {min_psnr} dB)"
        )
    click.echo("verify: PASS", err=True)


# The engine build command lives with the engines (deleaker.engines.cli); the group only mounts it.
# Model code is imported inside the commands, so `deleaker-trt --help` stays fast.
from deleaker.engines.cli import build as _build_command  # noqa: E402  (after the group it joins)

main.add_command(_build_command)

# The plugin library build lives with the plugins (deleaker.plugins.trt_cli).
from deleaker.plugins.trt_cli import plugin as _plugin_command  # noqa: E402

main.add_command(_plugin_command)


if __name__ == "__main__":  # pragma: no cover
    main()
