"""``deleaker-trt``: the command line. Each command parses its options into a config object, calls one library
function (``deleaker.runtime.jobs``), prints, and exits non-zero on a `DeLeakerError` (one ``error:`` line on
stderr, exit 1, no traceback), a usage error (click's exit code 2) or Ctrl-C (exit 130).

Nothing heavy is imported at module level: ``--help``, usage errors and every check that needs no model (numbers,
knobs, paths, prompts files, entities as words of the prompt) answer before torch is imported.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from .errors import (  # noqa: F401  (the exit codes, named where the commands are)
    CHECKED_FLOAT,
    CHECKED_INT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    DeLeakerCliError,
    reported_errors,
)
from .options import (
    echo_json,
    entity_list,
    progress_factory,
    refuse_unused_guidance,
    request_options,
    runtime_spec,
    source_options,
    torch_execution_options,
)


class _NoticeHandler(logging.Handler):
    """The library's notices (``logging`` INFO of ``deleaker.*``, e.g. "exporting the ONNX ...") as stderr lines."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deleaker-trt")
@click.option("--verbose", is_flag=True, help="Show the libraries' own warnings (transformers, torch's exporter).")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """DeLeaker for FLUX.1: entity leakage mitigation with ONNX Runtime, TensorRT or PyTorch."""
    if not verbose:
        _quiet_libraries()
    # What the library says it is doing (an ONNX export of a minute, say) goes to stderr while the command runs.
    logger, handler = logging.getLogger("deleaker"), _NoticeHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)

    ctx.call_on_close(restore)


