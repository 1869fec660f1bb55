"""The Triton python-backend model of a ``deleaker-trt triton-repo`` repository: FLUX.1 + DeLeaker generation
through `DeLeakerRuntime`.

Inputs (per request; Triton adds the batch axis): ``PROMPT`` (one string), ``ENTITIES`` (one string per entity),
optional ``SEED`` (int64), ``STEPS`` (int32), ``GUIDANCE`` (fp32), ``HEIGHT``, ``WIDTH`` (int32); what is left out
takes the CLI's defaults (seed 0, its steps and guidance, the runtime's size; one side given sets both, as
``run --height``). Outputs: ``IMAGE`` ``(H, W, 3)`` uint8 and ``PNG`` (the same pixels as a PNG with the
``deleaker-trt`` provenance record of `run`'s images).

Triton's dynamic batcher hands `TritonPythonModel.execute` several requests at once; each is checked as the CLI
checks its options (same messages) before any generation, and a bad one gets its own error response (HTTP 400)
while the others are served: those of one resolution and step count in one denoising loop
(`DeLeakerRuntime.generate_batch`; each image equals the request's alone within one grey level).

The runtime is opened and warmed up (the export or engine load of the default resolution) in
``initialize``, so the model reports ready only when a request no longer waits for it.

Imported only inside Triton's python backend stub (``triton_python_backend_utils`` exists only there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from deleaker.errors import DeLeakerError
from deleaker.jsonio import loads_strict

#: The optional inputs and the `ImageSettings` field each sets.
OPTIONAL_INPUTS = {"SEED": "seed", "STEPS": "steps", "GUIDANCE": "guidance", "HEIGHT": "height", "WIDTH": "width"}


class RequestError(DeLeakerError, ValueError):
    """A request's tensors are not what the model config says (a missing or empty input, undecodable text)."""


def _text(value: Any, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    return str(value)


def request_from_arrays(arrays: dict[str, Optional[np.ndarray]], settings_type: Any) -> Any:
    """A `GenerationRequest` from one request's input arrays (each with Triton's leading batch axis of 1), checked
    as the CLI checks its options. Raises a `DeLeakerError` with the CLI's message."""
    from .request import ImageSettings

    prompt_array, entities_array = arrays.get("PROMPT"), arrays.get("ENTITIES")
    if prompt_array is None or prompt_array.size != 1:
        raise RequestError("PROMPT must hold one string")
    if entities_array is None or entities_array.size == 0:
        raise RequestError("ENTITIES must hold one string per entity (at least 2)")
    prompt = _text(prompt_array.reshape(-1)[0], "PROMPT")
    entities = tuple(_text(e, "ENTITIES") for e in entities_array.reshape(-1))
    values: dict[str, Any] = {}
    for name, field_name in OPTIONAL_INPUTS.items():
        array = arrays.get(name)
        if array is None:
            continue
        if array.size != 1:
            raise RequestError(f"{name} must hold one value, got {array.size}")
        values[field_name] = array.reshape(-1)[0].item()
    settings = (settings_type or ImageSettings)(**values)
    return settings.square().request(prompt, entities)


class TritonPythonModel:
    """Triton's python-backend interface: ``initialize``, ``execute`` (a batch of requests), ``finalize``."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from .spec import RuntimeSpec
        from .request import ImageSettings

        self._pb = pb_utils
        folder = Path(args["model_repository"]) / str(args["model_version"])
        record = loads_strict((folder / "runtime.json").read_text())  # a key given twice is refused, not guessed
        warmup = record.pop("warmup_size")
        record.pop("python_path", None)  # used by model.py before this module was imported
        overrides = tuple(tuple(pair) for pair in record.pop("deleaker_overrides"))
        record["loras"] = tuple(tuple(pair) for pair in record.get("loras", ()))  # [path, scale] each
        spec = RuntimeSpec(**{**record, "deleaker_overrides": overrides,
                              "engines": None if record["engines"] is None else Path(record["engines"]),
                              "cache_dir": None if record["cache_dir"] is None else Path(record["cache_dir"])})
        self._runtime = spec.open()
        self._settings = ImageSettings
        # Warm-up: the first use of a resolution exports the model or loads an engine; do it before "ready".
        height, width = warmup if warmup else self._runtime.default_size
        self._runtime.prepare(ImageSettings(height=height, width=width).request(*_warmup_prompt(self._runtime)))

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self._pb
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[int, int, int], list[tuple[int, Any]]] = {}
        for index, request in enumerate(requests):
            try:
                arrays = {name: _input(pb, request, name) for name in ("PROMPT", "ENTITIES", *OPTIONAL_INPUTS)}
                generation = self._runtime.resolve(request_from_arrays(arrays, self._settings))
            except DeLeakerError as exc:  # bad input: the CLI's message, before any generation
                responses[index] = _error(pb, str(exc), invalid=True)
                continue
            # One denoising loop takes requests of one resolution and step count (`generate_batch`).
            groups.setdefault((generation.height, generation.width, generation.steps), []).append((index, generation))
        for members in groups.values():
            for index, response in self._generate(members):
                responses[index] = response
        return responses

    def _generate(self, members: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """Responses for requests that share one denoising loop; when the batch fails, each request is run alone,
        so that the error is the failing request's and the others are served."""
        from .images import png_bytes
        from .jobs import output_record

        pb = self._pb
        try:
            results = self._runtime.generate_batch([generation for _, generation in members])
        except Exception as exc:  # the model lives on: the request fails with the error's type
            if len(members) > 1:
                return [response for member in members for response in self._generate([member])]
            return [(members[0][0], _error(pb, f"{type(exc).__name__}: {exc}", invalid=False))]
        responses = []
        for (index, _), result in zip(members, results):
            pixels = np.asarray(result.image.convert("RGB"), dtype=np.uint8)
            png = png_bytes(result.image, output_record(self._runtime, result.request))
            responses.append((index, pb.InferenceResponse(output_tensors=[
                pb.Tensor("IMAGE", pixels[None]),
                pb.Tensor("PNG", np.array([[png]], dtype=np.object_)),
            ])))
        return responses

    def finalize(self) -> None:
        self._runtime = None


def _error(pb: Any, message: str, *, invalid: bool) -> Any:
    """An error response: INVALID_ARG (HTTP 400) for bad input, INTERNAL (500) otherwise."""
    code = getattr(pb.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    error = pb.TritonError(message) if code is None else pb.TritonError(message, code)
    return pb.InferenceResponse(output_tensors=[], error=error)


def _input(pb: Any, request: Any, name: str) -> Optional[np.ndarray]:
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _warmup_prompt(runtime: Any) -> tuple[str, tuple[str, str]]:
    """A request that every model takes (a few T5 tokens, two entities) for the warm-up's `prepare`."""
    return "a cat and a dog", ("cat", "dog")
