"""The build's TensorRT loaders, Polygraphy's: ONNX -> strongly typed network (our plugin library loaded first) ->
serialized engine with one optimization profile and a timing cache.

- `network_from_onnx` is Polygraphy's ``NetworkFromOnnxPath(path, strongly_typed=True)``. The plugin library goes
  into TensorRT's registry through `load_plugin_library` (hash-checked, one library per process) rather than
  Polygraphy's ``LoadPlugins``, which only ``dlopen``s a path: TensorRT-RTX registers a library's creators only
  through the registry's ``load_library``.
- `build_serialized_engine` is ``EngineBytesFromNetwork(network, CreateConfig(profiles=[Profile], load_timing_cache=
  ..., memory_pool_limits=...), save_timing_cache=...)``. The timing cache goes in and out through anonymous
  temporary files and is written atomically here: Polygraphy would rewrite the file in place and leave a
  ``<cache>.lock`` in the engine folder, whose builds the build lock already serializes.
- the engine file is written by `deleaker.engines.build.save_engine`, atomically: Polygraphy's ``SaveEngine`` wants a
  deserialized engine, which TensorRT can only make with a GPU, and writes in place.

Two pieces of glue, both here:

- Polygraphy drives ``tensorrt`` or ``tensorrt_rtx``, chosen once per process when ``polygraphy.backend.trt`` is
  first imported (``polygraphy.config.USE_TENSORRT_RTX``, from ``POLYGRAPHY_USE_TENSORRT_RTX``). `polygraphy_backend`
  points it at the TensorRT the build imported (`import_tensorrt`) and refuses a process where it drives the other.
- Polygraphy prints its log on stdout, which the CLI keeps for its results. While a loader runs its log goes to
  Python's logging instead, below errors dropped, and its errors (the ONNX parser's among them: Polygraphy makes the
  parser with its own logger) are gathered into the `BuildError`. The builder keeps one logger per process, the one
  of the first live builder: a `Network` holds a builder made with `tensorrt_logger` from before Polygraphy's, so
  the builder's messages (and our plugin library's) go to the ``deleaker.tensorrt`` logger, never to stdout.

Nothing here imports TensorRT or Polygraphy at import time.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

from deleaker.errors import DeLeakerError
from deleaker.staging import write_atomically
from deleaker.plugins.trt_library import (
    PluginLibrary,
    check_plugin_layers_loadable,
    load_plugin_library,
    tensorrt_logger,
)



class BuildError(DeLeakerError):
    """TensorRT failed to parse the ONNX or to build the engine, or the GPU cannot build this precision."""


#: ``{input name: (min, opt, max) shape}``, `FluxTransformerIO.profiles`.
Profiles = Mapping[str, Tuple[Sequence[int], Sequence[int], Sequence[int]]]


def polygraphy_backend(trt: ModuleType) -> ModuleType:
    """``polygraphy.backend.trt``, driving ``trt`` (``tensorrt`` or ``tensorrt_rtx``). Raises `BuildError` when
    Polygraphy is not installed, or already drives the other TensorRT in this process."""
    try:
        from polygraphy import config
    except ImportError as err:
        raise BuildError(
            f"building TensorRT engines needs Polygraphy ({err}): pip install polygraphy, or the package's "
            "[tensorrt] extra"
        ) from None
    rtx = trt.__name__ == "tensorrt_rtx"
    if "polygraphy.backend.trt" in sys.modules and bool(config.USE_TENSORRT_RTX) != rtx:
        driven = "tensorrt_rtx" if config.USE_TENSORRT_RTX else "tensorrt"
        raise BuildError(
            f"Polygraphy already drives {driven} in this process, the build uses {trt.__name__}: build in a "
            f"process of its own, or set POLYGRAPHY_USE_TENSORRT_RTX={int(rtx)}"
        )
    config.USE_TENSORRT_RTX = rtx  # read by polygraphy.backend.trt's first import and by its loaders
    from polygraphy.backend import trt as backend

    return backend


@contextlib.contextmanager
def polygraphy_log() -> Iterator[List[str]]:
    """For the duration: Polygraphy's log goes to Python's logging (not stdout), below errors dropped; yields the
    list its error messages are gathered into (for the `BuildError`). Polygraphy's settings are restored after."""
    from polygraphy.logger import G_LOGGER

    errors: List[str] = []

    class Gather(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage())

    saved = (G_LOGGER.use_python_logging_system, G_LOGGER.module_severity, G_LOGGER.colors, G_LOGGER.letter)
    G_LOGGER.use_python_logging_system, G_LOGGER.module_severity = True, G_LOGGER.ERROR
    G_LOGGER.colors = G_LOGGER.letter = False  # colors would print a hint on stdout when `colored` is missing
    python_logger = logging.getLogger("Polygraphy")
    handler, propagate = Gather(logging.ERROR), python_logger.propagate
    python_logger.addHandler(handler)
    python_logger.propagate = False  # said once, in the error, not also on stderr
    try:
        yield errors
    finally:
        python_logger.removeHandler(handler)
        python_logger.propagate = propagate
        (G_LOGGER.use_python_logging_system, G_LOGGER.module_severity, G_LOGGER.colors, G_LOGGER.letter) = saved


