"""ctypes bindings of the DeLeaker kernel library (``csrc/deleaker_params.h``, ``csrc/deleaker_attention.cu``).

`PARAMS_FIELDS` and `LAYOUT_FIELDS` are the one place the struct field order is written on the Python side;
``tests/test_cuda_compile.py`` compiles a C++ program against the header and checks every offset and size.
Nothing here imports torch or needs a GPU until `load_library` is called.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from pathlib import Path

from deleaker.config import DeLeakerConfig
from deleaker.errors import DeLeakerError

from .kernels_build import build_library

DTYPE_FLOAT16 = 0
DTYPE_BFLOAT16 = 1
MAX_ENTITIES = 8
#: The sizes the kernels' launch grids take (``deleaker_params.h``'s ``DELEAKER_MAX_*``, checked against it by the
#: tests): batch and heads are grid dimensions, image tokens at most 65535 tiles of 64; tokens are an int32.
MAX_KERNEL_BATCH = 65535
MAX_HEADS = 65535
MAX_IMAGE_TOKENS = 65535 * 64
MAX_TOKENS = 2**31 - 1
ABI_VERSION = 5
#: The library's own error codes (negative; CUDA's are not).
ERROR_INVALID_ARGUMENT = -1
ERROR_NOT_INITIALIZED = -2
ERROR_UNSUPPORTED_DEVICE = -3

_P, _I32, _I64, _F32, _U64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_uint64

#: ``DeLeakerParams`` in header order: (field name, ctypes type).
PARAMS_FIELDS: tuple[tuple[str, type], ...] = (
    ("q", _P),
    ("k", _P),
    ("v", _P),
    ("out", _P),
    ("lse", _P),
    ("entity_mask", _P),
    ("history_in", _P),
    ("history_out", _P),
    ("step", _P),
    ("q_batch_stride", _I64),
    ("q_head_stride", _I64),
    ("q_row_stride", _I64),
    ("k_batch_stride", _I64),
    ("k_head_stride", _I64),
    ("k_row_stride", _I64),
    ("v_batch_stride", _I64),
    ("v_head_stride", _I64),
    ("v_row_stride", _I64),
    ("o_batch_stride", _I64),
    ("o_head_stride", _I64),
    ("o_row_stride", _I64),
    ("lse_batch_stride", _I64),
    ("lse_head_stride", _I64),
    ("batch", _I32),
    ("heads", _I32),
    ("tokens", _I32),
    ("text_tokens", _I32),
    ("head_dim", _I32),
    ("grid_h", _I32),
    ("grid_w", _I32),
    ("num_entities", _I32),
    ("dtype", _I32),
    ("block_offset", _I32),
    ("num_blocks", _I32),
    ("softmax_scale", _F32),
    ("std_mul_text", _F32),
    ("std_mul_image_image", _F32),
    ("k_strength", _F32),
    ("fallback_threshold", _F32),
    ("start_aggregating_from", _I64),
    ("stop_aggregating_at", _I64),
    ("start_intervention_from", _I64),
    ("stop_intervention_at", _I64),
    ("use_history", _I32),
    ("do_smoothing", _I32),
    ("do_image_image", _I32),
    ("do_image_text_strengthening", _I32),
    ("do_image_text_weakening", _I32),
    ("reserved", _I32),
)

#: ``DeLeakerWorkspaceLayout`` in header order (byte offsets into the workspace, four counts, the size).
LAYOUT_FIELDS: tuple[tuple[str, type], ...] = tuple(
    (name, _U64)
    for name in (
        "entity_tokens",
        "entity_token_bits",
        "entity_token_count",
        "head_affinity",
        "affinity",
        "source",
        "raw_masks",
        "masks",
        "scratch",
        "mask_counts",
        "row_entities",
        "union_count",
        "union_index",
        "pair_partials",
        "thresholds",
        "cut_bits",
        "cut_tiles",
        "pbar_tiles",
        "z",
        "fallback_rows",
        "fallback_counts",
        "fallback_count",
        "affinity_arrivals",
        "union_largest",
        "band_rows",
        "bands",
        "tiles",
        "stored_tiles",
        "total_bytes",
    )
)


class DeLeakerParams(ctypes.Structure):
    """Mirror of ``DeLeakerParams`` (device pointers as ints, strides in elements)."""

    _fields_ = list(PARAMS_FIELDS)


class WorkspaceLayout(ctypes.Structure):
    """Mirror of ``DeLeakerWorkspaceLayout``."""

    _fields_ = list(LAYOUT_FIELDS)


def config_fields(config: DeLeakerConfig) -> dict:
    """The `DeLeakerParams` fields that carry the knobs: same names as the config's, bools as 0/1 ints."""
    return {name: int(v) if isinstance(v, bool) else v for name, v in dataclasses.asdict(config).items()}


