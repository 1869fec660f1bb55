"""`GenerationRequest`: one image to generate, validated without any model (a light module: no torch).

Everything that can be refused from the request alone is refused here, when it is made, so that the CLI answers
bad input before it imports torch or loads a model. What needs the model (T5 token count, entity tokens, the
resolution's multiple, ``E_max``) is checked by `DeLeakerRuntime.resolve` before any generation.

Ranges (and why):

- ``prompt``: a non-empty str of at most `MAX_PROMPT_CHARS` characters, valid Unicode (no lone surrogates).
  T5 takes at most 512 tokens; no prompt that fits comes near this many characters, and a longer one is
  refused before the tokenizer spends seconds and gigabytes on it.
- ``entities``: a list or tuple (not a str, not a set) of 2 or more strings, each occurring in the prompt as whole
  words (case-insensitive), no duplicates.
- ``seed``: an int in ``[0, 2**63)`` (``torch.Generator.manual_seed`` takes an int64). Numbers may be numpy
  scalars; the request holds them as Python ints and floats.
- ``steps``: an int in ``[1, MAX_STEPS]``, or None (the default): the model's step count (`DeLeakerRuntime.resolve`
  fills it in: 4 for a model without a guidance embedding, FLUX.1-schnell; 20 otherwise).
- ``guidance``: a finite number in ``[0, MAX_GUIDANCE]``, or None (the default): 3.5 for a model with a guidance
  embedding. A model without one (FLUX.1-schnell) uses no guidance: its resolved request holds None, whatever was
  given, as diffusers ignores it. A 0-d numpy array or torch tensor of a real (not bool) dtype counts as its value,
  as ``FluxPipeline`` takes it. FLUX.1-dev's guidance embedding was distilled for
  about 1 to 10; the transformer multiplies it by 1000 and embeds it with sinusoids in float32/bf16, so far larger
  values (``1e308``, ``inf``) overflow to inf/NaN and give black images.
- ``height``/``width``: None (the runtime's default size) or an int in ``[1, MAX_SIDE]``; the runtime then checks
  the model's multiple (``2 x`` the VAE scale factor).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

from deleaker.config import shown
from deleaker.entities import check_entity_words, unicode_problem
from deleaker.errors import ConfigError, DeLeakerError, EntityError

from deleaker.export.limits import check_side

if TYPE_CHECKING:  # this module is imported where torch is not (the CLI's fast paths)
    import torch

#: Longest prompt in characters (far above what 512 T5 tokens spell; see the module docstring).
MAX_PROMPT_CHARS = 20_000
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
#: Seeds are int64 for torch.Generator.
SEED_LIMIT = 2**63


class PromptError(DeLeakerError, ValueError):
    """The prompt is not a usable string, or does not fit the model (too many T5 tokens for ``T``)."""


class EntitiesTypeError(EntityError, TypeError):
    """``entities`` is not a list/tuple of strings (a str would be split into characters)."""


def _check_text(what: str, value: str) -> None:
    problem = unicode_problem(value)
    if problem is not None:
        raise PromptError(f"{what} {problem}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _zero_dim_real(value: Any) -> Any:
    """A 0-d numpy array or torch tensor of a real, non-bool dtype as its Python number (what ``FluxPipeline``
    computes with); anything else as it is, for the checks to judge. Looked up in ``sys.modules``: an array of a
    library not imported cannot be passed, and this module stays free of torch."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        return value.item() if value.ndim == 0 and value.dtype.kind in "iuf" else value
    torch_module = sys.modules.get("torch")
    if torch_module is not None and isinstance(value, torch_module.Tensor):
        real = not value.dtype.is_complex and value.dtype != torch_module.bool
        return value.item() if value.dim() == 0 and real else value
    return value


def _checked_settings(seed: Any, steps: Any, guidance: Any, height: Any, width: Any) -> dict[str, Any]:
    """The settings as Python ints and float (numpy scalars are accepted; steps and guidance may be None, the
    model's default), or a typed error naming the first bad one with its allowed range."""
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"seed must be an int in [0, 2**63), got {shown(seed)}")
    if steps is not None and (not _is_int(steps) or not 1 <= steps <= MAX_STEPS):
        raise ConfigError(f"steps must be an int in [1, {MAX_STEPS}], got {shown(steps)}")
    guidance = _zero_dim_real(guidance)
    if guidance is not None and (
        isinstance(guidance, bool)
        or not isinstance(guidance, numbers.Real)
        or not 0 <= guidance <= MAX_GUIDANCE  # before isfinite: that overflows on an int beyond float's range
        or not math.isfinite(guidance)
    ):
        raise ConfigError(
            f"guidance must be a finite number in [0, {MAX_GUIDANCE:g}] (FLUX.1-dev is distilled for about "
            f"1 to 10), got {shown(guidance)}"
        )
    for side, value in (("height", height), ("width", width)):
        if value is not None:
            check_side(side, value)
    return {
        "seed": int(seed),
        "steps": None if steps is None else int(steps),
        "guidance": None if guidance is None else float(guidance),
        "height": None if height is None else int(height),
        "width": None if width is None else int(width),
    }


def _set_fields(instance: Any, values: dict[str, Any]) -> None:
    for name, value in values.items():
        object.__setattr__(instance, name, value)