def _quiet_libraries() -> None:
    """Keep the terminal for our own output: the libraries' notices (transformers' torchvision notice, the ONNX
    exporter's registration warnings) say nothing actionable to a user of this command. The CLI is the process's
    entry point, so it may set these process-wide; the library API never does."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # torch imports lazily here and its logging setup resets the level of "torch.onnx" on import (which then warns
    # that torchvision is missing, once per torchvision op): TORCH_LOGS sets it where torch reads it; the level
    # set directly covers a torch imported already (tests).
    os.environ.setdefault("TORCH_LOGS", "-onnx")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # Deprecation notices address developers of this package, not users of the command.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|diffusers|onnxscript)\.")


@main.command()
@source_options
@request_options
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
@click.option(
    "--overwrite",
    is_flag=True,
    help="--prompts only: generate every line again, replacing its image (default: keep images made with the "
    "same settings, refuse to touch images made otherwise).",
)
@click.option(
    "--compare", is_flag=True, help="Also render plain FLUX (same seed); save both side by side in <out>_compare.png."
)
@click.option(
    "--save-masks",
    is_flag=True,
    help="Also save the entity masks DeLeaker used, drawn over its image (one colour per entity), in "
    "<out>_masks.png.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@torch_execution_options
def run(
    engines,
    model,
    backend,
    text_len,
    max_entities,
    cache_dir,
    device,
    precision,
    loras,
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
    overwrite,
    compare,
    save_masks,
    as_json,
    no_progress,
    compile_model,
    fp8,
    offload_encoders,
) -> None:
    """Generate images with DeLeaker (one --prompt, or a --prompts batch)."""
    from deleaker.runtime import jobs
    from deleaker.runtime.request import ImageSettings

    with reported_errors("the image in progress"):
        spec = runtime_spec(
            engines, model, backend, text_len, max_entities, cache_dir, device, precision, overrides, compile_model, fp8,
            offload_encoders, loras,
        )
        refuse_unused_guidance(spec)
        settings = ImageSettings(seed, steps, guidance, height, width).square()
        if prompts_file is not None:
            if prompt is not None or entities is not None:
                raise click.UsageError("--prompts replaces --prompt/--entities; give one or the other")
            job = jobs.batch_job(
                spec, prompts_file, out_dir, settings=settings, compare=compare, overwrite=overwrite,
                save_masks=save_masks,
            )
        else:
            if prompt is None or entities is None:
                raise click.UsageError("give --prompt and --entities (or a --prompts FILE.jsonl batch)")
            if overwrite:
                raise click.UsageError("--overwrite applies to --prompts batches (a single --out is always written)")
            job = jobs.single_job(
                spec, settings.request(prompt, entity_list(entities)), out, compare=compare, save_masks=save_masks
            )
        report = jobs.run_job(job, progress_factory=progress_factory(not no_progress))

    if as_json:
        echo_json(report.to_dict())
        return
    for item in report.items:
        if item.skipped:
            click.echo(f"{item.out}: exists, skipped")
            continue
        t = item.timings
        extra = f", compare {item.compare_out}" if item.compare_out else ""
        extra += f", masks {item.masks_out}" if item.masks_out else ""
        click.echo(
            f"{item.out}: {item.width}x{item.height}, {item.steps} steps, {report.backend}{extra} | "
            f"backend load {t['backend_load']:.2f}s encode {t['encode']:.2f}s denoise {t['denoise']:.2f}s "
            f"decode {t['decode']:.2f}s total {t['total']:.2f}s"
        )


@main.command()
@source_options
@request_options
@click.option(
    "--max-rel-err",
    type=CHECKED_FLOAT,
    default=1e-2,
    show_default=True,
    help="Largest allowed per-step latent relative error vs PyTorch.",
)
@click.option(
    "--min-psnr",
    type=CHECKED_FLOAT,
    default=30.0,
    show_default=True,
    help="Smallest allowed final-image PSNR (dB) vs PyTorch.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@torch_execution_options
def verify(
    engines,
    model,
    backend,
    text_len,
    max_entities,
    cache_dir,
    device,
    precision,
    loras,
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
    compile_model,
    fp8,
    offload_encoders,
) -> None:
    """Run one prompt on a backend and on PyTorch; fail beyond tolerance (latent rel. error per step, PSNR)."""
    from deleaker.runtime import jobs
    from deleaker.runtime.request import ImageSettings

    with reported_errors("the image in progress"):
        spec = runtime_spec(
            engines, model, backend, text_len, max_entities, cache_dir, device, precision, overrides, compile_model, fp8,
            offload_encoders, loras,
        )
        refuse_unused_guidance(spec)
        settings = ImageSettings(seed, steps, guidance, height, width).square()
        if prompt is None or entities is None:
            raise click.UsageError("give --prompt and --entities")
        job = jobs.VerifyJob(spec, settings.request(prompt, entity_list(entities)), max_rel_err, min_psnr)
        report = jobs.verify(job, progress_factory=progress_factory(not no_progress))
    if as_json:
        echo_json(report.to_dict())
    else:
        steps_text = " ".join(f"{e:.2e}" for e in report.step_rel_err)
        psnr_text = "identical images" if report.psnr_db == float("inf") else f"{report.psnr_db:.2f} dB"
        click.echo(f"backend {report.backend} vs torch: latent rel. error per step {steps_text}")
        worst = "not finite" if report.max_step_rel_err is None else f"{report.max_step_rel_err:.2e}"
        click.echo(f"final image PSNR {psnr_text} (min {min_psnr} dB); max rel. error {worst} (max {max_rel_err})")
    if not report.passed:
        raise DeLeakerCliError(f"verify: FAIL: {report.backend} vs PyTorch: {'; '.join(report.failures)}")
    click.echo("verify: PASS", err=True)


# The engine and plugin build commands each have a module here; the group only mounts them.
# Model code is imported inside the commands, so `deleaker-trt --help` stays fast (tests/test_cli_fast.py).
from .build_command import build as _build_command  # noqa: E402  (after the group it joins)

main.add_command(_build_command)

from .plugin_command import plugin as _plugin_command  # noqa: E402

main.add_command(_plugin_command)

from .serve_command import serve as _serve_command  # noqa: E402

main.add_command(_serve_command)

from .demo_command import demo as _demo_command  # noqa: E402

main.add_command(_demo_command)

from .triton_command import triton_repo as _triton_repo_command  # noqa: E402

main.add_command(_triton_repo_command)


def entry_point() -> None:
    """The ``deleaker-trt`` command (and ``python -m deleaker.runtime.cli``). After Ctrl-C or SIGTERM the command
    has unwound (nothing partial is left) and printed its error line: the process then ends at once with exit code
    130 or 143. Left to the interpreter's own exit, a handled Ctrl-C was seen to end as death by SIGINT instead
    (exit status -2 under ``-m``, about one run in eight during an ONNX export), which scripts read as a crash."""
    try:
        main()
    except SystemExit as exc:
        if exc.code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code)
        raise