class KernelLaunchError(DeLeakerError, RuntimeError):
    """The kernel library rejected its arguments, was not initialised, or a CUDA call failed."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class KernelLibrary:
    """The loaded shared library, with typed signatures."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise KernelLaunchError(f"cannot load the DeLeaker kernel library {self.path}: {exc}") from exc
        lib.deleaker_abi_version.restype = ctypes.c_int
        lib.deleaker_abi_version.argtypes = []
        if lib.deleaker_abi_version() != ABI_VERSION:
            raise KernelLaunchError(
                f"{self.path} has ABI version {lib.deleaker_abi_version()}, expected {ABI_VERSION}; rebuild it"
            )
        lib.deleaker_init.restype = ctypes.c_int
        lib.deleaker_init.argtypes = []
        lib.deleaker_attention_workspace_bytes.restype = ctypes.c_size_t
        lib.deleaker_attention_workspace_bytes.argtypes = [ctypes.POINTER(DeLeakerParams)]
        lib.deleaker_attention_workspace_layout.restype = ctypes.c_int
        lib.deleaker_attention_workspace_layout.argtypes = [
            ctypes.POINTER(DeLeakerParams),
            ctypes.POINTER(WorkspaceLayout),
        ]
        lib.deleaker_attention_launch.restype = ctypes.c_int
        lib.deleaker_attention_launch.argtypes = [
            ctypes.POINTER(DeLeakerParams),
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
        ]
        lib.deleaker_error_string.restype = ctypes.c_char_p
        lib.deleaker_error_string.argtypes = [ctypes.c_int]
        self._lib = lib

    def init(self) -> None:
        """``deleaker_init()`` for the current device: once per device, before the first launch and outside any
        stream capture (it raises the kernels' shared-memory limits). Idempotent."""
        self._check(self._lib.deleaker_init(), "init")

    def workspace_bytes(self, params: DeLeakerParams) -> int:
        return int(self._lib.deleaker_attention_workspace_bytes(ctypes.byref(params)))

    def workspace_layout(self, params: DeLeakerParams) -> WorkspaceLayout:
        layout = WorkspaceLayout()
        self._check(self._lib.deleaker_attention_workspace_layout(ctypes.byref(params), ctypes.byref(layout)))
        return layout

    def launch(self, params: DeLeakerParams, workspace_ptr: int, workspace_bytes: int, stream_handle: int) -> None:
        """Enqueue one DeLeaker correction on ``stream_handle`` (a ``cudaStream_t`` as int; 0 = legacy stream).
        ``params.out`` must hold the plain attention output and ``params.lse`` its row log-sum-exp."""
        code = self._lib.deleaker_attention_launch(
            ctypes.byref(params), ctypes.c_void_p(workspace_ptr), workspace_bytes, ctypes.c_void_p(stream_handle)
        )
        self._check(code, "launch")

    def _check(self, code: int, what: str = "call") -> None:
        if code != 0:
            message = self._lib.deleaker_error_string(code).decode(errors="replace")
            kind = "DeLeaker error" if code < 0 else "CUDA error"
            raise KernelLaunchError(f"DeLeaker kernel {what} failed ({kind} {code}): {message}", code)


@functools.cache
def load_library(path: str | None = None) -> KernelLibrary:
    """The kernel library at ``path``, or the cached build of the current sources (built on first use). Not yet
    initialised: call `KernelLibrary.init` on each device (``deleaker.plugins.torch_op`` does)."""
    return KernelLibrary(Path(path) if path is not None else build_library())
