"""``deleaker-trt triton-repo``: parse the options into a `TritonRepoSpec`, write the repository
(`deleaker.runtime.triton_repo.write_repository`), print its models and the ``tritonserver`` line.

Mounted on the ``deleaker-trt`` group by ``deleaker.runtime.cli``. Bad options: one ``error:`` line, exit 1, nothing
written.
"""

from __future__ import annotations

from pathlib import Path

import click

from deleaker.export.limits import PRECISIONS
from deleaker.runtime.defaults import BACKENDS

from .errors import CHECKED_INT, reported_errors
from .knobs import knob_option
from .options import lora_option, runtime_spec


@click.command("triton-repo")
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help="Engine folder (deleaker-trt build): its TensorRT engines become tensorrt_plan models, and the "
              "generation model runs from it.")
@click.option("--model", default=None, help="'tiny' or a local diffusers FLUX folder the generation model runs.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Transformer backend of the generation model (as `run --backend`).")
@click.option("--text-len", type=CHECKED_INT, default=None, help="T5 tokens T (--model only, as `run`).")
@click.option("--max-entities", type=CHECKED_INT, default=None, help="E_max (--model only, as `run`).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Export cache of the generation model (as `run --cache-dir`).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Engines of this precision for the generation model (--engines only, as `run`).")
@lora_option("Of the generation model, as `run --lora` (recorded with absolute paths).")
@knob_option("Override a DeLeaker knob of the generation model (--model only), as `run --set`.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The model repository to write: a new folder (never written into or over).")
@click.option("--max-batch", type=CHECKED_INT, default=8, show_default=True,
              help="Most requests Triton's dynamic batcher hands the generation model at once, 1 to 64.")
@click.option("--queue-delay-us", type=CHECKED_INT, default=100_000, show_default=True,
              help="How long (microseconds) the dynamic batcher waits to fill a batch.")
@click.option("--python-path", type=click.Path(path_type=Path), multiple=True,
              help="A folder Triton's python stub puts first on sys.path before importing deleaker (it ignores "
              "PYTHONPATH), e.g. a venv's site-packages or a folder with numpy<2; repeatable.")
def triton_repo(engines, model, backend, text_len, max_entities, cache_dir, precision, loras, overrides, out,
                max_batch, queue_delay_us, python_path) -> None:
    """Write a Triton Inference Server model repository (python-backend generation; TensorRT transformer steps)."""
    from ..triton_repo import TritonRepoSpec, write_repository

    with reported_errors("the repository"):
        runtime = runtime_spec(
            engines, model, backend, text_len, max_entities, cache_dir, None, precision, overrides, loras=loras
        )
        spec = TritonRepoSpec(out=out, runtime=runtime, max_batch=max_batch, queue_delay_us=queue_delay_us,
                              python_path=tuple(python_path))
        repository = write_repository(spec)
    for name in repository.models:
        click.echo(f"model: {repository.path / name}")
    command = f"tritonserver --model-repository={repository.path.resolve()}"
    if repository.backend_config is not None:
        command += f" {repository.backend_config}"
        click.echo(f"backend-config: {repository.backend_config}")
    click.echo(f"serve: {command}")
