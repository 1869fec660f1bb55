"""What the CLI runs, as library functions: render a job (one prompt or a JSONL batch, with resume) on the runtime
of a `RuntimeSpec`. The spec (`deleaker.runtime.spec`), the prompts file (`deleaker.runtime.batch_file`) and the
verification against PyTorch (`deleaker.runtime.verify`) are modules of their own, re-exported here for the CLI.

Each function validates everything it can before generating (output paths, prompts, entities, resolution) and
raises a typed `DeLeakerError`; only ``deleaker.runtime.cli`` prints and exits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from deleaker.entities import check_entity_words
from deleaker.errors import DeLeakerError
from deleaker.staging import staged_name, writer_is_gone

from .batch_file import (  # noqa: F401 (the prompts file's names, read here and by the tests)
    MAX_LINE_BYTES,
    PER_RUN_SETTINGS,
    BatchFileError,
    check_prompt_record,
    parse_prompts_line,
    read_prompts,
)
from .images import (
    OutputError,
    carries_record,
    check_output_files,
    mask_overlay,
    read_png_record,
    save_pngs_atomic,
    side_by_side,
)
from .progress import ProgressFactory, generate_with_progress
from .request import GenerationRequest, ImageSettings
from .spec import DEVICE_PATTERN, RuntimeSpec  # noqa: F401 (the CLI's jobs are made of it)
from .verify import VerifyJob, VerifyReport, execution_label, reference_spec, verify  # noqa: F401 (`verify`)

if TYPE_CHECKING:  # the runtime (torch, diffusers) is imported when a job opens it, after every cheap check
    from .runtime import DeLeakerRuntime


@dataclass(frozen=True)
class JobItem:
    """One image of a job: the request, where it goes, (``--compare``) where the side-by-side goes and
    (``--save-masks``) where the entity masks' overlay goes."""

    request: GenerationRequest
    out: Path
    compare_out: Optional[Path] = None
    label: str = ""
    masks_out: Optional[Path] = None

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Every file this item writes (all or none of them, see `save_pngs_atomic`)."""
        return tuple(p for p in (self.out, self.compare_out, self.masks_out) if p is not None)

    @property
    def derived_outputs(self) -> tuple[Path, ...]:
        """The files whose names we derive from ``out`` (``<stem>_compare.png``, ``<stem>_masks.png``)."""
        return self.outputs[1:]


@dataclass(frozen=True)
class RenderJob:
    """A list of images to render with one runtime.

    ``keep_existing``: an output that is already there, complete and made with the same settings (its PNG's
    record: prompt, entities, seed, steps, guidance, size, model, backend, T, E_max, knobs) is kept, and one made
    otherwise is refused before any generation (a resumed batch). False: every output is written, replacing what
    is there (a single image; a batch with ``--overwrite``).

    ``replace_only_ours`` (a batch, with or without ``--overwrite``): a file already at an output path is replaced
    only when it is a PNG of ours (its ``deleaker-trt`` record, `images.carries_record`); anything else (a user's
    JPEG saved as ``0000.png``, a prompts file) is refused, naming it, before the model loads. A single ``--out``
    names its file explicitly and is always written; the names derived from it (``<stem>_compare.png``,
    ``<stem>_masks.png``) follow the batch's rule, since the user never named them. Whatever the job, something
    that is not a regular file at an output path (a FIFO, a device, a socket, a link) is refused unopened.
    """

    runtime: RuntimeSpec
    items: tuple[JobItem, ...]
    keep_existing: bool = False
    replace_only_ours: bool = False


@dataclass
class ItemReport:
    out: str
    compare_out: Optional[str]
    prompt: str
    entities: list[str]
    seed: int
    steps: int
    #: None for a model without a guidance embedding (FLUX.1-schnell uses no guidance).
    guidance: Optional[float]
    height: int
    width: int
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    masks_out: Optional[str] = None
    #: Peak GPU memory of the image's generation (GiB, the larger of a --compare pair); None off a GPU.
    peak_gpu_gib: Optional[float] = None


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


def masks_path(out: Path) -> Path:
    """Where ``--save-masks`` writes the entity masks' overlay of ``out``: ``<stem>_masks.png`` beside it."""
    return out.with_name(f"{out.stem}_masks.png")


def single_job(
    runtime: RuntimeSpec,
    request: GenerationRequest,
    out: str | Path,
    *,
    compare: bool = False,
    save_masks: bool = False,
) -> RenderJob:
    """A job of one image written to ``out`` (and its comparison beside it with ``compare``, the overlay of the
    entity masks DeLeaker used with ``save_masks``)."""
    runtime.refuse_flux2_masks(save_masks)
    out = Path(out)
    item = JobItem(
        request, out, compare_path(out) if compare else None, masks_out=masks_path(out) if save_masks else None
    )
    return RenderJob(runtime, (item,))


