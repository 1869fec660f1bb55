"""What the CLI runs, as library functions: open a runtime from a spec, render a job (one prompt or a JSONL
batch, with resume), verify a backend against PyTorch.

Each function validates everything it can before generating (output paths, prompts, entities, resolution) and
raises a typed `DeLeakerError`; only ``deleaker.runtime.cli`` prints and exits.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from deleaker.config import DeLeakerConfig, shown
from deleaker.entities import check_entity_words
from deleaker.errors import ConfigError, DeLeakerError
from deleaker.jsonio import StrictJSONError, loads_strict
from deleaker.lora import check_loras, describe_records
from deleaker.staging import staged_name, writer_is_gone

from deleaker.entities import DEFAULT_MAX_ENTITIES
from deleaker.export.limits import check_max_entities, check_text_len
from deleaker.models import FLUX2_RUNTIME_MESSAGE, check_model_source, is_flux2_model
from .backend_options import check_backend_options, check_flux2_options
from .defaults import BACKENDS, DEFAULT_MODEL_BACKEND, DEFAULT_TEXT_LEN
from .images import (
    OutputError,
    carries_record,
    check_output_files,
    mask_overlay,
    psnr,
    read_png_record,
    save_pngs_atomic,
    side_by_side,
)
from .request import GenerationRequest, ImageSettings

if TYPE_CHECKING:  # the runtime (torch, diffusers) is imported when a job opens it, after every cheap check
    from .runtime import DeLeakerRuntime, GenerationResult

#: ``progress_factory(total_steps, description)`` returns ``update(step_done, total)``, and a ``close()``.
ProgressFactory = Callable[[int, str], Any]
#: Longest line of a ``--prompts`` file: far above any prompt that fits T5 (see `request.MAX_PROMPT_CHARS`).
MAX_LINE_BYTES = 1 << 20
#: Devices a runtime can generate on: the CPU or a CUDA GPU (torch's other device types cannot run the model).
DEVICE_PATTERN = re.compile(r"(cpu|cuda)(:\d{1,3})?")


class BatchFileError(DeLeakerError, ValueError):
    """A line of a ``--prompts`` JSONL file is not ``{"prompt": str, "entities": [str, ...], "seed"?: int}``."""


@dataclass(frozen=True)
class RuntimeSpec:
    """Where the model comes from: ``engines`` (a built engine directory) xor ``model`` (``"tiny"`` or a diffusers
    folder), the backend (None: ``onnxruntime`` for a model, the manifest's kind for engines), text length
    ``T`` and ``E_max`` (models only, None: the defaults; engines fix them, and refuse a value), the export cache
    and the device."""

    engines: Optional[Path] = None
    model: Optional[str] = None
    backend: Optional[str] = None
    text_len: Optional[int] = None
    max_entities: Optional[int] = None
    cache_dir: Optional[Path] = None
    device: Optional[str] = None
    #: DeLeaker knob overrides (``DeLeakerConfig.for_model``); engines have theirs built in.
    deleaker_overrides: tuple[tuple[str, Any], ...] = ()
    #: Engines only: which precision to load when a directory holds several per resolution.
    precision: Optional[str] = None
    #: The torch backend only: run the transformer through ``torch.compile`` (`TorchBackend`).
    compile: bool = False
    #: The torch backend only: FP8 linears with ``"row"`` or ``"tensor"`` scales (``deleaker.fp8_linear``).
    fp8: Optional[str] = None
    #: The torch backend on a GPU only: the text encoders stay in CPU memory between prompts.
    offload_encoders: bool = False
    #: LoRA adapters (`deleaker.lora.check_loras`): fused into a model's weights; for engines, the ones they were
    #: built with (checked against their manifests; none given: the engines as built).
    loras: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", check_loras(self.loras))
        if (self.engines is None) == (self.model is None):
            raise ConfigError("give exactly one of an engine directory (--engines) or a model (--model)")
        if self.engines is not None and self.deleaker_overrides:
            raise ConfigError(
                "DeLeaker options are built into engines; rebuild them to change "
                f"{[name for name, _ in self.deleaker_overrides]}"
            )
        given = [name for name in ("text_len", "max_entities") if getattr(self, name) is not None]
        if self.engines is not None and given:
            # Engines fix T and E_max: a value given for them would be ignored silently, as knobs would.
            raise ConfigError(
                f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to a model (--model); "
                "engines are built for one T and E_max (build others with `deleaker-trt build` to change them)"
            )
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; allowed: {BACKENDS}")
        if self.model is not None and self.precision is not None:
            raise ConfigError("--precision selects engines (--engines DIR); a --model runs in its own dtype")
        check_backend_options(  # the table from_model checks too
            self.backend if self.backend is not None or self.model is None else self.default_backend,
            {"compile": self.compile, "fp8": self.fp8, "offload_encoders": self.offload_encoders},
            engines=self.engines is not None,
            as_flags=True,
        )
        if self.offload_encoders and self.device is not None and not self.device.startswith("cuda"):
            raise ConfigError(
                f"--offload-encoders keeps the text encoders in CPU memory for a GPU run; --device {self.device} runs "
                "them there already"
            )
        if self.model is not None and self.backend == "tensorrt":
            raise ConfigError("the tensorrt backend runs built engines: pass --engines DIR (see `deleaker-trt build`)")
        if self.text_len is not None:
            check_text_len(self.text_len)
        if self.max_entities is not None:
            check_max_entities(self.max_entities)
        if self.device is not None and (not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device)):
            raise ConfigError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r:.40}")
        DeLeakerConfig.check_overrides(dict(self.deleaker_overrides))
        # Paths as they are now, so that a typo is answered before torch loads (opening checks them again).
        if self.model is not None:
            check_model_source(self.model)
            if is_flux2_model(self.model):  # the FLUX.2 runtime's limits (`Flux2Runtime`), before torch loads
                check_flux2_options(
                    self.model, self.backend,
                    {"compile": self.compile, "fp8": self.fp8, "offload_encoders": self.offload_encoders},
                    loras=bool(self.loras), as_flags=True,
                )
        if self.engines is not None and not Path(self.engines).is_dir():
            state = "is not a directory" if Path(self.engines).exists() else "does not exist"
            raise ConfigError(f"engine directory {self.engines} {state}")
        if self.cache_dir is not None and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise ConfigError(f"cache directory {self.cache_dir} is not a directory")

    @property
    def default_backend(self) -> str:
        """The backend a model runs with when none is named: torch for a FLUX.2 folder (its only one), else the
        default (`DEFAULT_MODEL_BACKEND`)."""
        return "torch" if self.model is not None and is_flux2_model(self.model) else DEFAULT_MODEL_BACKEND

    def refuse_flux2(self, command: str) -> None:
        """Raise `ConfigError` when this spec's model is a FLUX.2 folder, which ``command`` (verify, serve,
        triton-repo) does not run so far."""
        if self.model is not None and is_flux2_model(self.model):
            raise ConfigError(f"{command}: {self.model} {FLUX2_RUNTIME_MESSAGE}")

    @property
    def model_text_len(self) -> int:
        """``T`` a model runs with: ``text_len``, or the default."""
        return DEFAULT_TEXT_LEN if self.text_len is None else self.text_len

    @property
    def model_max_entities(self) -> int:
        """``E_max`` a model runs with: ``max_entities``, or the default."""
        return DEFAULT_MAX_ENTITIES if self.max_entities is None else self.max_entities

    def open(self) -> "DeLeakerRuntime":
        """Load the runtime (checks the device, the engine manifest, loads the model); no generation yet."""
        from .runtime import DeLeakerRuntime

        self._check_device()

        if self.engines is not None:
            return DeLeakerRuntime.from_engines(
                self.engines,
                backend=self.backend,
                device=self.device,
                precision=self.precision,
                cache_dir=self.cache_dir,
                loras=self.loras or None,
            )
        return DeLeakerRuntime.from_model(
            self.model,
            backend=self.backend or self.default_backend,
            text_len=self.model_text_len,
            max_entities=self.model_max_entities,
            cache_dir=self.cache_dir,
            device=self.device,
            deleaker_config=dict(self.deleaker_overrides) or None,
            compile=self.compile,
            fp8=self.fp8,
            offload_encoders=self.offload_encoders,
            loras=self.loras,
        )


    def _check_device(self) -> None:
        """Raise `ConfigError` when ``device`` names a GPU this machine does not have (before any model loads)."""
        if self.device is not None and self.device.startswith("cuda"):
            from .backends import resolve_device

            resolve_device(self.device, default="cuda")


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
    out = Path(out)
    item = JobItem(
        request, out, compare_path(out) if compare else None, masks_out=masks_path(out) if save_masks else None
    )
    return RenderJob(runtime, (item,))


#: Keys a prompts line may not set: the options set them for every line.
PER_RUN_SETTINGS = {
    "steps": "--steps",
    "guidance": "--guidance",
    "height": "--height",
    "width": "--width",
    "max_sequence_length": "--text-len",
    "text_len": "--text-len",
    "max_entities": "--max-entities",
}


def read_prompts(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every non-blank line of a JSONL prompts file (format of slim_examples.jsonl).

    Each record is a JSON object with ``prompt`` (str), ``entities`` (list of str) and optionally ``seed`` (int);
    keys the options set for the whole run (`PER_RUN_SETTINGS`) are refused, other keys are ignored. The file is
    UTF-8 (a byte-order mark is allowed), each line at most `MAX_LINE_BYTES`.
    Raises `BatchFileError` naming the line.
    """
    path = Path(path)
    if path.is_dir():
        raise BatchFileError(f"prompts file {path} is a directory; give a JSONL file")
    if not path.exists():
        raise BatchFileError(f"prompts file {path} does not exist")
    if not path.is_file():
        raise BatchFileError(f"prompts file {path} is not a regular file")
    records: list[tuple[int, dict[str, Any]]] = []
    try:
        with path.open("rb") as handle:
            # A line of MAX_LINE_BYTES and its "\r\n" still reads whole; anything longer reads as too long.
            for number, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 2), b""), start=1):
                record = parse_prompts_line(raw, f"{path} line {number}", first=number == 1)
                if record is not None:
                    records.append((number, record))
    except OSError as exc:
        raise BatchFileError(f"cannot read prompts file {path}: {exc.strerror or exc}") from None
    if not records:
        raise BatchFileError(f"prompts file {path} has no prompts")
    return records


