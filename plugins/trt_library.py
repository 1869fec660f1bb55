"""``libdeleaker_trt_plugin.so`` where TensorRT meets it: which TensorRT is importable, what a library is (the record
an engine's manifest keeps of it), and loading it into TensorRT's plugin registry.

``deleaker-trt build --plugin PATH`` copies the library into the engine folder, loads that copy into TensorRT's
registry and records it in each engine's manifest (`PluginLibrary.record`); ``run --engines`` checks the folder's
copy against that record and the TensorRT here against the one that built the engines, and its TensorRT backend
loads the copy before it deserializes an engine. Both load through `load_plugin_library`, the one place a library
enters TensorRT's registry.

TensorRT's plugin registry is process-wide and holds one creator per name: a process hosts one DeLeaker plugin
library; loading the same library again is a no-op, a different one is refused (`PluginLibraryError`).

Nothing here imports TensorRT at import time or needs a GPU.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Mapping, Optional

from deleaker.errors import DeLeakerError
from deleaker.hashing import sha256_file

from .trt_plugin_build import LIBRARY_NAME, PluginBuildError, library_build_info

#: The Python packages of the TensorRT family that can build and run our engines, in the order tried.
TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx")
#: The keys of an engine manifest's ``plugin`` record, all strings.
PLUGIN_RECORD_KEYS = ("name", "namespace", "version", "library", "sha256", "build_info", "tensorrt_headers")

_RELEASE = re.compile(r"^(tensorrt|tensorrt_rtx)==(\S+)$")
_PLUGIN = re.compile(r"; plugin (\w+)::(\w+) v([^\s;]+);")
_HEADERS = re.compile(r"; tensorrt_headers ([^\s;]+)")
#: The attention provider of a library built without cuDNN's headers (plugins/trt/no_attention.cpp).
_NO_ATTENTION = "; attention none "
STAND_IN = "stand-in"
#: TensorRT's log (and through it our library's) goes to this logger: warnings and errors reach stderr, never stdout.
_LOG = logging.getLogger("deleaker.tensorrt")
#: ``trt.ILogger.Severity`` name -> logging level (TensorRT's INFO is build detail: debug here).
_LEVELS = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING}


class TensorRTUnavailableError(DeLeakerError, ImportError):
    """Neither ``tensorrt`` nor ``tensorrt_rtx`` can be imported."""


class PluginLibraryError(DeLeakerError):
    """A plugin library is not ours, cannot be loaded into this TensorRT, or conflicts with one already loaded."""


# --- which TensorRT ---------------------------------------------------------------------------------------------


def import_tensorrt(prefer: Optional[str] = None) -> ModuleType:
    """``prefer`` (one of `TENSORRT_MODULES`) if it imports, else the first of `TENSORRT_MODULES` that does.

    Raises `TensorRTUnavailableError` naming why each failed.
    """
    names = [prefer] if prefer else []
    names += [name for name in TENSORRT_MODULES if name != prefer]
    errors = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # the PyPI ``tensorrt`` stub raises at import time, not only ImportError
            errors.append(f"{name}: {type(err).__name__}: {err}")
            continue
        if hasattr(module, "Builder"):
            return module
        errors.append(f"{name}: imported but has no Builder (an unbuilt stub package?)")
    raise TensorRTUnavailableError(
        "TensorRT's Python package is not importable (" + "; ".join(errors) + "). Install TensorRT >= 10.8 for your "
        "CUDA version (`pip install tensorrt-cu12` from NVIDIA's index, or the wheel of a TensorRT tarball), or "
        "TensorRT-RTX (`pip install tensorrt-rtx`) for RTX GPUs."
    )


def tensorrt_release(trt: ModuleType) -> str:
    """``"<package>==<version>"``, e.g. ``tensorrt==10.13.0.35`` or ``tensorrt_rtx==1.7.1.116``: what an engine's
    manifest records as its ``tensorrt_version`` (an engine runs only with the release that built it)."""
    return f"{trt.__name__}=={trt.__version__}"


def release_module(release: str) -> str:
    """The package name of a `tensorrt_release` string; raises ``ValueError`` for anything else."""
    match = _RELEASE.match(release) if isinstance(release, str) else None
    if match is None:
        raise ValueError(f"expected '<package>==<version>' with package one of {TENSORRT_MODULES}, got {release!r}")
    return match.group(1)


def tensorrt_logger(trt: ModuleType) -> object:
    """A ``trt.ILogger`` that forwards TensorRT's messages to the ``deleaker.tensorrt`` logger (TensorRT's own
    ``trt.Logger`` prints on stdout, which the CLI keeps for its results). Keep it alive as long as the builder or
    runtime made with it."""

    class ForwardingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: object, msg: str) -> None:
            level = _LEVELS.get(getattr(severity, "name", ""), logging.DEBUG)
            if _LOG.isEnabledFor(level):
                _LOG.log(level, "TensorRT: %s", msg)

    return ForwardingLogger()


# --- what a library is ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginLibrary:
    """A DeLeaker plugin library file: where it is, its bytes' SHA-256 and what it says it is
    (``deleaker_trt_plugin_build_info()``: version, plugin name, namespace and version, TensorRT headers, attention
    provider, kernel ABI)."""

    path: Path
    sha256: str
    build_info: str

    def __post_init__(self) -> None:
        if _PLUGIN.search(self.build_info) is None or _HEADERS.search(self.build_info) is None:
            raise PluginLibraryError(f"not the build info of a DeLeaker plugin library: {self.build_info!r}")

    @property
    def plugin(self) -> tuple[str, str, str]:
        """``(name, namespace, version)`` of the plugin it registers."""
        namespace, name, version = _PLUGIN.search(self.build_info).groups()
        return name, namespace, version

    @property
    def tensorrt_headers(self) -> str:
        """The TensorRT version of the headers it was compiled against (``major.minor.patch``), or ``stand-in``."""
        return _HEADERS.search(self.build_info).group(1)

    def check_can_run(self) -> None:
        """Refuse (`PluginLibraryError`) a library built without cuDNN's attention (a stand-in header build for
        checks): it loads and builds engines, but every run of them fails."""
        if _NO_ATTENTION in self.build_info:
            raise PluginLibraryError(
                f"the plugin library {self.path} was built without cuDNN's attention (`deleaker-trt plugin "
                "--stand-in-headers` where cuDNN's headers are missing, for checks): it builds engines but cannot run "
                "them. Build the library with TensorRT's and cuDNN's headers (deleaker-trt plugin) and rebuild the "
                "engines with it"
            )

    def record(self) -> Dict[str, str]:
        """The engine manifest's ``plugin`` record (`PLUGIN_RECORD_KEYS`); ``library`` is the file's name (in the
        engine folder, beside the engine)."""
        name, namespace, version = self.plugin
        return {
            "name": name,
            "namespace": namespace,
            "version": version,
            "library": self.path.name,
            "sha256": self.sha256,
            "build_info": self.build_info,
            "tensorrt_headers": self.tensorrt_headers,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, str], directory: Path) -> "PluginLibrary":
        """The library an engine manifest's ``plugin`` record names, in the manifest's ``directory``."""
        return cls(path=Path(directory) / record["library"], sha256=record["sha256"], build_info=record["build_info"])


def inspect_plugin_library(path: Path) -> PluginLibrary:
    """The `PluginLibrary` at ``path``; raises `PluginLibraryError` when it is missing or not a DeLeaker plugin
    library. The library is loaded in a child process (`library_build_info`), never in this one."""
    path = Path(path)
    if not path.is_file():
        raise PluginLibraryError(f"plugin library {path} does not exist or is not a file")
    try:
        info = library_build_info(path)
    except PluginBuildError as err:
        raise PluginLibraryError(str(err)) from err
    return PluginLibrary(path=path, sha256=sha256_file(path), build_info=info)


def check_tensorrt_can_host(library: PluginLibrary, trt: ModuleType) -> None:
    """Refuse a library compiled against another TensorRT major version than ``trt`` (the interfaces' layout
    changes between majors: TensorRT would call the wrong methods). Stand-in header builds are for checks and
    pass; TensorRT-RTX has its own version numbers, so only TensorRT proper is compared."""
    headers = library.tensorrt_headers
    if headers == STAND_IN or trt.__name__ != "tensorrt":
        return
    if headers.split(".")[0] != str(trt.__version__).split(".")[0]:
        raise PluginLibraryError(
            f"the plugin library was built against TensorRT {headers}'s headers, this is TensorRT {trt.__version__}: "
            f"build it against this TensorRT's headers (deleaker-trt plugin --tensorrt-root ...)"
        )


def check_plugin_layers_loadable(trt: ModuleType) -> None:
    """TensorRT-RTX's ONNX parser opens ``libtensorrt_rtx.so`` by that unversioned name when it adds a plugin layer
    and aborts the process when it cannot; its wheel ships only ``libtensorrt_rtx.so.1``. Raise
    `PluginLibraryError` with the fix instead. TensorRT proper needs nothing."""
    if trt.__name__ != "tensorrt_rtx":
        return
    libs = Path(trt.__file__).resolve().parent.parent / "tensorrt_rtx_libs"
    if (libs / "libtensorrt_rtx.so").exists():
        return  # beside the parser: found through its $ORIGIN run path
    try:
        ctypes.CDLL("libtensorrt_rtx.so")  # the search the parser's dlopen makes (LD_LIBRARY_PATH, ld.so.cache)
    except OSError:
        raise PluginLibraryError(
            "TensorRT-RTX's ONNX parser needs libtensorrt_rtx.so (unversioned) to add plugin layers, and the "
            f"tensorrt-rtx wheel ships only libtensorrt_rtx.so.1: link it, e.g. `ln -s {libs}/libtensorrt_rtx.so.1 "
            f"{libs}/libtensorrt_rtx.so`, or put such a link in a folder on LD_LIBRARY_PATH"
        ) from None


# --- loading into TensorRT's registry ---------------------------------------------------------------------------


def _registered_plugin(trt: ModuleType, plugin: tuple[str, str, str]) -> bool:
    """Whether TensorRT's registry holds a creator ``(name, namespace, version)`` (asked without ``get_creator``,
    which logs an error when there is none)."""
    name, namespace, version = plugin
    for creator in trt.get_plugin_registry().all_creators:
        found = (getattr(creator, "name", None), getattr(creator, "plugin_namespace", None),
                 getattr(creator, "plugin_version", None))
        if found == (name, namespace, version):
            return True
    return False


def mapped_plugin_libraries(maps: Path = Path("/proc/self/maps")) -> List[Path]:
    """Files named `LIBRARY_NAME` mapped into this process (loaded by TensorRT or anyone else), from ``maps``."""
    paths = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith("/" + LIBRARY_NAME):
            paths.append(Path(fields[5]))
    return sorted(set(paths))


def load_plugin_library(trt: ModuleType, library: PluginLibrary) -> None:
    """Load ``library`` (its file is hashed again) into ``trt``'s plugin registry, and check that its creator
    registered. A no-op when this process already loaded a library with the same bytes. Call it with a TensorRT
    builder or runtime alive (TensorRT-RTX gives a plugin library the logger of a live one).

    Raises `PluginLibraryError`: the file changed, another DeLeaker plugin library is loaded in this process, or
    TensorRT refused the library (its log says why).
    """
    path = library.path
    if not path.is_file() or sha256_file(path) != library.sha256:
        raise PluginLibraryError(f"{path} changed since it was checked (sha256 differs); load it again")
    if _registered_plugin(trt, library.plugin):
        if any(sha256_file(p) == library.sha256 for p in mapped_plugin_libraries() if p.is_file()):
            return
        name, namespace, version = library.plugin
        raise PluginLibraryError(
            f"this process already holds another {namespace}::{name} v{version} plugin than {path} (TensorRT's "
            "registry takes one per name): run engines built with different plugin libraries in separate processes"
        )
    if trt.get_plugin_registry().load_library(str(path)) is None:
        raise PluginLibraryError(f"TensorRT could not load the plugin library {path} (see its log above)")
    if not _registered_plugin(trt, library.plugin):
        raise PluginLibraryError(f"{path} loaded, but no {library.plugin[1]}::{library.plugin[0]} creator registered")
