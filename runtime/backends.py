"""Transformer backends: one small interface, three implementations (PyTorch, ONNX Runtime here; TensorRT in
`deleaker.runtime.tensorrt_backend`).

The interface (`TransformerBackend`) is the transformer I/O contract of ``deleaker.export.contract``: one call of
the FLUX transformer with DeLeaker state. Inputs, by name (torch tensors on the backend's ``device``; each backend
casts to the dtypes its graph declares):

- ``hidden_states (B, Nimg, C_in)``, ``encoder_hidden_states (B, T, joint_dim)``, ``pooled_projections (B, pooled)``
- ``timestep (B,)``: the scheduler's ``t / 1000`` (what ``FluxTransformer2DModel`` takes)
- ``img_ids (Nimg, 3)``, ``txt_ids (T, 3)``; ``guidance (B,)`` only for models with guidance embeddings
- ``entity_mask (E_max, T)`` bool/int: an all-zero mask means plain FLUX (no entity, no intervention)
- ``history (B, E_max, Nimg)`` float32, ``step``: 0-d integer, the denoising step index

Outputs: ``noise_pred (B, Nimg, C_out)`` and ``history_out (B, E_max, Nimg)`` float32 (the state for the next step).
"""

from __future__ import annotations

import contextlib
import importlib
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Protocol, runtime_checkable

import torch

from deleaker.config import DeLeakerConfig
from deleaker.errors import ConfigError, DeLeakerError
from deleaker.processor import DeLeakerState, install_deleaker_processors

Tensor = torch.Tensor

#: Names of the inputs every backend takes, in the contract's order (``guidance`` only with guidance embeddings).
INPUT_NAMES = (
    "hidden_states",
    "encoder_hidden_states",
    "pooled_projections",
    "timestep",
    "img_ids",
    "txt_ids",
    "guidance",
    "entity_mask",
    "history",
    "step",
)


class BackendError(DeLeakerError, RuntimeError):
    """A transformer backend cannot be created or run (missing package, bad graph, wrong inputs)."""


