"""The I/O contract of the exported FLUX transformer: one object drives export, engine build and runtime buffers.

`FluxTransformerIO` lists every graph input and output of the DeLeaker FLUX transformer (names, dtypes, shapes
with the dynamic batch axis, min/opt/max profile shapes) and makes sample inputs. Engines and runtimes read names,
dtypes and shapes from it (or from its JSON form, `FluxTransformerIO.to_dict`, stored next to the artifacts); they
never hard-code them.

**[decision]** Only the batch axis is dynamic. Resolution (hence the token grid, a node attribute), the text
length ``T`` and ``E_max`` are fixed per export: one ONNX file / engine per resolution.

Graph inputs, in the order of `FluxTransformerIO.input_names` (also the positional order of
``FluxDeLeakerWrapper.forward``)::

    hidden_states          (B, Nimg, C_in)        model dtype   packed latents, Nimg = gh * gw
    encoder_hidden_states  (B, T, joint_dim)      model dtype   T5 prompt embedding (FLUX.2: the text encoder's)
    pooled_projections     (B, pooled_dim)        model dtype   CLIP pooled embedding (FLUX.1 only)
    timestep               (B,)                   float32       sigma in [0, 1] (the model multiplies by 1000)
    img_ids                (Nimg, A)              float32       A = 3 RoPE axes for FLUX.1, 4 for FLUX.2
    txt_ids                (T, A)                 float32
    guidance               (B,)                   float32       only when the model has guidance_embeds
    entity_mask            (E_max, T)             int32         0/1, row e marks entity e's text tokens
    history                (B, E_max, Nimg)       float32       DeLeaker running mean (zeros at step 0)
    step                   ()                     int32         denoising step index

Graph outputs: ``noise_pred (B, Nimg, C_out)`` in the model dtype and ``history_out (B, E_max, Nimg)`` float32
(feed it back as ``history`` at the next step).

Integer inputs are int32 (TensorRT's native integer type); the graph casts them to what the node takes
(``entity_mask`` -> bool, ``step`` -> int64: what the ``DeLeakerAttention`` node and the kernels' ABI take, one
byte per mask cell and an int64 step).

Over 400 lines, one job: the contract's one class (with its tensor spec), whose table above is a tenth of the
module; export, build and runtime all read it, so nothing here is split off from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from deleaker.config import MODEL_FAMILIES, model_family, num_joint_blocks
from deleaker.entities import DEFAULT_MAX_ENTITIES
from deleaker.errors import ConfigError, ShapeError

#: Name of the dynamic batch axis in shapes and in the ONNX graph.
BATCH_AXIS = "batch"

#: Element types the contract uses, by name (the ONNX/numpy spelling; ``bfloat16`` has no numpy dtype).
_TORCH_DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}

#: Precisions a transformer may be exported in (the float inputs and ``noise_pred`` use it).
MODEL_DTYPES = ("float32", "float16", "bfloat16")

Dim = Union[int, str]


def dtype_name(dtype: Union[str, torch.dtype]) -> str:
    """The contract's name of a dtype (``torch.float16`` or ``"fp16"``-like spellings -> ``"float16"``)."""
    if isinstance(dtype, torch.dtype):
        for name, value in _TORCH_DTYPES.items():
            if value == dtype:
                return name
        raise ConfigError(f"dtype {dtype} is not used by the contract; allowed: {sorted(_TORCH_DTYPES)}")
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower())
    if name not in _TORCH_DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; allowed: {sorted(_TORCH_DTYPES)} (or fp32/fp16/bf16)")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: ``name``, element type ``dtype`` (contract name) and ``shape``.

    A ``str`` entry of ``shape`` is the dynamic batch axis (`BATCH_AXIS`); every other entry is fixed.
    """

    name: str
    dtype: str
    shape: Tuple[Dim, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype (bfloat16 has none: raises `ConfigError`; feed such inputs as torch tensors)."""
        if self.dtype == "bfloat16":
            raise ConfigError(f"{self.name} is bfloat16, which numpy has no dtype for")
        return np.dtype(self.dtype)

    @property
    def dynamic_axes(self) -> Tuple[int, ...]:
        """Indices of the dynamic axes (only the batch axis, when present)."""
        return tuple(i for i, d in enumerate(self.shape) if isinstance(d, str))

    def concrete(self, batch: int) -> Tuple[int, ...]:
        """The shape at batch size ``batch``."""
        return tuple(batch if isinstance(d, str) else int(d) for d in self.shape)


