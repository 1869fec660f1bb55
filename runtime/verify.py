"""``deleaker-trt verify`` as a library call: a backend against PyTorch on one request (`VerifyJob` -> `verify` ->
`VerifyReport`: per-step latent relative error, image PSNR, the verdict)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from deleaker.config import shown
from deleaker.errors import ConfigError
from deleaker.lora import describe_records

from .images import psnr
from .progress import ProgressFactory, generate_with_progress
from .request import GenerationRequest
from .spec import RuntimeSpec

if TYPE_CHECKING:  # the runtime (torch, diffusers) is imported when a job opens it
    from .runtime import DeLeakerRuntime

@dataclass(frozen=True)
class VerifyJob:
    """Compare ``candidate`` with PyTorch on ``request``: per-step latent relative error and image PSNR."""

    candidate: RuntimeSpec
    request: GenerationRequest
    max_rel_err: float = 1e-2
    min_psnr: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_rel_err", "min_psnr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a finite number > 0 (--max-rel-err, --min-psnr), got {shown(value)}")


@dataclass
class VerifyReport:
    """Per-step ``||x - x_ref|| / ||x_ref||`` of the latents, PSNR (dB) of the final images, and the verdict.

    ``uniform_images``: both images are one flat colour (e.g. all black): equal, but with nothing in them to
    compare, so a FAIL even though their PSNR is infinite.
    """

    backend: str
    step_rel_err: list[float]
    psnr_db: float
    max_rel_err: float
    min_psnr: float
    uniform_images: bool = False
    #: Why a run gave no image (NaN or inf in its latents or decoded image), e.g. "the candidate (torch) ...";
    #: its steps from the first non-finite one are NaN in ``step_rel_err``, and ``psnr_db`` is NaN.
    non_finite_result: Optional[str] = None

    @property
    def max_step_rel_err(self) -> Optional[float]:
        """The largest per-step error, None when there is none or any is not finite (NaN compares false)."""
        if not self.step_rel_err or not all(math.isfinite(e) for e in self.step_rel_err):
            return None
        return max(self.step_rel_err)

    @property
    def failures(self) -> list[str]:
        """Why the candidate fails (empty: it passes). Non-finite numbers and flat images always fail."""
        reasons = [self.non_finite_result] if self.non_finite_result else []
        bad = [i + 1 for i, e in enumerate(self.step_rel_err) if not math.isfinite(e)]
        if not self.step_rel_err:
            reasons.append("no step was compared")
        if bad:
            reasons.append(f"the latent error is not finite at step(s) {bad}")
        elif self.step_rel_err and self.max_step_rel_err > self.max_rel_err:
            reasons.append(f"max rel. error {self.max_step_rel_err:.2e} > {self.max_rel_err}")
        if math.isnan(self.psnr_db) and not self.non_finite_result:
            reasons.append("the image PSNR is NaN")
        elif self.psnr_db < self.min_psnr:
            reasons.append(f"PSNR {self.psnr_db:.2f} dB < {self.min_psnr} dB")
        if self.uniform_images:
            reasons.append("both images are one flat colour (e.g. all black): nothing was compared")
        return reasons

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """JSON-able and strict (no NaN/Infinity): a non-finite number is null, with a field that says why."""
        return {
            "backend": self.backend,
            "step_rel_err": [e if math.isfinite(e) else None for e in self.step_rel_err],
            "non_finite_steps": [i + 1 for i, e in enumerate(self.step_rel_err) if not math.isfinite(e)],
            "max_step_rel_err": self.max_step_rel_err,
            "psnr_db": self.psnr_db if math.isfinite(self.psnr_db) else None,
            "identical_images": self.psnr_db == math.inf,
            "uniform_images": self.uniform_images,
            "tolerance": {"max_rel_err": self.max_rel_err, "min_psnr": self.min_psnr},
            "non_finite_result": self.non_finite_result,
            "passed": self.passed,
            "failures": self.failures,
        }


def reference_spec(candidate: "DeLeakerRuntime", spec: RuntimeSpec) -> RuntimeSpec:
    """The PyTorch runtime to compare ``candidate`` with: the same model, ``T``, ``E_max`` and knobs, on
    ``spec.device`` (default: CUDA in bf16 when available, else the CPU in fp32)."""
    model = spec.model if spec.model is not None else getattr(candidate, "model_source", None)
    if model is None:
        raise ConfigError(f"the engine directory {spec.engines} does not name the model it was built from")
    built_with = getattr(candidate, "lora_records", None) or []
    if built_with and not spec.loras:
        raise ConfigError(
            f"the engines in {spec.engines} were built with LoRA adapters ({describe_records(built_with)}); the "
            "PyTorch reference needs their files: pass the same --lora PATH:SCALE options"
        )
    return RuntimeSpec(
        model=str(model),
        backend="torch",
        text_len=candidate.text_len,
        max_entities=candidate.max_entities,
        device=spec.device,
        deleaker_overrides=tuple(sorted(candidate.deleaker_config.items())),
        loras=spec.loras,
    )


@dataclass
class _ComparedRun:
    """One side of a verification: its latents per step (up to the failure) and its image (None on failure)."""

    latents: list
    image: Optional[Any]
    failure: Optional[str]


def _generate_compared(rt: "DeLeakerRuntime", request: GenerationRequest, progress_factory, who: str) -> _ComparedRun:
    """`generate_with_progress` recording the latents; a non-finite result is kept as the FAIL it is, saying
    whose."""
    from .runtime import NonFiniteError

    try:
        result = generate_with_progress(rt, request, progress_factory, rt.backend_name, record_latents=True)
    except NonFiniteError as exc:
        return _ComparedRun(list(exc.latents or []), None, f"{who} gave no finite result: {exc}")
    return _ComparedRun(result.latents, result.image, None)


def execution_label(rt: "DeLeakerRuntime") -> str:
    """The backend's name, and how it runs where that differs from the eager reference (``torch compiled``,
    ``torch fp8-row``)."""
    label = f"{rt.backend_name} compiled" if getattr(rt, "compiled", False) else rt.backend_name
    return label if getattr(rt, "fp8", None) is None else f"{label} fp8-{rt.fp8}"


def verify(
    job: VerifyJob,
    *,
    progress_factory: Optional[ProgressFactory] = None,
    candidate: Optional["DeLeakerRuntime"] = None,
    reference: Optional["DeLeakerRuntime"] = None,
) -> VerifyReport:
    """Run ``job.request`` on the candidate backend and on PyTorch from the same seed; compare every step's
    latents (relative L2 error) and the final images (PSNR).

    Without an explicit ``reference``, the reference is PyTorch on the candidate's model, device and knobs: a
    candidate that is itself the torch backend would be compared with the same computation (a PASS that verifies
    nothing), so it is refused with `ConfigError` before anything loads -- unless it runs differently from the
    eager reference: compiled (``--compile``) or with FP8 linears (``--fp8``)."""
    # FLUX.2 runs on eager PyTorch only (`Flux2Runtime`): there is no other execution to compare it with.
    job.candidate.refuse_flux2("verify")
    backend = candidate.backend_name if candidate is not None else job.candidate.backend
    if candidate is not None:
        differs = bool(getattr(candidate, "compiled", False) or getattr(candidate, "fp8", None))
    else:
        differs = bool(job.candidate.compile or job.candidate.fp8)
    if reference is None and backend == "torch" and not differs:
        raise ConfigError(
            "verify compares a backend with PyTorch; --backend torch would compare PyTorch with itself. Choose "
            "--backend onnxruntime, --engines DIR, or --backend torch with --compile or --fp8 (compared with eager "
            "unquantized PyTorch)"
        )
    import numpy as np
    import torch

    cand = candidate if candidate is not None else job.candidate.open()
    request = cand.resolve(job.request)
    ref = reference if reference is not None else reference_spec(cand, job.candidate).open()
    ref_request = ref.resolve(request)  # each runtime resolves the request once, for its own model
    label = execution_label(cand)
    got = _generate_compared(cand, request, progress_factory, f"the candidate ({label})")
    want = _generate_compared(ref, ref_request, progress_factory, "the PyTorch reference")
    errors = [
        float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()).clamp_min(1e-30))
        for a, b in zip(got.latents, want.latents)
    ]
    failure = got.failure or want.failure
    if failure is not None:  # the steps from the first non-finite one have no error to give
        errors += [math.nan] * (request.steps - len(errors))
        return VerifyReport(label, errors, math.nan, job.max_rel_err, job.min_psnr,
                            non_finite_result=failure)
    uniform = all(np.ptp(np.asarray(image.convert("RGB"))) == 0 for image in (got.image, want.image))
    return VerifyReport(
        label, errors, psnr(got.image, want.image), job.max_rel_err, job.min_psnr, uniform_images=uniform
    )