def is_allocation_failure(exc: BaseException) -> bool:
    """True for the ways torch and ONNX Runtime report that memory ran out."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


@contextlib.contextmanager
def allocation_errors_as(error: type[DeLeakerError], what: str) -> Iterator[None]:
    """Re-raise a failed allocation inside the block as ``error`` (typed, with the advice to lower the size)."""
    try:
        yield
    except Exception as exc:
        if not is_allocation_failure(exc):
            raise
        advice = "use a smaller resolution or a machine with more memory"
        raise error(f"{what} ran out of memory ({exc}); {advice}") from exc


def resolve_device(device: str | torch.device | None, *, default: str) -> torch.device:
    """``device`` as a torch device this process can use (``None``: ``default``); `ConfigError` otherwise.

    Allowed: ``cpu``, and ``cuda`` / ``cuda:N`` when torch sees that GPU.
    """
    text = default if device is None else device
    try:
        resolved = torch.device(text)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"device {str(text)!r} is not a torch device; allowed: cpu, cuda, cuda:N") from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise ConfigError(f"device {str(text)!r} cannot run a model here; allowed: cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"device {str(text)!r} is not available: this machine has no CUDA device (no CUDA GPU is visible to "
            f"torch, {build}); use --device cpu"
        )
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ConfigError(
            f"device {str(text)!r} is not available: this machine has {count} CUDA device(s) (cuda:0 to "
            f"cuda:{count - 1})"
        )
    return resolved


@runtime_checkable
class TransformerBackend(Protocol):
    """One denoising step of the transformer: ``backend(inputs) -> (noise_pred, history_out)``.

    Contract: ``inputs`` maps every name of `INPUT_NAMES` the model uses to a torch tensor (see the module
    docstring for shapes); the call does not keep references to them; outputs are new torch tensors on
    ``device`` (``noise_pred`` in ``dtype``, ``history_out`` float32). Backends are not thread-safe: one call at a
    time (the runtime guarantees it).
    """

    name: str
    device: torch.device
    dtype: torch.dtype

    def __call__(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]: ...


class TorchBackend:
    """The diffusers ``FluxTransformer2DModel`` with DeLeaker processors (``torch.ops.deleaker.attention``).

    On CUDA the op dispatches to the fused kernels when they are built (``deleaker.plugins.torch_op``, imported
    here so that it registers them onto the op), else to the PyTorch reference. An all-zero entity mask runs
    diffusers' stock attention: exactly plain FLUX.

    ``compile=True`` runs the transformer step through ``torch.compile`` (inductor, ``fullgraph``: the DeLeaker op
    is traced through its fake implementation, no graph break) with static shapes, so each resolution, batch size
    and DeLeaker on/off is compiled once, on its first call; on CUDA inductor also captures the whole step as a
    CUDA graph per shape (``mode="reduce-overhead"``) that later calls replay, the DeLeaker step and history
    being device tensors read by the graph (no host synchronisation). The seconds of each first call (compile and
    warm-up included) accumulate in `first_call_seconds`.

    The entity mask and image ids of a call are read on the host once per tensor given (the runtime passes the
    same ones every step), not on every step.
    """

    name = "torch"

    #: Shapes (resolution x batch x DeLeaker on/off) one compiled backend keeps compiled; dynamo's default of 8
    #: would make a server that sees many sizes fall back to eager silently.
    RECOMPILE_LIMIT = 64

    def __init__(
        self, transformer: torch.nn.Module, config: DeLeakerConfig | None = None, *, compile: bool = False
    ) -> None:
        if not isinstance(compile, bool):
            raise ConfigError(f"compile must be True or False, got {compile!r:.40}")
        self.transformer = transformer.eval()
        self.num_blocks = install_deleaker_processors(self.transformer)
        self.config = DeLeakerConfig.resolve(config, self.num_blocks)
        param = next(self.transformer.parameters())
        self.device = param.device
        self.dtype = param.dtype
        if self.device.type == "cuda":
            importlib.import_module("deleaker.plugins.torch_op")  # registers the op's CUDA kernel
        self.compiled = compile
        #: CUDA graphs per shape (compiled on a CUDA device only).
        self.cuda_graphs = compile and self.device.type == "cuda"
        self.first_call_seconds = 0.0
        self._shapes_seen: set[tuple] = set()
        self._geometry: Optional[tuple[Tensor, Tensor, tuple[int, int], bool]] = None
        self._step = self._transformer_step
        if compile:
            limit = getattr(torch._dynamo.config, "recompile_limit", None)
            if limit is not None and limit < self.RECOMPILE_LIMIT:
                torch._dynamo.config.recompile_limit = self.RECOMPILE_LIMIT
            self._step = torch.compile(
                self._transformer_step,
                fullgraph=True,
                dynamic=False,
                mode="reduce-overhead" if self.cuda_graphs else None,
            )

    @property
    def execution(self) -> dict[str, Any]:
        """How the transformer runs, for an image's provenance: ``{"compile": bool, "cuda_graphs": bool}``."""
        return {"compile": self.compiled, "cuda_graphs": self.cuda_graphs}

    def _transformer_step(
        self,
        hidden: Tensor,
        encoder_hidden: Tensor,
        pooled: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Optional[Tensor],
        entity_mask: Tensor,
        history: Tensor,
        step: Tensor,
        grid: tuple[int, int],
        deleaker_on: bool,
    ) -> tuple[Tensor, Tensor]:
        state = None
        if deleaker_on:
            # The processors replace state.history block by block; the step is read, never written.
            state = DeLeakerState(
                entity_mask=entity_mask, grid=grid, config=self.config, step=step, history=history
            )
        noise_pred = self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=encoder_hidden,
            pooled_projections=pooled,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            joint_attention_kwargs=None if state is None else {"deleaker_state": state},
            return_dict=False,
        )[0]
        return noise_pred, (history if state is None else state.history)

    def _read_geometry(self, img_ids: Tensor, entity_mask: Tensor) -> tuple[tuple[int, int], bool]:
        """The latent grid and whether any entity is marked, read on the host once per pair of tensors given."""
        last = self._geometry
        if last is not None and last[0] is img_ids and last[1] is entity_mask:
            return last[2], last[3]
        gh_gw = img_ids[:, 1:].max(dim=0).values.to(torch.int64) + 1
        grid = (int(gh_gw[0]), int(gh_gw[1]))
        on = bool(entity_mask.any())
        # The tensors are kept (small): their identity is the cache key, and a kept tensor's id cannot be reused.
        self._geometry = (img_ids, entity_mask, grid, on)
        return grid, on

    @torch.no_grad()
    def __call__(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        hidden = inputs["hidden_states"]
        grid, on = self._read_geometry(inputs["img_ids"], inputs["entity_mask"])
        history = inputs["history"]
        guidance = inputs.get("guidance") if self.transformer.config.guidance_embeds else None
        args = (
            hidden.to(self.dtype),
            inputs["encoder_hidden_states"].to(self.dtype),
            inputs["pooled_projections"].to(self.dtype),
            inputs["timestep"].to(self.dtype),
            inputs["img_ids"],
            inputs["txt_ids"],
            guidance,
            inputs["entity_mask"].to(torch.bool),
            # Copies: the caller's tensors stay untouched whatever the step does with its inputs.
            history.to(torch.float32).clone(),
            inputs["step"].to(torch.int64).reshape(()).clone(),
        )
        key = (on, grid, tuple(hidden.shape), tuple(args[1].shape))
        first = self.compiled and key not in self._shapes_seen
        tick = time.perf_counter()
        with allocation_errors_as(BackendError, f"the torch backend on {self.device}"):
            noise_pred, new_history = self._step(*args, grid=grid, deleaker_on=on)
        if self.compiled:
            # A CUDA graph's outputs live in its memory pool and are overwritten by its next replay.
            noise_pred, new_history = noise_pred.clone(), new_history.clone()
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # once per shape: the first call's time includes its compile
            self.first_call_seconds += time.perf_counter() - tick
            self._shapes_seen.add(key)
        return noise_pred, (history if not on else new_history)


class OnnxRuntimeBackend:
    """A transformer graph in standard ONNX (DeLeaker decomposed, float32 on the CPU) in an ONNX Runtime session.

    The graph comes from the runtime's ONNX cache (`deleaker.runtime.onnx_cache`): a model's export or the portable
    form of an engine directory's ONNX. The session is made by `deleaker.export.ort_session.make_session`, which refuses
    graphs with ``DeLeakerAttention`` nodes (ONNX Runtime would run them in Python, where an error aborts the
    process); its inputs and outputs are checked against the contract ``io`` on load, and the contract and knobs
    (``config``, when given) the graph records against ``io`` and ``config``. Feeds are cast to the
    contract's dtypes (`deleaker.export.ort_session.session_feeds`). Ctrl-C stops a run between two nodes
    (`deleaker.export.ort_interrupt.run_interruptible`). CPU by default; ``providers`` as ONNX Runtime takes them.
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | Path,
        io: Any,
        *,
        providers: Optional[list[str]] = None,
        config: Optional[DeLeakerConfig] = None,
    ) -> None:
        try:
            ort_session = importlib.import_module("deleaker.export.ort_session")
            self._run = importlib.import_module("deleaker.export.ort_interrupt").run_interruptible
        except ImportError as exc:  # onnx / onnxruntime missing
            raise BackendError(
                f"the onnxruntime backend needs the [onnx] extra (pip install 'deleaker-trt[onnx]'): {exc}"
            ) from exc
        self.path = Path(onnx_path)
        self.io = io
        self._feeds = ort_session.session_feeds
        try:
            self.session = ort_session.make_session(self.path, providers=providers)
            ort_session.check_session_contract(self.session, io, str(self.path), config)
        except DeLeakerError as exc:
            raise BackendError(f"ONNX Runtime cannot use {self.path}: {exc}") from exc
        except Exception as exc:  # onnxruntime raises its own types for a corrupt or unsupported graph
            raise BackendError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        self.device = torch.device("cpu")
        self.dtype = io.spec("noise_pred").torch_dtype

    def __call__(self, inputs: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        feeds = self._feeds(self.io, {name: inputs[name] for name in self.io.input_names})
        try:
            noise_pred, history = self._run(self.session, self.io.output_names, feeds)
        except DeLeakerError:
            raise
        except Exception as exc:  # onnxruntime's own error types (an allocation failure, a node that fails)
            raise BackendError(f"ONNX Runtime failed on {self.path.name}: {exc}") from exc
        return torch.from_numpy(noise_pred), torch.from_numpy(history)