@contextlib.contextmanager
def _failures_as_build_errors(what: str) -> Iterator[None]:
    """Polygraphy's exception (raised after it logged the errors) as a `BuildError` ``"<what>: <errors>"``, on
    one line."""
    from polygraphy.exception import PolygraphyException

    with polygraphy_log() as errors:
        try:
            yield
        except PolygraphyException as err:
            # TensorRT's errors (the parser logs through Polygraphy's logger) before Polygraphy's summary, one line
            details = [" ".join(error.split()) for error in errors if error != str(err)] or [str(err)]
            raise BuildError(f"{what}: " + "; ".join(details)) from None


@dataclass
class Network:
    """A parsed TensorRT network with what must outlive it: Polygraphy's builder and parser, and ``anchor``, the
    builder whose logger TensorRT uses for the process (`tensorrt_logger`)."""

    trt: ModuleType
    builder: Any
    network: Any
    parser: Any
    anchor: Any
    logger: Any


def network_from_onnx(onnx_path: Path, trt: ModuleType, plugin: Optional[PluginLibrary] = None) -> Network:
    """Parse ``onnx_path`` into a strongly typed network. ``plugin``: the DeLeaker plugin library, loaded into
    TensorRT's registry first (None: for graphs without ``DeLeakerAttention`` nodes)."""
    backend = polygraphy_backend(trt)
    logger = tensorrt_logger(trt)
    anchor = trt.Builder(logger)  # alive before the library loads: TensorRT-RTX hands it this builder's logger
    if plugin is not None:
        check_plugin_layers_loadable(trt)
        load_plugin_library(trt, plugin)
    with _failures_as_build_errors(f"TensorRT could not parse {onnx_path}"):
        builder, network, parser = backend.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
    return Network(trt, builder, network, parser, anchor, logger)


def build_serialized_engine(
    net: Network,
    profiles: Profiles,
    *,
    timing_cache: Optional[Path] = None,
    workspace_bytes: Optional[int] = None,
) -> bytes:
    """Build the engine with one optimization profile and a timing cache (read if present, written back).

    ``profiles``: ``{input name: (min, opt, max) shape}`` (`FluxTransformerIO.profiles`); inputs whose min and max
    agree are static and left out of the profile.
    """
    trt, backend = net.trt, polygraphy_backend(net.trt)
    profile = backend.Profile()
    for name, (lo, opt, hi) in profiles.items():
        if lo != hi:  # only the dynamic (batch) inputs need a range
            profile.add(name, min=lo, opt=opt, max=hi)
    with contextlib.ExitStack() as files, _failures_as_build_errors(
        "TensorRT failed to build the engine (see its log above)"
    ):
        cache_in = cache_out = None
        if timing_cache is not None:  # anonymous files: Polygraphy wants real ones (it checks modes, fsyncs)
            cache_in, cache_out = (files.enter_context(tempfile.TemporaryFile("w+b")) for _ in range(2))
            cache_in.write(timing_cache.read_bytes() if timing_cache.is_file() else b"")
            cache_in.seek(0)
        config = backend.CreateConfig(
            profiles=[profile],
            load_timing_cache=cache_in,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_bytes)} if workspace_bytes else None,
            profiling_verbosity=trt.ProfilingVerbosity.LAYER_NAMES_ONLY,  # TensorRT's default (Polygraphy's: DETAILED)
        )
        serialized = backend.EngineBytesFromNetwork(
            (net.builder, net.network, net.parser), config=config, save_timing_cache=cache_out
        )()
        if cache_out is not None:
            cache_out.seek(0)
            write_atomically({timing_cache: cache_out.read()})
    return bytes(memoryview(serialized))