@dataclass(frozen=True)
class ImageSettings:
    """Everything of a request but its text: seed, steps, guidance and size, validated as in `GenerationRequest`
    (the CLI's options, shared by every line of a batch)."""

    seed: int = 0
    steps: Optional[int] = None
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None

    def __post_init__(self) -> None:
        _set_fields(self, _checked_settings(self.seed, self.steps, self.guidance, self.height, self.width))

    def square(self) -> "ImageSettings":
        """These settings with a missing side equal to the given one (the CLI's ``--height``/``--width``)."""
        if (self.height is None) == (self.width is None):
            return self
        side = self.height if self.height is not None else self.width
        return replace(self, height=side, width=side)

    def request(self, prompt: str, entities: Sequence[str], *, seed: Optional[int] = None) -> "GenerationRequest":
        """A request for ``prompt``/``entities`` with these settings (``seed`` replaces this seed when given)."""
        return GenerationRequest(
            prompt, entities, self.seed if seed is None else seed, self.steps, self.guidance, self.height, self.width
        )


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate; refused here when invalid (see the module docstring for every range).

    Attributes:
        prompt: the text; entities: 2 to ``E_max`` strings of the prompt (its T5 tokens are the entity's).
        seed: the starting noise is ``torch.randn`` from ``torch.Generator("cpu").manual_seed(seed)``, as
            ``FluxPipeline`` with that generator. height/width: pixels, None for the runtime's default size.
        deleaker: False renders plain FLUX (all-zero entity mask) from the same seed, for comparisons.
    """

    prompt: str
    entities: tuple[str, ...]
    seed: int = 0
    steps: Optional[int] = None
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    deleaker: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise PromptError(f"the prompt must be a non-empty string, got {self.prompt!r:.80}")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise PromptError(
                f"the prompt has {len(self.prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed "
                "(T5 reads at most 512 tokens)"
            )
        _check_text("the prompt", self.prompt)
        if isinstance(self.entities, (str, bytes)) or not isinstance(self.entities, Sequence):
            hint = " (a string would be split into letters)" if isinstance(self.entities, str) else ""
            raise EntitiesTypeError(
                f"entities must be a list or tuple of strings, got {type(self.entities).__name__} "
                f"{self.entities!r:.80}{hint}"
            )
        object.__setattr__(self, "entities", tuple(self.entities))
        for entity in self.entities:
            if isinstance(entity, str):
                _check_text(f"entity {entity!r}", entity)
        check_entity_words(self.prompt, self.entities)
        _set_fields(self, _checked_settings(self.seed, self.steps, self.guidance, self.height, self.width))
        if not isinstance(self.deleaker, bool):
            raise ConfigError(f"deleaker must be a bool, got {shown(self.deleaker)}")

    def size_or(self, default_size: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)``: this request's, each None taken from ``default_size`` (a runtime's default)."""
        return (
            default_size[0] if self.height is None else self.height,
            default_size[1] if self.width is None else self.width,
        )


@dataclass(frozen=True)
class ResolvedRequest(GenerationRequest):
    """A `GenerationRequest` checked against one runtime's model (`DeLeakerRuntime.resolve`), with what the checks
    computed kept for the generation: the size, steps and guidance filled in (the model's defaults; guidance None for
    a model without a guidance embedding, which uses none), the prompt's T5 token count and the entities' token mask.

    Resolved once, carried through the job, the runtime's ``prepare``/``generate`` and the backend's inputs:
    ``resolve`` returns a request resolved by the same runtime for the same text and size as it is, so the
    tokenizer and the entity lookup run once per request, however many times it is checked. ``dataclasses.replace``
    keeps the mask; one that changes the prompt, entities or size makes a request that is resolved again.

    ``entity_mask``: ``(E_max, T)`` bool, each entity's T5 tokens (a plain-FLUX run, ``deleaker=False``, passes
    zeros instead). ``resolved_for``: which runtime resolved which prompt, entities and size (an identity, not
    compared).
    """

    t5_tokens: int = 0
    entity_mask: Optional["torch.Tensor"] = field(default=None, compare=False, repr=False)
    resolved_for: tuple = field(default=(), compare=False, repr=False)

    def is_resolved_by(self, runtime_id: str) -> bool:
        """True when the runtime named ``runtime_id`` resolved this prompt, these entities and this size."""
        return self.resolved_for == (runtime_id, self.prompt, self.entities, self.height, self.width)

    @classmethod
    def of(
        cls,
        request: GenerationRequest,
        runtime_id: str,
        *,
        height: int,
        width: int,
        t5_tokens: int,
        entity_mask: "torch.Tensor",
        **settings: Any,
    ) -> "ResolvedRequest":
        """``request`` resolved by the runtime named ``runtime_id`` at ``height x width``, with what its checks
        computed; ``settings`` (steps, guidance) replace the request's."""
        fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(GenerationRequest)}
        fields.update(height=height, width=width, **settings)
        return cls(
            **fields,
            t5_tokens=t5_tokens,
            entity_mask=entity_mask,
            resolved_for=(runtime_id, request.prompt, request.entities, height, width),
        )


def require_request(request: object) -> GenerationRequest:
    """``request`` when it is a `GenerationRequest`; else a `ConfigError` (a runtime's ``resolve`` was given
    something else)."""
    if not isinstance(request, GenerationRequest):
        raise ConfigError(
            f"expected a GenerationRequest, got {type(request).__name__} (or call the runtime: rt(prompt, entities))"
        )
    return request


def require_requests(requests: object) -> Sequence[GenerationRequest]:
    """``requests`` when it is a non-empty list or tuple (a runtime's ``generate_batch``; each is checked as it is
    resolved); else a `ConfigError`."""
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence) or not requests:
        raise ConfigError(f"requests must be a non-empty list of GenerationRequest, got {requests!r:.80}")
    return requests
