"""Image helpers of the runtime and CLI: side-by-side comparison, atomic PNG writes, PNG validity, PSNR."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deleaker.errors import DeLeakerError


class OutputError(DeLeakerError, OSError):
    """An output path cannot be written (missing or read-only directory, not a .png, a directory in the way)."""


def check_output_file(path: str | Path) -> Path:
    """Raise `OutputError` unless ``path`` can be written as a PNG (checked before any generation).

    Missing parent folders are fine when they can be created (they are, at the first write).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OutputError(f"output {path} must end in .png")
    if path.is_dir():
        raise OutputError(f"output {path} is a directory")
    check_output_dir(path.parent, create=True)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"output {path} exists and is not writable")
    return path


def check_output_dir(path: str | Path, *, create: bool) -> Path:
    """Raise `OutputError` unless ``path`` is (or, with ``create``, can become) a writable directory.

    Nothing is created here: a missing folder is checked through its nearest existing ancestor.
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise OutputError(f"output directory {path} does not exist")
        ancestor = next((p for p in path.parents if p.exists()), Path("."))
        if not ancestor.is_dir():
            raise OutputError(f"cannot create output directory {path}: {ancestor} is not a directory")
        _probe_write(ancestor, f"cannot create output directory {path}")
        return path
    if not path.is_dir():
        raise OutputError(f"output directory {path} is not a directory")
    _probe_write(path, f"output directory {path} is not writable")
    return path


def _probe_write(directory: Path, message: str) -> None:
    # A real write, not os.access: that says yes to root on a read-only mount.
    probe = directory / f".deleaker-write-probe.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{message}: {exc.strerror or exc}") from None


def save_png_atomic(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` to ``path`` via a temporary file in the same directory and a rename: a reader (or a
    resumed batch) sees either no file or the whole PNG, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened exclusively (mode "xb" honours the umask, unlike mkstemp's 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            image.save(handle, format="PNG")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_valid_png(path: str | Path) -> bool:
    """True when ``path`` is a complete, decodable PNG."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return False
            image.load()  # decodes every chunk: a truncated file fails here
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide (a long word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines or [""]


def side_by_side(left: Image.Image, right: Image.Image, caption: str, labels: tuple[str, str]) -> Image.Image:
    """``left`` and ``right`` next to each other, each labelled, with ``caption`` wrapped underneath
    (PIL's default font)."""
    font = ImageFont.load_default()
    width = left.width + right.width
    height = max(left.height, right.height)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(measure, caption, font, width - 4)
    line_height = 12
    canvas = Image.new("RGB", (width, height + line_height * (len(lines) + 1) + 6), "white")
    canvas.paste(left.convert("RGB"), (0, 0))
    canvas.paste(right.convert("RGB"), (left.width, 0))
    draw = ImageDraw.Draw(canvas)
    top = height + 2
    draw.text((2, top), labels[0], fill="black", font=font)
    draw.text((left.width + 2, top), labels[1], fill="black", font=font)
    for i, line in enumerate(lines):
        draw.text((2, top + line_height * (i + 1)), line, fill="black", font=font)
    return canvas


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB of two same-size 8-bit images (``inf`` when identical)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))
