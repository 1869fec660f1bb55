"""``deleaker-trt demo``: a Gradio page (the optional ``[demo]`` extra) showing what DeLeaker does.

Prompt and entities in; plain FLUX and DeLeaker from the same seed side by side, and the entity masks DeLeaker used
drawn over its image, one colour per entity (`deleaker.runtime.images.mask_overlay`). One runtime serves the page:
its lock runs one generation at a time, and Gradio's queue holds the others (bounded, see `MAX_QUEUE`).

Bad input is checked as the CLI checks it (`ImageSettings`, `DeLeakerRuntime.resolve`) before any generation and
shown with the CLI's message (a `gradio.Error`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from deleaker.errors import DeLeakerError

from .defaults import DEFAULT_GUIDANCE

#: Requests waiting for the one runtime; more are refused by Gradio ("queue is full") instead of piling up.
MAX_QUEUE = 16
#: The page's initial values.
EXAMPLE_PROMPT = "A cat and a cheetah are splashing each other with water in a shallow river"
EXAMPLE_ENTITIES = "cat, cheetah"


@dataclass
class DemoResult:
    """What one request of the page gives: plain FLUX, DeLeaker, and DeLeaker with its masks drawn over it."""

    plain: Any
    deleaker: Any
    overlay: Any
    entity_masks: Any


def split_entities(text: str) -> tuple[str, ...]:
    """``"cat, dog"`` -> ``("cat", "dog")``; as the CLI's ``--entities`` (empty items are kept, and refused)."""
    return tuple(item.strip() for item in str(text).split(","))


def generate(runtime: Any, prompt: str, entities: str, seed: Any, steps: Any, guidance: Any) -> DemoResult:
    """Both images and the overlay for one request of the page (the runtime's default size). Raises `DeLeakerError`
    (the CLI's message) for bad input before any generation. A model without a guidance embedding (FLUX.1-schnell)
    uses no guidance: the page hides the field, and a value sent to the API is not used (as the library)."""
    from .images import mask_overlay
    from .request import ImageSettings

    if not runtime.uses_guidance:
        guidance = None
    settings = ImageSettings(seed=_number(seed), steps=_number(steps), guidance=_number(guidance, float))
    request = runtime.resolve(settings.request(prompt, split_entities(entities)))
    result = runtime.generate(request)
    plain = runtime.generate(replace(request, deleaker=False))
    overlay = mask_overlay(result.image, result.entity_masks, request.entities)
    return DemoResult(plain.image, result.image, overlay, result.entity_masks)


def _number(value: Any, kind: type = int) -> Any:
    """Gradio's Number gives floats: an integral float becomes an int (``3.0`` -> 3); anything else is passed on
    to the request's own checks, which name it."""
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def build_demo(runtime: Any) -> Any:
    """The Gradio Blocks page around ``runtime`` (a loaded `DeLeakerRuntime`); its API endpoint is ``/generate``
    (prompt, entities, seed, steps, guidance -> plain, DeLeaker, overlay images)."""
    import gradio as gr

    def on_generate(prompt, entities, seed, steps, guidance):
        try:
            result = generate(runtime, prompt, entities, seed, steps, guidance)
        except DeLeakerError as exc:
            raise gr.Error(str(exc)) from None
        return result.plain, result.deleaker, result.overlay

    with gr.Blocks(title="DeLeaker for FLUX.1", analytics_enabled=False) as demo:
        gr.Markdown(
            "# DeLeaker for FLUX.1\n"
            f"Model: `{runtime.model_source}`, backend `{runtime.backend_name}`. Entities are words of the prompt, "
            "separated by commas; plain FLUX and DeLeaker start from the same noise."
        )
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value=EXAMPLE_PROMPT, scale=3)
            entities = gr.Textbox(label="Entities (comma-separated)", value=EXAMPLE_ENTITIES, scale=1)
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0)
            # The model's step count (4 for schnell), and 4 for the tiny test model whatever its kind (seconds).
            steps = gr.Number(label="Steps", value=4 if runtime.model_source == "tiny" else runtime.default_steps,
                              precision=0)
            # Hidden for a model without a guidance embedding (schnell): it has no guidance to set.
            guidance = gr.Number(label="Guidance", value=DEFAULT_GUIDANCE, visible=runtime.uses_guidance)
        button = gr.Button("Generate", variant="primary")
        with gr.Row():
            plain = gr.Image(label="FLUX", type="pil", format="png")
            deleaker = gr.Image(label="DeLeaker", type="pil", format="png")
            overlay = gr.Image(label="Entity masks DeLeaker used", type="pil", format="png")
        button.click(on_generate, [prompt, entities, seed, steps, guidance], [plain, deleaker, overlay],
                     api_name="generate", concurrency_limit=1)
    demo.queue(max_size=MAX_QUEUE, default_concurrency_limit=1)
    return demo


def warm_up(runtime: Any) -> float:
    """Load the backend of the runtime's default size now (an export or engine load), so that the page's first
    request does not wait for it; returns the seconds it took (0 when a model of very few T5 tokens cannot take
    the warm-up's prompt: the first request then loads it)."""
    from .request import ImageSettings

    try:
        return runtime.prepare(ImageSettings().request("a cat and a dog", ("cat", "dog")))
    except DeLeakerError:
        return 0.0


def check_bind(host: Any, port: Any) -> None:
    """Raise `DeLeakerError` for a host or port the page cannot bind (before the model loads)."""
    from deleaker.errors import ConfigError

    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise ConfigError(f"--host must be an address such as 127.0.0.1, got {host!r:.40}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be an int in [0, 65535] (0: any free port), got {port!r:.40}")
