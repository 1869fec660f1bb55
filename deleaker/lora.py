"""`LoraAdapter`: a LoRA file and the scale it is applied with, checked when made (a light module: no torch).

The command line (``--lora PATH[:SCALE]``, `parse_lora_option`), the runtime (``from_model(..., loras=[...])``),
engine builds and engine manifests all take adapters through this module, so the checks that need no model (the
path exists and is a file, the scale is a finite number) are one set, answered before torch is imported. What
needs the model (a safetensors LoRA whose layers and shapes fit the transformer) is `deleaker.lora_fusion`'s.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import ConfigError
from .hashing import sha256_file

#: The scale of an adapter given without one (diffusers' default adapter weight).
DEFAULT_LORA_SCALE = 1.0
#: The keys of one adapter's record (engine manifests, image records): file name, content hash, scale.
LORA_RECORD_KEYS = ("name", "sha256", "scale")


class LoraError(ConfigError):
    """A LoRA adapter cannot be used: a missing or unreadable file, not a LoRA, a LoRA for another model (layers
    or shapes the model does not have), or a scale that is not a finite number."""


def check_lora_scale(scale: Any, where: str = "LoRA scale") -> float:
    """``scale`` as a float; raises `LoraError` unless it is a finite real number (not a bool)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise LoraError(f"{where} must be a finite number, got {scale!r:.60}")
    value = float(scale)
    if not math.isfinite(value):
        raise LoraError(f"{where} must be a finite number, got {value!r}")
    return value


def check_lora_path(path: Any) -> Path:
    """``path`` as a `Path`; raises `LoraError` unless it names an existing file (a str or an os.PathLike)."""
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise LoraError(f"a LoRA adapter is a .safetensors file path, got {path!r:.80}")
    path = Path(path)
    if not path.exists():
        raise LoraError(f"LoRA file {str(path)!r:.300} does not exist")
    if not path.is_file():
        raise LoraError(f"LoRA file {str(path)!r:.300} is not a file (give the adapter's .safetensors file)")
    return path


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter file (diffusers, kohya or peft ``.safetensors``, as ``FluxPipeline.load_lora_weights`` reads
    them) and the weight it is applied with (diffusers' ``set_adapters`` weight; 1.0 = as trained)."""

    path: Path
    scale: float = DEFAULT_LORA_SCALE
    _sha256: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", check_lora_path(self.path))
        object.__setattr__(self, "scale", check_lora_scale(self.scale, f"the scale of LoRA {self.path.name!r:.100}"))

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the file's bytes (read once per adapter value)."""
        if not self._sha256:
            try:
                self._sha256.append(sha256_file(self.path))
            except OSError as exc:
                raise LoraError(f"cannot read LoRA file {self.path}: {exc}") from exc
        return self._sha256[0]

    def record(self) -> dict[str, Any]:
        """What identifies the adapter as applied: file name, content hash and scale (`LORA_RECORD_KEYS`)."""
        return {"name": self.path.name, "sha256": self.sha256, "scale": self.scale}


def parse_lora_option(text: str) -> LoraAdapter:
    """``PATH[:SCALE]`` (the command line's ``--lora``) as a `LoraAdapter`.

    The text splits at its last ``:`` only when what follows parses as a number, so a path that holds ``:`` still
    names a file (``a:b.safetensors``, ``C:\\loras\\x.safetensors``); ``x.safetensors:nan`` is a scale, refused as
    not finite."""
    if not isinstance(text, str):
        raise LoraError(f"--lora takes PATH[:SCALE], got {text!r:.80}")
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            pass
        else:
            return LoraAdapter(Path(path), scale)
    return LoraAdapter(Path(text))


def check_loras(loras: Optional[Iterable[Any]]) -> tuple[LoraAdapter, ...]:
    """``loras`` as a tuple of `LoraAdapter` (None: none). Items may be adapters, paths (scale 1.0) or
    ``(path, scale)`` pairs; raises `LoraError` for anything else or a bad item, naming it."""
    if loras is None:
        return ()
    if isinstance(loras, (str, os.PathLike, LoraAdapter)):
        raise LoraError("loras must be a list of adapters (LoraAdapter, a path, or (path, scale)), not one item")
    try:
        items = list(loras)
    except TypeError:
        raise LoraError(f"loras must be a list of adapters, got {type(loras).__name__}") from None
    adapters = []
    for item in items:
        if isinstance(item, LoraAdapter):
            adapters.append(item)
        elif isinstance(item, (str, os.PathLike)):
            adapters.append(LoraAdapter(Path(item)))
        elif isinstance(item, tuple) and len(item) == 2:
            adapters.append(LoraAdapter(*item))
        else:
            raise LoraError(f"a LoRA adapter is a LoraAdapter, a path or (path, scale), got {item!r:.80}")
    return tuple(adapters)


def lora_records(loras: Iterable[LoraAdapter]) -> list[dict[str, Any]]:
    """The records of ``loras``, in order (`LoraAdapter.record`)."""
    return [adapter.record() for adapter in loras]


def check_lora_records(records: Any, where: str = "loras") -> None:
    """Raise `ConfigError` unless ``records`` is a list of `LORA_RECORD_KEYS` objects (a manifest's field)."""
    if not isinstance(records, list):
        raise ConfigError(f"{where} must be a list of {{name, sha256, scale}} objects, got {type(records).__name__}")
    for record in records:
        if not isinstance(record, dict) or sorted(record) != sorted(LORA_RECORD_KEYS):
            raise ConfigError(f"{where}: each adapter is {{name, sha256, scale}}, got {record!r:.120}")
        digest = record["sha256"]
        if not isinstance(record["name"], str) or not record["name"]:
            raise ConfigError(f"{where}: an adapter's name must be a non-empty string, got {record['name']!r:.80}")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ConfigError(f"{where}: an adapter's sha256 must be 64 hex digits, got {digest!r:.80}")
        check_lora_scale(record["scale"], f"{where}: the scale of {record['name']!r:.80}")


def same_adapters(records: list[dict[str, Any]], loras: Iterable[LoraAdapter]) -> bool:
    """True when ``loras`` are the adapters of ``records``, in order: same content hashes and scales (file names
    may differ: a copied or renamed file is the same adapter)."""
    given = [(adapter.sha256, adapter.scale) for adapter in loras]
    return given == [(record["sha256"], float(record["scale"])) for record in records]


def describe_records(records: list[dict[str, Any]]) -> str:
    """``name:scale, ...`` of adapter records (for messages), or ``no LoRA``."""
    if not records:
        return "no LoRA"
    return ", ".join(f"{record['name']}:{record['scale']:g} (sha256 {record['sha256'][:12]})" for record in records)