def parse_prompts_line(
    raw: bytes, where: str, *, first: bool, image_settings: tuple[str, ...] = ()
) -> Optional[dict[str, Any]]:
    """The record of one line (None for a blank line); raises `BatchFileError` prefixed with ``where``.
    ``first``: a UTF-8 byte-order mark is allowed; ``image_settings`` as `check_prompt_record`."""
    if len(raw.removesuffix(b"\n").removesuffix(b"\r")) > MAX_LINE_BYTES:
        raise BatchFileError(f"{where}: longer than {MAX_LINE_BYTES} bytes; one JSON object per line, one prompt each")
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise BatchFileError(f"{where}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not text.strip():
        return None
    try:
        record = loads_strict(text, allow_nan=False)
    except json.JSONDecodeError as exc:
        raise BatchFileError(f"{where}: not JSON ({exc.msg})") from None
    except StrictJSONError as exc:
        raise BatchFileError(f"{where}: {exc}") from None
    except ValueError as exc:  # a number json cannot convert: an int of more than 4300 digits
        raise BatchFileError(f"{where}: unreadable JSON ({str(exc):.120})") from None
    except RecursionError:
        raise BatchFileError(f"{where}: JSON nested too deeply; expected a flat object") from None
    check_prompt_record(record, where, image_settings=image_settings)
    return record


def check_prompt_record(record: Any, where: str, *, image_settings: tuple[str, ...] = ()) -> None:
    """Raise `BatchFileError` prefixed with ``where`` unless ``record`` is a prompts line's object: ``prompt`` (str),
    ``entities`` (list of str), optional ``seed`` (non-negative int), no key of `PER_RUN_SETTINGS` other than
    ``image_settings`` (the keys a caller takes per image, e.g. the HTTP API's steps, guidance, height, width;
    their values are checked by `ImageSettings`)."""
    if not isinstance(record, dict):
        raise BatchFileError(f"{where}: expected a JSON object {{\"prompt\": ..., \"entities\": [...]}}, "
                             f"got {type(record).__name__}")
    if not isinstance(record.get("prompt"), str):
        raise BatchFileError(f"{where}: 'prompt' must be a string")
    entities = record.get("entities")
    if not isinstance(entities, list) or not all(isinstance(e, str) for e in entities):
        raise BatchFileError(f"{where}: 'entities' must be a list of strings")
    seed = record.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise BatchFileError(f"{where}: 'seed' must be a non-negative int, got {seed!r:.40}")
    # What the options set for every line: a line that sets it would be ignored silently (other keys, such as the
    # SLIM examples' "subset", are not settings and are ignored).
    per_run = sorted((record.keys() & PER_RUN_SETTINGS.keys()) - set(image_settings))
    if per_run:
        options = ", ".join(f"{key!r} by {PER_RUN_SETTINGS[key]}" for key in per_run)
        raise BatchFileError(
            f"{where}: set for the whole run, not per line: {options}; a line takes prompt, entities and seed"
        )


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
        result = _generate(rt, request, progress_factory, "DeLeaker")
        report.timings = dict(result.timings)
        report.peak_gpu_gib = result.peak_gpu_gib
        images = [(result.image, item.out)]
        if item.compare_out is not None:
            # The same prompt: the text encoders' outputs are reused (`TextEncoders.encode`), not recomputed.
            plain = _generate(rt, replace(request, deleaker=False), progress_factory, "FLUX")
            report.timings["plain_total"] = plain.timings["total"]
            if plain.peak_gpu_gib is not None:
                report.peak_gpu_gib = max(report.peak_gpu_gib or 0.0, plain.peak_gpu_gib)
            pair = side_by_side(plain.image, result.image, request.prompt, ("FLUX", "DeLeaker"))
            images.append((pair, item.compare_out))
        if item.masks_out is not None:
            images.append((mask_overlay(result.image, result.entity_masks, request.entities), item.masks_out))
        save_pngs_atomic(images, record)
    return JobReport(backend=rt.backend_name, load_seconds=rt.load_seconds, items=reports)


def _generate(
    rt: "DeLeakerRuntime", request: GenerationRequest, progress_factory, description: str, **kwargs
) -> "GenerationResult":
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
    """`_generate` recording the latents; a non-finite result is kept as the FAIL it is, saying whose."""
    from .runtime import NonFiniteError

    try:
        result = _generate(rt, request, progress_factory, rt.backend_name, record_latents=True)
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
