"""Image helpers of the runtime and CLI: side-by-side comparison, the entity masks' overlay, atomic PNG writes
with a provenance record (or its bytes, for a server's reply), PNG validity, PSNR."""

from __future__ import annotations

import functools
import io
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from deleaker.errors import DeLeakerError
from deleaker.jsonio import loads_strict
from deleaker.staging import STAGING_EXTRA, staged_name, staging_name, write_atomically


class OutputError(DeLeakerError, OSError):
    """An output path cannot be written (missing or read-only directory, not a .png, a directory in the way)."""


def check_output_files(paths: Iterable[str | Path]) -> None:
    """Raise `OutputError` unless every path can be written as a PNG (checked before any generation): a file name
    ending in .png and short enough for the filesystem (with the temporary name it is written under first), not a
    directory, writable if it exists, in a folder that is (or can be created) writable. Each distinct folder is
    probed once, so a batch of thousands of images costs one write test. Something at a path that is not a regular
    file (a FIFO, a device, a socket, a symbolic link) is refused: it is never opened (a FIFO would block) nor
    replaced."""
    folders: set[Path] = set()
    for path in map(Path, paths):
        try:
            _check_output_file(path, folders)
        except OutputError:
            raise
        except OSError as exc:  # e.g. a name too long for the filesystem, a path through a file
            raise OutputError(f"output {path} cannot be written: {exc.strerror or exc}") from None


def _check_output_file(path: Path, folders: set[Path]) -> None:
    if path.name.lower() == ".png":
        raise OutputError(f"output {path} has no name before .png; give a file name such as out.png")
    if path.suffix.lower() != ".png":
        raise OutputError(f"output {path} must end in .png")
    longest = _name_max(path.parent)
    if len(os.fsencode(path.name)) + STAGING_EXTRA > longest:
        raise OutputError(
            f"output file name {path.name[:40]}... is too long: at most {longest - STAGING_EXTRA} bytes here"
        )
    kind = special_file_kind(path)
    if kind == "a directory":
        raise OutputError(f"output {path} is a directory")
    if kind is not None:
        raise OutputError(
            f"output {path} is {kind}, not a regular file: it is never opened or replaced; remove it or choose "
            "another path"
        )
    if path.parent not in folders:
        check_output_dir(path.parent, create=True)
        folders.add(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"output {path} exists and is not writable")


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def special_file_kind(path: str | Path) -> Optional[str]:
    """What is at ``path`` when it is not a regular file ("a FIFO", "a symbolic link", ...); None when nothing is
    there or a regular file is. Looks with ``lstat``: opens nothing."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there (the folder's own checks say why)
        return None
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def _open_regular(path: Path):
    """``path`` opened for reading, or `OutputError` when it is not a regular file. Opened without blocking and
    without following a link, then checked, so a FIFO swapped in after a check cannot hang us."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def _name_max(folder: Path) -> int:
    """Longest file name (bytes) of the filesystem holding ``folder`` (or its nearest existing ancestor)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


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
    probe = directory / staging_name("deleaker-write-probe")
    try:
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{message}: {exc.strerror or exc}") from None


#: The PNG text chunk (iTXt) holding the JSON record of what produced an image.
RECORD_KEY = "deleaker-trt"


def _record_info(record: Optional[Mapping[str, Any]]) -> Optional[PngImagePlugin.PngInfo]:
    """The PNG text chunk holding ``record`` (None without one)."""
    if record is None:
        return None
    info = PngImagePlugin.PngInfo()
    info.add_itxt(RECORD_KEY, json.dumps(record, sort_keys=True, allow_nan=False))
    return info


def png_bytes(image: Image.Image, record: Optional[Mapping[str, Any]] = None) -> bytes:
    """``image`` as PNG bytes with ``record`` in its ``deleaker-trt`` chunk, as `save_pngs_atomic` writes it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_record_info(record))
    return buffer.getvalue()


def _final_of(path: str | os.PathLike) -> Path:
    """The file a path names for a user: a staging name of ours stands for its final name."""
    path = Path(path)
    final = staged_name(path.name)
    return path if final is None else path.with_name(final)


def save_pngs_atomic(images: Sequence[tuple[Image.Image, Path]], record: Optional[Mapping[str, Any]] = None) -> None:
    """Write every ``(image, path)`` as a PNG, all or none: each goes to a temporary file in its directory first
    (complete and fsynced), then all are renamed into place; a failure (a full disk, an interruption) removes the
    temporary files and any file already renamed, so a reader or a resumed batch never sees a truncated PNG, nor one
    image of a pair without the other. ``record`` (JSON-able) is stored in each PNG's ``deleaker-trt`` text chunk.

    Raises `OutputError` naming the path and the system's reason (e.g. "No space left on device").
    """
    info = _record_info(record)
    files = {}
    try:
        for image, path in images:
            path = Path(path)
            files[path] = functools.partial(image.save, format="PNG", pnginfo=info)
            path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(files)  # all or none: staged, fsynced, renamed; a failure removes what it wrote
    except OSError as exc:
        where = _final_of(exc.filename) if exc.filename is not None else list(files)[-1]
        raise OutputError(f"cannot write {where}: {exc.strerror or exc}; nothing was written") from None


