"""What the CLI runs, as library functions: open a runtime from a spec, render a job (one prompt or a JSONL
batch, with resume), verify a backend against PyTorch.

Each function validates everything it can before generating (output paths, prompts, entities, resolution) and
raises a typed `DeLeakerError`; only ``deleaker.runtime.cli`` prints and exits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from deleaker.errors import ConfigError, DeLeakerError

from .images import check_output_dir, check_output_file, is_valid_png, psnr, save_png_atomic, side_by_side
from .defaults import BACKENDS, DEFAULT_MAX_ENTITIES, DEFAULT_MODEL_BACKEND, DEFAULT_TEXT_LEN
from .runtime import DeLeakerRuntime, GenerationRequest

#: ``progress_factory(total_steps, description)`` returns ``update(step_done, total)``, and a ``close()``.
ProgressFactory = Callable[[int, str], Any]


class BatchFileError(DeLeakerError, ValueError):
    """A line of a ``--prompts`` JSONL file is not ``{"prompt": str, "entities": [str, ...], "seed"?: int}``."""


@dataclass(frozen=True)
class RuntimeSpec:
    """Where the model comes from: ``engines`` (a built engine directory) xor ``model`` (``"tiny"`` or a diffusers
    folder), the backend (None: ``onnxruntime`` for a model, the manifest's kind for engines), text length
    ``T`` and ``E_max`` (models only: engines fix them), the export cache and the device."""

    engines: Optional[Path] = None
    model: Optional[str] = None
    backend: Optional[str] = None
    text_len: int = DEFAULT_TEXT_LEN
    max_entities: int = DEFAULT_MAX_ENTITIES
    cache_dir: Optional[Path] = None
    device: Optional[str] = None
    #: DeLeaker knob overrides (``DeLeakerConfig.for_model``); engines have theirs built in.
    deleaker_overrides: tuple[tuple[str, Any], ...] = ()
    #: Engines only: which precision to load when a directory holds several per resolution.
    precision: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.engines is None) == (self.model is None):
            raise ConfigError("give exactly one of an engine directory (--engines) or a model (--model)")
        if self.engines is not None and self.deleaker_overrides:
            raise ConfigError(
                "DeLeaker options are built into engines; rebuild them to change "
                f"{[name for name, _ in self.deleaker_overrides]}"
            )
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; allowed: {BACKENDS}")
        if self.model is not None and self.precision is not None:
            raise ConfigError("--precision selects engines (--engines DIR); a --model runs in its own dtype")
        if self.model is not None and self.backend == "tensorrt":
            raise ConfigError("the tensorrt backend runs built engines: pass --engines DIR (see `deleaker-trt build`)")

    def open(self) -> DeLeakerRuntime:
        """Load the runtime (checks the engine manifest, loads the model); no generation yet."""
        if self.engines is not None:
            return DeLeakerRuntime.from_engines(
                self.engines,
                backend=self.backend,
                device=self.device,
                precision=self.precision,
                cache_dir=self.cache_dir,
            )
        return DeLeakerRuntime.from_model(
            self.model,
            backend=self.backend or DEFAULT_MODEL_BACKEND,
            text_len=self.text_len,
            max_entities=self.max_entities,
            cache_dir=self.cache_dir,
            device=self.device,
            deleaker_config=dict(self.deleaker_overrides) or None,
        )


@dataclass(frozen=True)
class JobItem:
    """One image of a job: the request, where it goes, and (``--compare``) where the side-by-side goes."""

    request: GenerationRequest
    out: Path
    compare_out: Optional[Path] = None
    label: str = ""


@dataclass(frozen=True)
class RenderJob:
    """A list of images to render with one runtime. ``resume``: skip items whose outputs are already valid PNGs."""

    runtime: RuntimeSpec
    items: tuple[JobItem, ...]
    resume: bool = False


@dataclass
class ItemReport:
    out: str
    compare_out: Optional[str]
    prompt: str
    entities: list[str]
    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class JobReport:
    """What a job did: backend, model load time and one `ItemReport` per item (skipped ones marked)."""

    backend: str
    load_seconds: float
    items: list[ItemReport]

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "load_seconds": self.load_seconds,
            "generated": sum(not i.skipped for i in self.items),
            "skipped": sum(i.skipped for i in self.items),
            "images": [vars(i) for i in self.items],
        }


def compare_path(out: Path) -> Path:
    """Where ``--compare`` writes the side-by-side of ``out``: ``<stem>_compare.png`` beside it."""
    return out.with_name(f"{out.stem}_compare.png")


def single_job(
    runtime: RuntimeSpec, request: GenerationRequest, out: str | Path, *, compare: bool = False
) -> RenderJob:
    """A job of one image written to ``out`` (and its comparison beside it with ``compare``)."""
    out = Path(out)
    return RenderJob(runtime, (JobItem(request, out, compare_path(out) if compare else None),))


def read_prompts(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every non-blank line of a JSONL prompts file (format of slim_examples.jsonl).

    Each record has ``prompt`` (str), ``entities`` (list of str) and optionally ``seed`` (int); other keys are
    ignored. Raises `BatchFileError` naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise BatchFileError(f"prompts file {path} does not exist")
    records: list[tuple[int, dict[str, Any]]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BatchFileError(f"{path} line {number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise BatchFileError(f"{path} line {number}: expected an object, got {type(record).__name__}")
            if not isinstance(record.get("prompt"), str):
                raise BatchFileError(f"{path} line {number}: 'prompt' must be a string")
            entities = record.get("entities")
            if not isinstance(entities, list) or not all(isinstance(e, str) for e in entities):
                raise BatchFileError(f"{path} line {number}: 'entities' must be a list of strings")
            seed = record.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
                raise BatchFileError(f"{path} line {number}: 'seed' must be a non-negative int, got {seed!r}")
            records.append((number, record))
    if not records:
        raise BatchFileError(f"prompts file {path} has no prompts")
    return records


def batch_job(
    runtime: RuntimeSpec,
    prompts_file: str | Path,
    out_dir: str | Path,
    *,
    defaults: GenerationRequest,
    compare: bool = False,
) -> RenderJob:
    """A resumable job: line ``i`` (0-based among non-blank lines) of ``prompts_file`` goes to
    ``out_dir/{i:04d}.png``; a line without ``seed`` takes ``defaults.seed``; other settings come from ``defaults``.
    """
    out_dir = Path(out_dir)
    items = []
    for index, (number, record) in enumerate(read_prompts(prompts_file)):
        request = GenerationRequest(
            prompt=record["prompt"],
            entities=tuple(record["entities"]),
            seed=record.get("seed", defaults.seed),
            steps=defaults.steps,
            guidance=defaults.guidance,
            height=defaults.height,
            width=defaults.width,
        )
        out = out_dir / f"{index:04d}.png"
        items.append(
            JobItem(request, out, compare_path(out) if compare else None, label=f"{prompts_file} line {number}")
        )
    return RenderJob(runtime, tuple(items), resume=True)


def _outputs_done(item: JobItem) -> bool:
    return is_valid_png(item.out) and (item.compare_out is None or is_valid_png(item.compare_out))


def run_job(
    job: RenderJob,
    *,
    progress_factory: Optional[ProgressFactory] = None,
    runtime: Optional[DeLeakerRuntime] = None,
) -> JobReport:
    """Render ``job``. Order: output paths checked, runtime opened (or ``runtime`` reused), every request
    validated (prompt length, entities, resolution), then images generated and written atomically.
    """
    for item in job.items:
        if job.resume:
            check_output_dir(item.out.parent, create=True)
        else:
            check_output_file(item.out)
            if item.compare_out is not None:
                check_output_file(item.compare_out)
    rt = runtime if runtime is not None else job.runtime.open()
    resolved = []
    for item in job.items:
        try:
            resolved.append(rt.resolve(item.request))
        except DeLeakerError as exc:
            if not item.label:
                raise
            raise type(exc)(f"{item.label}: {exc}") from None

    reports = []
    for item, request in zip(job.items, resolved):
        report = ItemReport(
            out=str(item.out),
            compare_out=None if item.compare_out is None else str(item.compare_out),
            prompt=request.prompt,
            entities=list(request.entities),
            seed=request.seed,
            steps=request.steps,
            guidance=float(request.guidance),
            height=int(request.height),
            width=int(request.width),
        )
        if job.resume and _outputs_done(item):
            report.skipped = True
            reports.append(report)
            continue
        result = _generate(rt, request, progress_factory, "DeLeaker")
        report.timings = dict(result.timings)
        if item.compare_out is not None:
            plain = _generate(rt, replace(request, deleaker=False), progress_factory, "FLUX")
            report.timings["plain_total"] = plain.timings["total"]
            canvas = side_by_side(plain.image, result.image, request.prompt, ("FLUX", "DeLeaker"))
            save_png_atomic(canvas, item.compare_out)
        save_png_atomic(result.image, item.out)
        reports.append(report)
    return JobReport(backend=rt.backend_name, load_seconds=rt.load_seconds, items=reports)


def _generate(rt: DeLeakerRuntime, request: GenerationRequest, progress_factory, description: str, **kwargs):
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


# --- verify --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyJob:
    """Compare ``candidate`` with PyTorch on ``request``: per-step latent relative error and image PSNR."""

    candidate: RuntimeSpec
    request: GenerationRequest
    max_rel_err: float = 1e-2
    min_psnr: float = 30.0

    def __post_init__(self) -> None:
        if not self.max_rel_err > 0 or not self.min_psnr > 0:
            raise ConfigError("tolerances must be positive (--max-rel-err, --min-psnr)")


@dataclass
class VerifyReport:
    """Per-step ``||x - x_ref|| / ||x_ref||`` of the latents, PSNR (dB) of the final images, and the verdict."""

    backend: str
    step_rel_err: list[float]
    psnr_db: float
    max_rel_err: float
    min_psnr: float

    @property
    def passed(self) -> bool:
        return max(self.step_rel_err) <= self.max_rel_err and self.psnr_db >= self.min_psnr

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "step_rel_err": self.step_rel_err,
            "max_step_rel_err": max(self.step_rel_err),
            "psnr_db": None if math.isinf(self.psnr_db) else self.psnr_db,
            "identical_images": math.isinf(self.psnr_db),
            "tolerance": {"max_rel_err": self.max_rel_err, "min_psnr": self.min_psnr},
            "passed": self.passed,
        }


def reference_spec(candidate: DeLeakerRuntime, spec: RuntimeSpec) -> RuntimeSpec:
    """The PyTorch runtime to compare ``candidate`` with: the same model, ``T``, ``E_max`` and knobs, on
    ``spec.device`` (default: CUDA in bf16 when available, else the CPU in fp32)."""
    model = spec.model if spec.model is not None else getattr(candidate, "model_source", None)
    if model is None:
        raise ConfigError(f"the engine directory {spec.engines} does not name the model it was built from")
    return RuntimeSpec(
        model=str(model),
        backend="torch",
        text_len=candidate.text_len,
        max_entities=candidate.max_entities,
        device=spec.device,
        deleaker_overrides=tuple(sorted(candidate.deleaker_config.items())),
    )


def verify(
    job: VerifyJob,
    *,
    progress_factory: Optional[ProgressFactory] = None,
    candidate: Optional[DeLeakerRuntime] = None,
    reference: Optional[DeLeakerRuntime] = None,
) -> VerifyReport:
    """Run ``job.request`` on the candidate backend and on PyTorch from the same seed; compare every step's
    latents (relative L2 error) and the final images (PSNR)."""
    cand = candidate if candidate is not None else job.candidate.open()
    request = cand.resolve(job.request)
    ref = reference if reference is not None else reference_spec(cand, job.candidate).open()
    ref.resolve(request)
    got = _generate(cand, request, progress_factory, cand.backend_name, record_latents=True)
    want = _generate(ref, request, progress_factory, "torch", record_latents=True)
    errors = [
        float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()).clamp_min(1e-30))
        for a, b in zip(got.latents, want.latents)
    ]
    return VerifyReport(cand.backend_name, errors, psnr(got.image, want.image), job.max_rel_err, job.min_psnr)