def batch_job(
    runtime: RuntimeSpec,
    prompts_file: str | Path,
    out_dir: str | Path,
    *,
    settings: ImageSettings,
    compare: bool = False,
    overwrite: bool = False,
    save_masks: bool = False,
) -> RenderJob:
    """A resumable job: line ``i`` (0-based among non-blank lines) of ``prompts_file`` goes to
    ``out_dir/{i:04d}.png``; a line without ``seed`` takes ``settings.seed``; other settings come from ``settings``.
    Outputs made with the same settings are kept; ``overwrite`` writes every line again (see `RenderJob`).
    """
    runtime.refuse_flux2_masks(save_masks)
    out_dir = Path(out_dir)
    items = []
    for index, (number, record) in enumerate(read_prompts(prompts_file)):
        label = f"{prompts_file} line {number}"
        try:
            request = settings.request(record["prompt"], record["entities"], seed=record.get("seed"))
        except DeLeakerError as exc:
            raise type(exc)(f"{label}: {exc}") from None
        out = out_dir / f"{index:04d}.png"
        items.append(JobItem(
            request, out, compare_path(out) if compare else None, label=label,
            masks_out=masks_path(out) if save_masks else None,
        ))
    return RenderJob(runtime, tuple(items), keep_existing=not overwrite, replace_only_ours=True)


def output_record(rt: "DeLeakerRuntime", request: GenerationRequest) -> dict[str, Any]:
    """What produced an image (stored in its PNG; a resumed batch compares it): the resolved request and the
    runtime's identity (model, backend, T, E_max, every DeLeaker knob, compiled execution). JSON-able and
    finite."""
    record = {
        "prompt": request.prompt,
        "entities": list(request.entities),
        "seed": request.seed,
        "steps": request.steps,
        # None for a model without a guidance embedding: it used none (records before said 3.5; see `_same_record`).
        "guidance": None if request.guidance is None else float(request.guidance),
        "height": request.height,
        "width": request.width,
        "model": rt.model_source,
        "backend": rt.backend_name,
        "text_len": rt.text_len,
        "max_entities": rt.max_entities,
        "deleaker_config": dict(rt.deleaker_config),
    }
    if getattr(rt, "compiled", False):
        # Only when compiled: records of eager images stay as they were, so resumed batches still match them.
        record["compiled"] = {"compiler": "inductor", "cuda_graphs": rt.device.type == "cuda"}
    if getattr(rt, "fp8", None) is not None:
        record["fp8"] = rt.fp8
    if getattr(rt, "lora_records", None):
        # Only with adapters, as above: records of images made without any stay as they were.
        record["loras"] = [dict(adapter) for adapter in rt.lora_records]
    return record


def _labelled(item: JobItem, exc: DeLeakerError) -> DeLeakerError:
    return type(exc)(f"{item.label}: {exc}") if item.label else exc