def read_png_record(path: str | Path) -> tuple[bool, Optional[dict[str, Any]]]:
    """``(is a complete PNG, its deleaker-trt record or None)``; ``(False, None)`` for a missing or damaged file."""
    try:
        with _open_regular(Path(path)) as handle, Image.open(handle) as image:
            if image.format != "PNG":
                return False, None
            image.load()  # decodes every chunk: a truncated file fails here
            text = image.text.get(RECORD_KEY)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False, None
    try:
        record = loads_strict(text) if text is not None else None
    except (ValueError, RecursionError):
        record = None
    return True, record if isinstance(record, dict) else None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def carries_record(path: str | Path) -> bool:
    """True when ``path`` is a regular file that starts as a PNG of ours: a ``deleaker-trt`` text chunk before its
    image data. Reads chunk headers only, so a PNG of ours cut short after that chunk (a disk that filled up
    under another writer) still counts as ours, and a file of any other kind (a JPEG named .png, a prompts file)
    does not. Opens nothing that is not a regular file."""
    keyword = RECORD_KEY.encode("latin-1") + b"\0"
    try:
        with _open_regular(Path(path)) as handle:
            if handle.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
                return False
            start = len(_PNG_SIGNATURE)
            for _ in range(64):  # IHDR and a few ancillary chunks come before ours; no real PNG needs more
                handle.seek(start)
                header = handle.read(8)
                if len(header) < 8:
                    return False
                length, kind = int.from_bytes(header[:4], "big"), header[4:]
                if kind in (b"IDAT", b"IEND"):
                    return False
                if kind in _TEXT_CHUNKS and handle.read(min(length, len(keyword))) == keyword:
                    return True
                start += 8 + length + 4  # header, data, CRC
    except OSError:
        return False
    return False


def is_valid_png(path: str | Path) -> bool:
    """True when ``path`` is a complete, decodable PNG."""
    return read_png_record(path)[0]


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


#: Lines of the prompt under a side-by-side comparison; the rest is cut (the full prompt is in the PNG's record).
MAX_CAPTION_LINES = 8


def side_by_side(left: Image.Image, right: Image.Image, caption: str, labels: tuple[str, str]) -> Image.Image:
    """``left`` and ``right`` next to each other, each labelled, with ``caption`` wrapped underneath
    (PIL's default font)."""
    font = ImageFont.load_default()
    width = left.width + right.width
    height = max(left.height, right.height)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(measure, caption, font, width - 4)
    if len(lines) > MAX_CAPTION_LINES:  # a long prompt must not make a canvas thousands of pixels tall
        lines = lines[: MAX_CAPTION_LINES - 1] + [lines[MAX_CAPTION_LINES - 1] + " ..."]
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


#: One colour per entity row (E_max is at most 8), far apart in hue and readable over photographs.
ENTITY_COLOURS = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (255, 225, 25),  # yellow
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (245, 130, 48),  # orange
    (240, 50, 230),  # magenta
)
#: Weight of an entity's colour where its mask covers the image (the image keeps the rest, so it stays visible).
OVERLAY_ALPHA = 0.5


def mask_overlay(image: Image.Image, masks: Any, entities: Sequence[str]) -> Image.Image:
    """``image`` with each entity's mask (``(E, gh, gw)`` bool on the latent grid, an array or a CPU tensor) tinted
    in its colour, and a legend under it naming each entity with its colour and the share of the image its mask
    covers. ``masks`` None (DeLeaker did not act, see `GenerationResult.entity_masks`) gives the image with a legend
    saying so.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = rgb.shape[:2]
    lines: list[tuple[Optional[tuple[int, int, int]], str]] = []
    if masks is None:
        lines.append((None, "no entity masks: DeLeaker did not act in this generation"))
    else:
        grid_masks = np.asarray(masks, dtype=bool)
        if grid_masks.ndim != 3 or grid_masks.shape[0] != len(entities):
            raise ValueError(f"masks must be (len(entities), gh, gw), got {grid_masks.shape} for {len(entities)}")
        for index, (entity, grid_mask) in enumerate(zip(entities, grid_masks)):
            colour = ENTITY_COLOURS[index % len(ENTITY_COLOURS)]
            pixels = _to_pixels(grid_mask, height, width)
            rgb[pixels] = (1 - OVERLAY_ALPHA) * rgb[pixels] + OVERLAY_ALPHA * np.asarray(colour, dtype=np.float32)
            lines.append((colour, f"{entity}: {100.0 * grid_mask.mean():.0f}% of the image"))
    tinted = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    return _with_legend(tinted, lines)


def _to_pixels(grid_mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A latent-grid mask scaled to the image by nearest neighbour (each latent token covers a square patch)."""
    rows = np.arange(height) * grid_mask.shape[0] // height
    cols = np.arange(width) * grid_mask.shape[1] // width
    return grid_mask[rows[:, None], cols[None, :]]


def _with_legend(image: Image.Image, lines: Sequence[tuple[Optional[tuple[int, int, int]], str]]) -> Image.Image:
    font = ImageFont.load_default()
    line_height, swatch = 12, 9
    canvas = Image.new("RGB", (max(image.width, 160), image.height + line_height * len(lines) + 6), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (colour, text) in enumerate(lines):
        top = image.height + 3 + line_height * i
        left = 2
        if colour is not None:
            draw.rectangle((left, top + 1, left + swatch, top + 1 + swatch), fill=colour, outline="black")
            left += swatch + 4
        draw.text((left, top), text, fill="black", font=font)
    return canvas
