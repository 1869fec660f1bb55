"""Shared fixtures: the tiny offline FLUX (deleaker.tiny), the reference prompts with their entities, and the TensorRT
importable here."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

#: pytest copies the running test's id into PYTEST_CURRENT_TEST, which every child process inherits, and Linux
#: refuses one environment string over 128 KiB (exec fails with E2BIG). Some pytest versions spell a long parameter
#: out in full in the id: give such cases explicit ``ids``.
MAX_TEST_ID_CHARS = 1000


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    too_long = [item.nodeid for item in items if len(item.nodeid) > MAX_TEST_ID_CHARS]
    if too_long:
        names = "\n".join(f"  {nodeid[:150]}... ({len(nodeid)} characters)" for nodeid in too_long[:10])
        raise pytest.UsageError(
            f"{len(too_long)} test ids are longer than {MAX_TEST_ID_CHARS} characters; give their parameters short "
            f"explicit ids (pytest.mark.parametrize(..., ids=[...])):\n{names}"
        )

# The reference examples (a copy of the project's slim_examples.jsonl, so the suite needs no file outside the repo;
# tests/test_entities.py checks the copy against the original where that is present).
SLIM_EXAMPLES: tuple[dict[str, Any], ...] = (
    {
        "prompt": "A bat and an owl are perched side by side on a tree branch.",
        "entities": ["bat", "owl"],
        "subset": "pairs",
    },
    {
        "prompt": "A cow and a horse in a farm",
        "entities": ["cow", "horse"],
        "subset": "pairs",
    },
    {
        "prompt": "The dolphin and the whale are cuddling together",
        "entities": ["dolphin", "whale"],
        "subset": "interactions",
    },
    {
        "prompt": "An elephant and a moose are sitting back to back in a 3D render",
        "entities": ["elephant", "moose"],
        "subset": "interactions_with_style",
    },
    {
        "prompt": (
            "A bat is flying high in the night sky while an owl is perched on a tree branch and a moth "
            "flutters"
        ),
        "entities": ["bat", "owl", "moth"],
        "subset": "animal_triplets",
    },
    {
        "prompt": "A strawberry, a radish, and a cherry sit together.",
        "entities": ["strawberry", "radish", "cherry"],
        "subset": "fruit_n_veg_triplets",
    },
    {
        "prompt": (
            "A crow tilts its head curiously, while a magpie pecks at the ground and a blue jay sings "
            "from a tree"
        ),
        "entities": ["crow", "magpie", "blue jay"],
        "subset": "animal_triplets",
    },
    {
        "prompt": (
            "A cat stretches lazily in the sun, while a cheetah scans the savanna and a leopard "
            "lounges on a tree branch."
        ),
        "entities": ["cat", "cheetah", "leopard"],
        "subset": "animal_triplets",
    },
    {
        "prompt": "An eggplant, a plum, and a fig are laid out on a napkin",
        "entities": ["eggplant", "plum", "fig"],
        "subset": "fruit_n_veg_triplets",
    },
    {
        "prompt": "A tomato, a bell pepper, and paprika are arranged side-by-side",
        "entities": ["tomato", "bell pepper", "paprika"],
        "subset": "fruit_n_veg_triplets",
    },
    {
        "prompt": "A cat and a cheetah are splashing each other with water in a shallow river",
        "entities": ["cat", "cheetah"],
        "subset": "interactions",
    },
    {
        "prompt": "In a 3D render a bee and a butterfly are holding onto each other tightly",
        "entities": ["bee", "butterfly"],
        "subset": "interactions_with_style",
    },
    {
        "prompt": "A parrot and a toucan are one playfully tugging on the other's tail",
        "entities": ["parrot", "toucan"],
        "subset": "interactions",
    },
    {
        "prompt": "A koala and a sloth are entwined together while hanging from a branch",
        "entities": ["koala", "sloth"],
        "subset": "interactions",
    },
    {
        "prompt": (
            "In a pop art style, A hippopotamus and a rhinoceros are one gently pushing the other with "
            "its nose."
        ),
        "entities": ["hippopotamus", "rhinoceros"],
        "subset": "interactions_with_style",
    },
    {
        "prompt": "A zebra and a horse are rolling in the sand together, covering themselves in dust.",
        "entities": ["zebra", "horse"],
        "subset": "interactions",
    },
)


@pytest.fixture(scope="session")
def tiny_components() -> dict[str, Any]:
    """The tiny FLUX's ``FluxPipeline(**components)`` arguments, seed 0, built once per test session.

    Shared by every test: do not mutate it (no ``.to()``, no processor swaps, no hooks, no weight edits).
    A test that changes modules takes ``fresh_tiny_components`` or deep-copies (``copy.deepcopy``) what it changes.
    """
    from deleaker.tiny import build_tiny_flux_components

    return build_tiny_flux_components(seed=0)


@pytest.fixture
def fresh_tiny_components() -> dict[str, Any]:
    """A private copy of the tiny FLUX (seed 0, same weights as ``tiny_components``), free to mutate."""
    from deleaker.tiny import build_tiny_flux_components

    return build_tiny_flux_components(seed=0)


@pytest.fixture(scope="session")
def slim_examples() -> tuple[dict[str, Any], ...]:
    """The reference prompts, each ``{"prompt", "entities", "subset"}`` (read-only)."""
    return SLIM_EXAMPLES


@pytest.fixture(scope="module")
def trt():
    """The TensorRT module builds use (``tensorrt``, else ``tensorrt_rtx``); skips the test where neither imports."""
    from deleaker.plugins import trt_library

    try:
        return trt_library.import_tensorrt()
    except trt_library.TensorRTUnavailableError as err:
        pytest.skip(f"neither tensorrt nor tensorrt_rtx imports ({type(err).__name__})")


@pytest.fixture
def make_special_file() -> Iterator[Callable[..., None]]:
    """``make(path, kind, target=None, target_bytes=b"theirs")`` puts something that is not a regular file at
    ``path``: a "symlink" to ``target`` (written with ``target_bytes`` first), a "dangling symlink" to ``target``, a
    "fifo", a "socket" (bound; closed at teardown) or a "folder". For the refusals of our lock and output names."""
    sockets: list[socket.socket] = []

    def make(path: Path, kind: str, target: Path | None = None, target_bytes: bytes = b"theirs") -> None:
        if kind == "symlink":
            assert target is not None
            target.write_bytes(target_bytes)
            path.symlink_to(target)
        elif kind == "dangling symlink":
            assert target is not None
            path.symlink_to(target)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "socket":
            sockets.append(socket.socket(socket.AF_UNIX))
            sockets[-1].bind(str(path))
        elif kind == "folder":
            path.mkdir()
        else:
            raise ValueError(f"unknown special file kind {kind!r}")

    yield make
    for sock in sockets:
        sock.close()