def _existing_outputs(job: RenderJob, records: list[dict[str, Any]]) -> list[bool]:
    """For each item, True when its outputs exist, are complete and were made with its record (keep them).
    Raises `OutputError` listing the items whose existing outputs were made with other settings."""
    done, conflicts = [], []
    for item, record in zip(job.items, records):
        expected = json.loads(json.dumps(record))  # as read back from a PNG (lists, floats)
        states = []
        for path in item.outputs:
            valid, stored = read_png_record(path)
            stored = _as_current_record(stored, expected)
            states.append(valid and stored == expected)
            if valid and stored != expected:
                stored_keys = (stored or {}).keys()
                changed = sorted(k for k in expected.keys() | stored_keys if (stored or {}).get(k) != expected.get(k))
                why = "has no record of its settings" if stored is None else f"was made with other {', '.join(changed)}"
                conflicts.append(f"{path} ({item.label or 'this request'}) {why}")
        done.append(all(states))
    if conflicts:
        listed = "; ".join(conflicts[:3]) + (f"; and {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
        raise OutputError(
            f"existing outputs were not made by these requests: {listed}. Nothing was generated: pass --overwrite "
            "to replace them, or choose another --out-dir"
        )
    return done


def _as_current_record(stored: Optional[dict[str, Any]], expected: dict[str, Any]) -> Optional[dict[str, Any]]:
    """``stored`` as this version writes it. Records written before guidance followed the model hold the unused
    default guidance (3.5) for a model without a guidance embedding, whose images do not depend on it: where this
    run records None (such a model), a stored number is the same setting, so a resumed batch keeps those images."""
    if (
        isinstance(stored, dict)
        and "guidance" in expected
        and expected["guidance"] is None
        and isinstance(stored.get("guidance"), (int, float))
    ):
        return {**stored, "guidance": None}
    return stored


def _remove_stale_staging(job: RenderJob) -> None:
    """Remove the staging files of the job's outputs left by a writer that was killed (SIGKILL, power loss) before
    it could remove them: names of ours (`deleaker.staging`) for one of the job's output names, whose process is
    gone. Anything else in the folder, and the staging files of a live writer, stay."""
    finals: dict[Path, set[str]] = {}
    for item in job.items:
        for path in item.outputs:
            finals.setdefault(path.parent, set()).add(path.name)
    for folder, names in finals.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not created yet
            continue
        for entry in entries:
            if staged_name(entry.name) in names and entry.is_file(follow_symlinks=False) and writer_is_gone(entry.name):
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass


def _refuse_files_not_ours(job: RenderJob) -> None:
    """Raise `OutputError` naming the regular files at the job's output paths that are not PNGs of ours (a batch:
    every output; a single ``--out``: the names derived from it, the one it names being always written)."""
    strangers = [
        f"{path} ({item.label or 'this request'}) has no record of its settings"
        for item in job.items
        for path in (item.outputs if job.replace_only_ours else item.derived_outputs)
        if path.exists() and not carries_record(path)
    ]
    if strangers:
        listed = "; ".join(strangers[:3]) + (f"; and {len(strangers) - 3} more" if len(strangers) > 3 else "")
        raise OutputError(
            f"existing files at output paths are not images deleaker-trt wrote: {listed}. Nothing was generated; "
            + (
                "such a file is never replaced (not even with --overwrite): move it away, or choose another --out-dir"
                if job.replace_only_ours
                else "such a file is never replaced: move it away, or choose another --out"
            )
        )


def run_job(
    job: RenderJob,
    *,
    progress_factory: Optional[ProgressFactory] = None,
    runtime: Optional["DeLeakerRuntime"] = None,
) -> JobReport:
    """Render ``job``. Order: output paths and (for a model) entity counts checked without loading anything,
    runtime opened (or ``runtime`` reused), every request validated against the model (prompt length, entity
    tokens, resolution), existing outputs compared with their requests (``keep_existing``), then images generated
    and each item's files written together (`save_pngs_atomic`: all or none).
    """
    check_output_files(p for item in job.items for p in item.outputs)
    _refuse_files_not_ours(job)
    if job.replace_only_ours:
        _remove_stale_staging(job)
    if runtime is None and job.runtime.model is not None:
        for item in job.items:  # E_max is known before loading a model: say so before the load
            try:
                check_entity_words(item.request.prompt, item.request.entities,
                                   max_entities=job.runtime.model_max_entities)
            except DeLeakerError as exc:
                raise _labelled(item, exc) from None
    rt = runtime if runtime is not None else job.runtime.open()
    resolved = []
    for item in job.items:
        try:
            resolved.append(rt.resolve(item.request))
        except DeLeakerError as exc:
            raise _labelled(item, exc) from None
    records = [output_record(rt, request) for request in resolved]
    keep = _existing_outputs(job, records) if job.keep_existing else [False] * len(job.items)

    reports = []
    for item, request, record, skip in zip(job.items, resolved, records, keep):
        report = ItemReport(
            out=str(item.out),
            compare_out=None if item.compare_out is None else str(item.compare_out),
            prompt=request.prompt,
            entities=list(request.entities),
            seed=request.seed,
            steps=request.steps,
            guidance=None if request.guidance is None else float(request.guidance),
            height=int(request.height),
            width=int(request.width),
            skipped=skip,
            masks_out=None if item.masks_out is None else str(item.masks_out),
        )
        reports.append(report)
        if skip:
            continue
        result = generate_with_progress(rt, request, progress_factory, "DeLeaker")
        report.timings = dict(result.timings)
        report.peak_gpu_gib = result.peak_gpu_gib
        images = [(result.image, item.out)]
        if item.compare_out is not None:
            # The same prompt: the text encoders' outputs are reused (`TextEncoders.encode`), not recomputed.
            plain = generate_with_progress(rt, replace(request, deleaker=False), progress_factory, "FLUX")
            report.timings["plain_total"] = plain.timings["total"]
            if plain.peak_gpu_gib is not None:
                report.peak_gpu_gib = max(report.peak_gpu_gib or 0.0, plain.peak_gpu_gib)
            pair = side_by_side(plain.image, result.image, request.prompt, ("FLUX", "DeLeaker"))
            images.append((pair, item.compare_out))
        if item.masks_out is not None:
            images.append((mask_overlay(result.image, result.entity_masks, request.entities), item.masks_out))
        save_pngs_atomic(images, record)
    return JobReport(backend=rt.backend_name, load_seconds=rt.load_seconds, items=reports)


