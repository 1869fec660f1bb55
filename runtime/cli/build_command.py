"""``deleaker-trt build``: parse the options into a `BuildRequest`, call `build_engines`, print stage timings.

Mounted on the ``deleaker-trt`` group by ``deleaker.runtime.cli``.
Typed errors print ``error: <message>`` on stderr and exit 1; usage errors exit 2 (click); Ctrl-C and SIGTERM
exit 130 and 143 (`deleaker.runtime.cli.errors`), leaving no partial artifact.
"""

from __future__ import annotations

from pathlib import Path

import click

from deleaker.plugins.kernels import MAX_ENTITIES
from .errors import CHECKED_INT, reported_errors
from .knobs import knob_option, knob_overrides
from .options import lora_adapters, lora_option
from deleaker.export.limits import DEFAULT_PRECISION, MAX_SIDE, MAX_TEXT_LEN, PRECISIONS

from deleaker.engines.manifest import MAX_BATCH


@click.command("build")
@click.option("--model", required=True, help="'tiny' (built-in test model) or a local diffusers FLUX folder.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=DEFAULT_PRECISION,
    show_default=True,
    help="Engine precision: fp16/bf16 (strongly typed) or fp8 (E4M3 Q/DQ on the linears, fp16 elsewhere).",
)
# Values are checked by `BuildRequest` (CHECKED_INT passes what is not an int on): one message and exit 1 for
# every bad value, with its allowed range.
@click.option(
    "--height",
    type=CHECKED_INT,
    default=512,
    show_default=True,
    help=f"Image height in pixels, at most {MAX_SIDE} (a multiple of 2 x the VAE scale factor).",
)
@click.option("--width", type=CHECKED_INT, default=512, show_default=True, help="Image width in pixels (as --height).")
@click.option(
    "--max-entities",
    type=CHECKED_INT,
    default=4,
    show_default=True,
    help=f"E_max: entity rows of the engine, 2 to {MAX_ENTITIES} (the kernels take at most {MAX_ENTITIES}).",
)
@click.option(
    "--text-len", type=CHECKED_INT, default=256, show_default=True, help=f"T5 tokens T, 1 to {MAX_TEXT_LEN}."
)
@click.option(
    "--batch",
    type=(CHECKED_INT, CHECKED_INT, CHECKED_INT),
    default=(1, 1, 4),
    show_default=True,
    help=f"Batch profile MIN OPT MAX of the engine, 1 <= MIN <= OPT <= MAX <= {MAX_BATCH} (`run --engines` makes one "
    "image per call: it needs MIN = 1; other servers may batch).",
)
@click.option(
    "--out",
    "out_dir",
    # Checked by BuildRequest (one error line, exit 1, as every bad path), not by click (usage text, exit 2).
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder (ONNX, engine, manifests, timing cache).",
)
@click.option(
    "--plugin",
    "plugin_library",
    # Checked by `BuildRequest` (one error line, exit 1, as every bad path), not by click (a usage error, exit 2).
    type=click.Path(path_type=Path),
    metavar="FILE",
    default=None,
    help="The DeLeaker TensorRT plugin library (libdeleaker_trt_plugin.so, from `deleaker-trt plugin`); needed for "
    "an engine. Copied into the output folder, where `run --engines` loads it from.",
)
@click.option(
    "--onnx-only", is_flag=True, help="Stop after the ONNX and its manifest (no TensorRT, no plugin library needed)."
)
@lora_option(
    "Baked into the engine's weights and recorded in its manifest (adapters for the transformer only: the text "
    "encoders run outside the engine)."
)
@knob_option(
    "A DeLeaker knob built into the engine's nodes, e.g. --set k_strength=1.5 (default: the spec's, windows scaled "
    "to the model); repeatable, each knob once."
)
def build(
    model, precision, height, width, max_entities, text_len, batch, out_dir, plugin_library, onnx_only, loras,
    overrides,
) -> None:
    """Export the DeLeaker FLUX transformer to ONNX and build a TensorRT engine with a manifest."""
    from deleaker.engines.request import BuildRequest

    with reported_errors("the artifact in progress"):
        # Made before the build is imported: every bound its manifests enforce is refused before torch loads.
        request = BuildRequest(
            model=model,
            precision=precision,
            out_dir=out_dir,
            height=height,
            width=width,
            text_len=text_len,
            max_entities=max_entities,
            batch=tuple(batch),
            onnx_only=onnx_only,
            plugin_library=plugin_library,
            deleaker_config=dict(knob_overrides(overrides)) or None,
            loras=lora_adapters(loras),
        )
        # Imported here: the build pulls in torch and onnx, which `--help` and bad input do not need.
        from deleaker.engines.build import build_engines

        result = build_engines(request, progress=lambda line: click.echo(line, err=True))
    click.echo(f"onnx: {result.onnx_path}" + (" (reused)" if result.reused_onnx else ""))
    if result.engine_path is not None:
        click.echo(f"engine: {result.engine_path}")
    total = sum(result.timings_s.values())
    click.echo("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings_s.items()) + f" (total {total:.1f}s)")