@dataclass(frozen=True)
class FluxTransformerIO:
    """The I/O contract of one export of a ``FluxTransformer2DModel`` with DeLeaker attention.

    Build it with `FluxTransformerIO.from_transformer` (or `from_config` on a transformer's config mapping).

    Attributes:
        in_channels, out_channels: ``C_in`` / ``C_out`` of the packed latents (64 for FLUX.1).
        joint_attention_dim: T5 width (4096 for FLUX.1). pooled_projection_dim: CLIP pooled width (768).
        guidance_embeds: True for FLUX.1-dev (a ``guidance`` input), False for schnell.
        num_blocks: joint attentions per step (``num_layers + num_single_layers``; 57 for FLUX.1).
        height, width: image size in pixels; vae_scale_factor: 8 for FLUX.1 (the tiny model: 4).
        text_len: ``T`` (``max_sequence_length``: 256/512 for FLUX.1). max_entities: ``E_max``.
        batch_min, batch_opt, batch_max: the batch profile of the engine (and the export's sample batch is opt).
        dtype: the model's float dtype name (``float32``, ``float16`` or ``bfloat16``).
        family: ``"flux1"`` (``FluxTransformer2DModel``) or ``"flux2"`` (``Flux2Transformer2DModel``: no
            ``pooled_projections`` input, ``pooled_projection_dim`` 0, ids of 4 RoPE axes). Contracts stored before
            FLUX.2 have no such field and read as ``"flux1"``.
    """

    in_channels: int
    out_channels: int
    joint_attention_dim: int
    pooled_projection_dim: int
    guidance_embeds: bool
    num_blocks: int
    height: int
    width: int
    vae_scale_factor: int
    text_len: int
    max_entities: int
    batch_min: int = 1
    batch_opt: int = 1
    batch_max: int = 4
    dtype: str = "float32"
    family: str = "flux1"

    def __post_init__(self) -> None:
        if self.family not in MODEL_FAMILIES:
            raise ConfigError(f"FluxTransformerIO.family must be one of {MODEL_FAMILIES}, got {self.family!r:.40}")
        if self.family == "flux2" and self.pooled_projection_dim != 0:
            raise ConfigError(
                f"FluxTransformerIO.pooled_projection_dim must be 0 for FLUX.2 (it has no pooled projection), got "
                f"{self.pooled_projection_dim!r:.40}"
            )
        ints = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "joint_attention_dim": self.joint_attention_dim,
            **({"pooled_projection_dim": self.pooled_projection_dim} if self.family == "flux1" else {}),
            "num_blocks": self.num_blocks,
            "height": self.height,
            "width": self.width,
            "vae_scale_factor": self.vae_scale_factor,
            "text_len": self.text_len,
            "max_entities": self.max_entities,
            "batch_min": self.batch_min,
            "batch_opt": self.batch_opt,
            "batch_max": self.batch_max,
        }
        for name, value in ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"FluxTransformerIO.{name} must be a positive int, got {value!r}")
        if not isinstance(self.guidance_embeds, bool):
            raise ConfigError(f"FluxTransformerIO.guidance_embeds must be a bool, got {self.guidance_embeds!r}")
        if not self.batch_min <= self.batch_opt <= self.batch_max:
            raise ConfigError(
                f"batch profile must satisfy min <= opt <= max, got ({self.batch_min}, {self.batch_opt}, "
                f"{self.batch_max})"
            )
        patch = 2 * self.vae_scale_factor
        if self.height % patch or self.width % patch:
            raise ShapeError(
                f"height and width must be multiples of 2 * vae_scale_factor = {patch}, got {self.height}x{self.width}"
            )
        if self.dtype not in MODEL_DTYPES:
            raise ConfigError(f"FluxTransformerIO.dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")

    # --- construction -----------------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        height: int,
        width: int,
        text_len: int,
        max_entities: int = DEFAULT_MAX_ENTITIES,
        vae_scale_factor: int = 8,
        batch: Tuple[int, int, int] = (1, 1, 4),
        dtype: Union[str, torch.dtype] = "float32",
    ) -> "FluxTransformerIO":
        """The contract from a ``FluxTransformer2DModel`` or ``Flux2Transformer2DModel`` config
        (``transformer.config`` or its config.json dict; the family is read from it, `deleaker.config.model_family`).

        ``batch`` is ``(min, opt, max)``.
        """
        family = model_family(config)
        try:
            in_channels = int(config["in_channels"])
            out_channels = int(config.get("out_channels") or in_channels)
            num_blocks = num_joint_blocks(config)
            joint_dim = int(config["joint_attention_dim"])
            pooled_dim = int(config["pooled_projection_dim"]) if family == "flux1" else 0
            guidance = bool(config.get("guidance_embeds", False))
        except KeyError as exc:
            raise ConfigError(f"transformer config lacks {exc.args[0]!r}; is it a FluxTransformer2DModel?") from None
        if len(batch) != 3:
            raise ConfigError(f"batch must be (min, opt, max), got {batch!r}")
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            joint_attention_dim=joint_dim,
            pooled_projection_dim=pooled_dim,
            guidance_embeds=guidance,
            num_blocks=num_blocks,
            height=height,
            width=width,
            vae_scale_factor=vae_scale_factor,
            text_len=text_len,
            max_entities=max_entities,
            batch_min=batch[0],
            batch_opt=batch[1],
            batch_max=batch[2],
            dtype=dtype_name(dtype),
            family=family,
        )

    @classmethod
    def from_transformer(cls, transformer: torch.nn.Module, **kwargs: Any) -> "FluxTransformerIO":
        """`from_config` on ``transformer.config``; ``dtype`` defaults to the transformer's parameter dtype."""
        if "dtype" not in kwargs:
            kwargs["dtype"] = next(transformer.parameters()).dtype
        return cls.from_config(transformer.config, **kwargs)

    # --- derived sizes ----------------------------------------------------------------------------------------

    @property
    def grid(self) -> Tuple[int, int]:
        """``(gh, gw)``: the image token grid (2x2 latent patches, as ``FluxPipeline.prepare_latents``)."""
        patch = 2 * self.vae_scale_factor
        return self.height // patch, self.width // patch

    @property
    def image_tokens(self) -> int:
        """``Nimg = gh * gw``."""
        return self.grid[0] * self.grid[1]

    @property
    def rope_axes(self) -> int:
        """Columns of ``img_ids``/``txt_ids``: 3 RoPE axes for FLUX.1, 4 (t, h, w, l) for FLUX.2."""
        return 4 if self.family == "flux2" else 3

    # --- the tensors ------------------------------------------------------------------------------------------

    @property
    def inputs(self) -> Tuple[TensorSpec, ...]:
        """Graph inputs in order (the wrapper's positional order)."""
        b, n, t, e = BATCH_AXIS, self.image_tokens, self.text_len, self.max_entities
        specs = [
            TensorSpec("hidden_states", self.dtype, (b, n, self.in_channels)),
            TensorSpec("encoder_hidden_states", self.dtype, (b, t, self.joint_attention_dim)),
        ]
        if self.family == "flux1":
            specs.append(TensorSpec("pooled_projections", self.dtype, (b, self.pooled_projection_dim)))
        specs += [
            TensorSpec("timestep", "float32", (b,)),
            TensorSpec("img_ids", "float32", (n, self.rope_axes)),
            TensorSpec("txt_ids", "float32", (t, self.rope_axes)),
        ]
        if self.guidance_embeds:
            specs.append(TensorSpec("guidance", "float32", (b,)))
        specs += [
            TensorSpec("entity_mask", "int32", (e, t)),
            TensorSpec("history", "float32", (b, e, n)),
            TensorSpec("step", "int32", ()),
        ]
        return tuple(specs)

    @property
    def outputs(self) -> Tuple[TensorSpec, ...]:
        """Graph outputs in order."""
        b = BATCH_AXIS
        return (
            TensorSpec("noise_pred", self.dtype, (b, self.image_tokens, self.out_channels)),
            TensorSpec("history_out", "float32", (b, self.max_entities, self.image_tokens)),
        )

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def spec(self, name: str) -> TensorSpec:
        """The input or output named ``name`` (raises `ShapeError` listing the names otherwise)."""
        for s in self.inputs + self.outputs:
            if s.name == name:
                return s
        raise ShapeError(f"no tensor {name!r} in the contract; inputs: {self.input_names}, outputs: {self.output_names}")

    @property
    def dynamic_axes(self) -> Dict[str, Dict[int, str]]:
        """``{name: {axis: "batch"}}`` for every tensor with a batch axis (ONNX / ORT convention)."""
        return {s.name: {i: BATCH_AXIS for i in s.dynamic_axes} for s in self.inputs + self.outputs if s.dynamic_axes}

    def profile(self, name: str) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
        """``(min, opt, max)`` shapes of input ``name`` (a TensorRT optimisation profile entry)."""
        s = self.spec(name)
        return s.concrete(self.batch_min), s.concrete(self.batch_opt), s.concrete(self.batch_max)

    def profiles(self) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]:
        """`profile` of every input, in input order."""
        return {s.name: self.profile(s.name) for s in self.inputs}

    def check_batch(self, batch: int) -> None:
        """Raise `ShapeError` unless ``batch_min <= batch <= batch_max``."""
        if isinstance(batch, bool) or not isinstance(batch, int) or not self.batch_min <= batch <= self.batch_max:
            raise ShapeError(f"batch must be an int in [{self.batch_min}, {self.batch_max}] (the profile), got {batch!r}")

    def torch_dynamic_shapes(self) -> Dict[str, Dict[int, Any]]:
        """``dynamic_shapes`` for ``torch.export`` / ``torch.onnx.export(dynamo=True)``, keyed by input name.

        Every entry is None (all static) when ``batch_min == batch_max``. Trace with a sample batch of at least 2
        when the batch is dynamic: ``torch.export`` specialises a dimension whose sample size is 1.
        """
        if self.batch_min == self.batch_max:
            return {s.name: None for s in self.inputs}
        batch = torch.export.Dim(BATCH_AXIS, min=self.batch_min, max=self.batch_max)
        return {s.name: {i: batch for i in s.dynamic_axes} or None for s in self.inputs}

    # --- sample inputs ----------------------------------------------------------------------------------------

    def sample_inputs(
        self,
        batch: Optional[int] = None,
        *,
        seed: int = 0,
        step: int = 0,
        entity_mask: Optional[torch.Tensor] = None,
        device: Union[str, torch.device] = "cpu",
    ) -> Dict[str, torch.Tensor]:
        """Inputs for ``batch`` (default ``batch_opt``), in input order, deterministic in ``seed``.

        Latents and embeddings are standard normal, ``timestep``/``guidance`` are plausible values, the ids are the
        ones ``FluxPipeline`` makes (``img_ids[:, 1:]`` = row/column of the token, ``txt_ids`` = 0), the history is
        zeros. ``entity_mask`` defaults to two one-token entities (tokens 1 and 3 when ``T > 3``).
        """
        batch = self.batch_opt if batch is None else batch
        self.check_batch(batch)
        gen = torch.Generator().manual_seed(seed)
        fdt = _TORCH_DTYPES[self.dtype]
        gh, gw = self.grid
        t, e, n = self.text_len, self.max_entities, self.image_tokens

        # FLUX.1 and FLUX.2 both put the token's row and column in axes 1 and 2; FLUX.2's text tokens count along
        # axis 3 (Flux2Pipeline._prepare_text_ids), FLUX.1's are all 0.
        img_ids = torch.zeros(gh, gw, self.rope_axes)
        img_ids[..., 1] = torch.arange(gh)[:, None]
        img_ids[..., 2] = torch.arange(gw)[None, :]
        txt_ids = torch.zeros(t, self.rope_axes)
        if self.family == "flux2":
            txt_ids[:, 3] = torch.arange(t)
        if entity_mask is None:
            entity_mask = torch.zeros(e, t, dtype=torch.int32)
            for row, token in enumerate((1, 3)[: min(e, 2)]):
                entity_mask[row, min(token, t - 1)] = 1
        if tuple(entity_mask.shape) != (e, t):
            raise ShapeError(f"entity_mask must be (E_max, T) = {(e, t)}, got {tuple(entity_mask.shape)}")
        values = {
            "hidden_states": torch.randn(batch, n, self.in_channels, generator=gen).to(fdt),
            "encoder_hidden_states": torch.randn(batch, t, self.joint_attention_dim, generator=gen).to(fdt),
            "pooled_projections": torch.randn(batch, self.pooled_projection_dim, generator=gen).to(fdt),
            "timestep": torch.full((batch,), 0.75),
            "img_ids": img_ids.reshape(n, self.rope_axes),
            "txt_ids": txt_ids,
            "guidance": torch.full((batch,), 3.5),
            "entity_mask": entity_mask.to(torch.int32),
            "history": torch.zeros(batch, e, n),
            "step": torch.tensor(step, dtype=torch.int32),
        }
        return {s.name: values[s.name].to(device) for s in self.inputs}

    # --- serialisation ----------------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form: the fields plus the derived tensor lists (for manifests and non-Python readers)."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        if self.family == "flux1":
            # Stored FLUX.1 contracts (manifests, ONNX metadata, cache keys) stay as they were before FLUX.2.
            del fields["family"]
        return {
            **fields,
            "grid": list(self.grid),
            "inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.inputs],
            "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FluxTransformerIO":
        """Inverse of `to_dict` (derived entries are recomputed and checked against the stored ones).

        Raises `ConfigError` (or `ShapeError`) for anything that is not a contract: not a mapping, missing or
        unknown fields, wrong types, stored tensor lists that differ from the recomputed ones.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"an I/O contract must be a JSON object, got {type(data).__name__}")
        derived = ("grid", "inputs", "outputs")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__) - set(derived))
        required = [
            name
            for name, f in cls.__dataclass_fields__.items()
            if f.default is dataclasses.MISSING and name not in data
        ]
        if unknown or required:
            raise ConfigError(f"I/O contract fields: missing {required}, unknown {unknown}")
        io = cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})
        full = io.to_dict()
        for name in derived:
            if name in data and data[name] != full[name]:
                stored, computed = data[name], full[name]
                if isinstance(stored, list) and len(stored) == len(computed):  # name the first entry that differs
                    stored, computed = next((a, b) for a, b in zip(stored, computed) if a != b)
                raise ConfigError(
                    f"the I/O contract's stored {name} differ from its fields': {stored!r} where the fields give "
                    f"{computed!r}"
                )
        return io
