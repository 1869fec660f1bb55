"""``deleaker-trt plugin``: parse the options into a `PluginBuildConfig`, call `build_plugin`, print the path.

Mounted on the ``deleaker-trt`` group by ``deleaker.runtime.cli``. Typed errors print ``error: <message>`` on stderr
(every missing tool or header, one line each) and exit 1; Ctrl-C and SIGTERM exit 130 and 143 and stop the
compilers the build started (`build_plugin`).
"""

from __future__ import annotations

from pathlib import Path

import click

from .errors import reported_errors

from deleaker.plugins.trt_plugin_build import PluginBuildConfig, build_plugin, library_build_info


@click.command("plugin")
@click.option(
    "--out",
    "out_dir",
    # Checked by the build (one error line, exit 1, as every bad path), not by click (usage text, exit 2).
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder: receives libdeleaker_trt_plugin.so (and CMake's build folder, build-<hash of the source "
    "folder>/, kept for faster rebuilds).",
)
@click.option(
    "--tensorrt-root",
    # Checked by the build (one error line naming the folder, exit 1, as every bad path), not by click (exit 2).
    type=click.Path(path_type=Path),
    metavar="DIRECTORY",
    default=None,
    help="TensorRT install holding include/NvInferRuntime.h (default: $TensorRT_ROOT, then system locations).",
)
@click.option(
    "--stand-in-headers",
    is_flag=True,
    help="Build against the test stand-in TensorRT headers, for checks on machines without TensorRT (CI); without "
    "cuDNN's headers the library loads and builds engines but cannot run.",
)
def plugin(out_dir: Path, tensorrt_root, stand_in_headers: bool) -> None:
    """Build the DeLeaker TensorRT plugin library (for trtexec, Triton and C++ services) and print its path."""
    config = PluginBuildConfig(out_dir=out_dir, stand_in_headers=stand_in_headers, tensorrt_root=tensorrt_root)
    with reported_errors("the library"):
        path = build_plugin(config, progress=lambda line: click.echo(line, err=True))
        info = library_build_info(path)
    click.echo(f"built: {info}", err=True)
    click.echo(str(path))
