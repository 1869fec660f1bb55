"""``deleaker-trt demo``: open a runtime from `run`'s source options, warm it up and serve the Gradio page
(`deleaker.runtime.demo`) until Ctrl-C.

Mounted on the ``deleaker-trt`` group by ``deleaker.runtime.cli``. Bad options: one ``error:`` line, exit 1, before
the model loads.
"""

from __future__ import annotations

import click

from .errors import CHECKED_INT, DeLeakerCliError, reported_errors
from .options import runtime_spec, source_options


@click.command("demo")
@source_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the page listens on (0.0.0.0 exposes it to the network).")
@click.option("--port", type=CHECKED_INT, default=7860, show_default=True, help="Port, 0 for any free one.")
def demo(
    engines, model, backend, text_len, max_entities, cache_dir, device, precision, loras, overrides, host, port
) -> None:
    """A Gradio page: plain FLUX and DeLeaker side by side, with the entity masks DeLeaker used (needs gradio:
    pip install "deleaker-trt[demo]")."""
    from ..demo import build_demo, check_bind, warm_up

    with reported_errors("the demo"):
        check_bind(host, port)
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise DeLeakerCliError('the demo needs gradio: pip install "deleaker-trt[demo]"') from None
        spec = runtime_spec(
            engines, model, backend, text_len, max_entities, cache_dir, device, precision, overrides, loras=loras
        )
        runtime = spec.open()
        warm_up(runtime)
        page = build_demo(runtime)
    click.echo(f"demo: {runtime.model_source} on {runtime.backend_name}; Ctrl-C stops it", err=True)
    page.launch(server_name=host, server_port=port or None, inbrowser=False, show_error=True)
