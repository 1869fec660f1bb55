"""`RuntimeSpec`: where a job's runtime comes from (an engine folder xor a model) with the runtime's options,
checked when made with everything that needs no model (the CLI's fast checks), opened by `RuntimeSpec.open`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from deleaker.config import DeLeakerConfig
from deleaker.entities import DEFAULT_MAX_ENTITIES
from deleaker.errors import ConfigError
from deleaker.export.limits import check_max_entities, check_text_len
from deleaker.lora import check_loras
from deleaker.models import FLUX2_RUNTIME_MESSAGE, check_model_source, is_flux2_model

from .backend_options import check_backend_options, check_flux2_options
from .defaults import BACKENDS, DEFAULT_MODEL_BACKEND, DEFAULT_TEXT_LEN

if TYPE_CHECKING:  # the runtime (torch, diffusers) is imported when a spec is opened, after every cheap check
    from .runtime import DeLeakerRuntime

#: Devices a runtime can generate on: the CPU or a CUDA GPU (torch's other device types cannot run the model).
DEVICE_PATTERN = re.compile(r"(cpu|cuda)(:\d{1,3})?")


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

    def refuse_flux2_masks(self, save_masks: bool) -> None:
        """Raise `ConfigError` for ``save_masks`` on a FLUX.2 folder: its runtime drives diffusers' FLUX.2 pipeline,
        whose processors keep the entity masks they form, so an overlay would wrongly say that DeLeaker did not act."""
        if save_masks and self.model is not None and is_flux2_model(self.model):
            raise ConfigError(
                f"--save-masks (the entity masks' overlay) is not available for a FLUX.2 model ({self.model}) so far: "
                "its runtime does not expose the masks DeLeaker formed; drop --save-masks"
            )

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
