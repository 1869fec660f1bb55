"""One image with a progress bar: what a render job and a verification both run (`generate_with_progress`), and
the factory of bars the CLI hands them (`ProgressFactory`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .request import GenerationRequest

if TYPE_CHECKING:  # the runtime (torch, diffusers) is imported when a job opens it
    from .results import GenerationResult
    from .runtime import DeLeakerRuntime

#: ``progress_factory(total_steps, description)`` returns ``update(step_done, total)``, and a ``close()``.
ProgressFactory = Callable[[int, str], Any]


def generate_with_progress(
    rt: "DeLeakerRuntime", request: GenerationRequest, progress_factory, description: str, **kwargs
) -> "GenerationResult":
    """``rt.generate(request, **kwargs)`` with a bar of ``progress_factory`` (None: no bar) over its steps; the
    backend's first-use load (an export, an engine) is counted in the result's timings, not in the bar."""
    # Load the backend before the bar starts, so the bar measures steps, not a first-use export.
    load_seconds = rt.prepare(request)
    bar = progress_factory(request.steps, description) if progress_factory is not None else None
    try:
        result = rt.generate(request, progress=None if bar is None else bar.update, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    result.timings["backend_load"] += load_seconds
    result.timings["total"] += load_seconds
    return result
