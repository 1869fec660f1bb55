"""FLUX.1's sampling schedule and latent layout, as small pure functions.

The schedule is diffusers' own: ``FlowMatchEulerDiscreteScheduler`` set as ``FluxPipeline`` sets it (FLUX.1-dev:
dynamic shifting, exponential time shift, ``calculate_shift``; FLUX.1-schnell: a fixed shift); the runtime keeps
its numbers (`FlowMatchSchedule`) and steps with them (`euler_step`, the scheduler's arithmetic). The latent layout matches ``FluxPipeline``'s helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from deleaker.errors import ConfigError

Tensor = torch.Tensor


@dataclass(frozen=True)
class ShiftConfig:
    """The timestep shift of a FLUX scheduler config: FLUX.1-dev's resolution-dependent (dynamic) shift by default;
    ``use_dynamic_shifting=False`` is a fixed ``shift`` at every resolution (FLUX.1-schnell: ``shift = 1``, none)."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    num_train_timesteps: int = 1000
    use_dynamic_shifting: bool = True
    #: The fixed shift, used only without dynamic shifting (FLUX.1-dev's config says 3.0 and never uses it).
    shift: float = 3.0

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> "ShiftConfig":
        """Read the fields from a diffusers scheduler config (missing keys keep FLUX.1-dev's values)."""
        dynamic = bool(config.get("use_dynamic_shifting", True))
        if dynamic and config.get("time_shift_type", "exponential") != "exponential":
            raise ConfigError(f"unsupported time_shift_type {config.get('time_shift_type')!r}; allowed: 'exponential'")
        for flag in (
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "stochastic_sampling",
            "shift_terminal",
        ):
            if config.get(flag):
                raise ConfigError(f"unsupported scheduler option {flag}={config[flag]!r}")
        defaults = cls()
        shift = config.get("shift", defaults.shift)
        # Used without dynamic shifting only; there a NaN, infinite or non-positive shift makes the sigmas NaN or
        # out of [0, 1]. (abs() < inf before the sign: NaN fails it.)
        if not dynamic and (
            isinstance(shift, bool) or not isinstance(shift, (int, float)) or not abs(shift) < float("inf") or shift <= 0
        ):
            raise ConfigError(f"the scheduler's shift must be a finite number > 0, got {shift!r:.40}")
        return cls(
            base_shift=float(config.get("base_shift", defaults.base_shift)),
            max_shift=float(config.get("max_shift", defaults.max_shift)),
            base_image_seq_len=int(config.get("base_image_seq_len", defaults.base_image_seq_len)),
            max_image_seq_len=int(config.get("max_image_seq_len", defaults.max_image_seq_len)),
            num_train_timesteps=int(config.get("num_train_timesteps", defaults.num_train_timesteps)),
            use_dynamic_shifting=dynamic,
            shift=float(shift) if not dynamic else defaults.shift,
        )


def calculate_shift(image_seq_len: int, shift: ShiftConfig = ShiftConfig()) -> float:
    """``mu``: linear in the number of image tokens, from ``base_shift`` at 256 tokens to ``max_shift`` at 4096
    (FluxPipeline's own `diffusers.pipelines.flux.pipeline_flux.calculate_shift`)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_calculate_shift

    return flux_calculate_shift(
        image_seq_len, shift.base_image_seq_len, shift.max_image_seq_len, shift.base_shift, shift.max_shift
    )


@dataclass(frozen=True)
class FlowMatchSchedule:
    """The Euler schedule of one call.

    Attributes:
        sigmas: ``(steps + 1,)`` float32, decreasing from about 1 to a final 0.
        timesteps: ``(steps,)`` float32, ``sigmas[:-1] * num_train_timesteps`` (the transformer gets ``t / 1000``).
    """

    sigmas: np.ndarray
    timesteps: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def flux_schedule(num_steps: int, image_seq_len: int, shift: ShiftConfig = ShiftConfig()) -> FlowMatchSchedule:
    """FLUX's schedule, from ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/steps, steps),
    mu=calculate_shift(...))`` as ``FluxPipeline`` calls it: ``(steps + 1)`` sigmas ending at 0 and ``steps``
    timesteps, float32. Without dynamic shifting (FLUX.1-schnell) the scheduler applies its fixed ``shift`` and
    ignores ``mu``, as in ``FluxPipeline``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"steps must be a positive int, got {num_steps!r}")
    from diffusers import FlowMatchEulerDiscreteScheduler

    # The scheduler FluxPipeline uses, set as FluxPipeline sets it (float64 linspace of sigmas, mu from the size).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=shift.num_train_timesteps,
        use_dynamic_shifting=shift.use_dynamic_shifting,
        shift=shift.shift,
        base_shift=shift.base_shift,
        max_shift=shift.max_shift,
        base_image_seq_len=shift.base_image_seq_len,
        max_image_seq_len=shift.max_image_seq_len,
        time_shift_type="exponential",
    )
    scheduler.set_timesteps(
        sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=calculate_shift(image_seq_len, shift), device="cpu"
    )
    sigmas, timesteps = scheduler.sigmas.to(torch.float32), scheduler.timesteps.to(torch.float32)
    return FlowMatchSchedule(sigmas=sigmas.numpy(), timesteps=timesteps.numpy())


def euler_step(latents: Tensor, noise_pred: Tensor, schedule: FlowMatchSchedule, index: int) -> Tensor:
    """One Euler step ``x + (sigma[i+1] - sigma[i]) * v``, in float32, cast back to ``noise_pred``'s dtype.

    ``latents``, ``noise_pred``: ``(B, Nimg, C)``.
    """
    sigmas = torch.from_numpy(schedule.sigmas).to(latents.device)
    dt = sigmas[index + 1] - sigmas[index]
    return (latents.to(torch.float32) + dt * noise_pred).to(noise_pred.dtype)


def image_ids(grid: tuple[int, int]) -> Tensor:
    """``(gh * gw, 3)`` float32 position ids of the image tokens: ``(0, row, col)``, row-major (FluxPipeline's)."""
    from diffusers import FluxPipeline

    gh, gw = grid
    return FluxPipeline._prepare_latent_image_ids(1, gh, gw, torch.device("cpu"), torch.float32)


def text_ids(text_len: int) -> Tensor:
    """``(T, 3)`` float32 zeros: FLUX gives text tokens no position."""
    return torch.zeros(text_len, 3)


def pack_latents(latents: Tensor) -> Tensor:
    """``(B, C, 2*gh, 2*gw)`` VAE latents -> ``(B, gh*gw, 4*C)`` tokens of 2x2 patches (FluxPipeline's packing)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(B, gh*gw, 4*C)`` tokens -> ``(B, C, 2*gh, 2*gw)`` VAE latents (inverse of `pack_latents`; FluxPipeline's
    unpacking, given the latent size with a scale factor of 1)."""
    from diffusers import FluxPipeline

    gh, gw = grid
    return FluxPipeline._unpack_latents(tokens, 2 * gh, 2 * gw, 1)


def initial_latents(
    seed: int, batch: int, channels: int, grid: tuple[int, int], *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The packed starting noise ``(B, gh*gw, 4*channels)`` of ``FluxPipeline`` given
    ``generator=torch.Generator("cpu").manual_seed(seed)``: drawn on the CPU, so it is the same on every device.
    """
    gh, gw = grid
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn((batch, channels, gh * 2, gw * 2), generator=generator, dtype=dtype)
    return pack_latents(noise)
