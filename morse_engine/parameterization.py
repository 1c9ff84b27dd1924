"""The model's parameterisation, written once: what the backbone sees and what its output means.

ComfyUI (and k-diffusion) sample in sigma space: the sampler holds x = x0 + sigma * noise, the
backbone sees the scaled input x / sqrt(sigma^2 + 1) and the nearest discrete timestep, and
returns eps or v ("native" prediction), from which denoised = x - sigma * eps. Classifier-free
guidance mixes the cond and uncond estimates as u + w (c - u). Flow models (ComfyUI's ``CONST``: SD3, Flux,
Wan, the reference DiT) hold x = (1 - sigma) x0 + sigma noise instead, see x itself and predict the velocity
(:class:`FlowSchedule`). Every other module of the pack that needs one of these formulas calls it from here.
"""
from __future__ import annotations

import torch

import math

PREDICTIONS = ("eps", "v", "x0")  # what a discrete (sigma-space) model may predict; flow models predict "flow"


def scale_input(x, sigma):
    """What the backbone sees of the sampler's x at ``sigma`` (ComfyUI's ``calculate_input``)."""
    return x / (sigma**2 + 1) ** 0.5


def unscale_input(x_scaled, sigma):
    """The sampler's x from the backbone's scaled input (the inverse of :func:`scale_input`)."""
    return x_scaled * (sigma**2 + 1) ** 0.5


def denoised_from_eps(x, sigma, eps):
    """The clean estimate implied by an eps estimate at (x, sigma)."""
    return x - sigma * eps


def step_at(sigmas, sigma: float) -> int:
    """The step at or above ``sigma`` of a descending schedule (``sigmas`` has steps + 1 entries): a call between
    two steps (second-order samplers) belongs to the earlier one."""
    step, tol = 0, _sigma_tolerance(sigma)
    for i in range(len(sigmas) - 1):
        if sigmas[i] + tol < sigma:
            break
        step = i
    return step


def on_step(sigmas, step: int, sigma: float) -> bool:
    """Whether ``sigma`` is the schedule's own sigma of ``step`` (not a call between steps)."""
    return abs(sigmas[step] - sigma) <= _sigma_tolerance(sigma)


def _sigma_tolerance(sigma: float) -> float:
    # a sigma that went through float32 on its way to the model still names its step
    return 1e-5 * max(abs(sigma), 1e-3)


def to_eps(x_scaled, sigma, z, prediction: str):
    """The eps implied by a native estimate ``z`` at the scaled input ``x_scaled``.

    V_PREDICTION's denoised implies eps = (x_scaled * sigma + v) / sqrt(sigma^2 + 1). The map is
    affine in ``z``, so guiding v and then converting equals guiding eps.
    """
    if prediction == "eps":
        return z
    if prediction == "v":
        return (x_scaled * sigma + z) / (sigma**2 + 1) ** 0.5
    if prediction == "x0":  # ComfyUI's X0: denoised = z
        return (unscale_input(x_scaled, sigma) - z) / sigma
    raise ValueError(f"prediction {prediction!r} is not one of {PREDICTIONS}; the pack supports eps, v and x0 models "
                     "(flow models: FlowSchedule)")


def guidance(cond, uncond, scale):
    """Classifier-free guidance: u + w (c - u), what the sampler steps with."""
    return uncond + scale * (cond - uncond)


def cfg_combine(z: torch.Tensor, scale) -> torch.Tensor:
    """:func:`guidance` of a batch laid out as [cond half, uncond half] (how CFG batches reach the model)."""
    cond, uncond = z.chunk(2)
    return guidance(cond, uncond, scale)


class _SigmaTable:
    """A schedule's ascending ``sigmas`` table, as ComfyUI's model_sampling registers it."""

    sigmas: torch.Tensor

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])


class DiscreteSchedule(_SigmaTable):
    """ComfyUI's ``ModelSamplingDiscrete``: the sigma of each of a discrete model's timesteps.

    ``sigmas[t]`` for t = 0..T-1 ascend; :meth:`timestep` is the nearest discrete timestep of a
    sigma in log space (as ComfyUI feeds the model), :meth:`sigma` interpolates back.
    """

    def __init__(self, sigmas: torch.Tensor, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction {prediction!r} is not one of {PREDICTIONS}")
        self.sigmas = sigmas.detach().float().cpu()
        self.log_sigmas = self.sigmas.log()
        self.prediction = prediction

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, prediction: str = "eps") -> "DiscreteSchedule":
        return cls((((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float(), prediction)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Nearest discrete timestep of ``sigma`` (as ComfyUI does)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        dists = sigma.log().reshape(-1)[None] - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).float().reshape(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32).clamp(0, len(self.sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's ``percent_to_sigma``: the sigma a fraction of the way down the timesteps (0: above the top)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * (len(self.sigmas) - 1))))

    def initial_latent(self, noise, sigma_max):
        # ComfyUI scales pure noise by sqrt(1 + sigma^2) when sampling from the top of the schedule
        return noise * (1 + sigma_max**2) ** 0.5

    def model_input(self, x, sigma):
        """What the backbone sees of the sampler's x (ComfyUI's ``calculate_input``)."""
        return scale_input(x, sigma)

    def denoised(self, x, sigma, z, prediction=None):
        """The clean estimate from the backbone's native output ``z`` at the sampler's (x, sigma)."""
        return denoised_from_eps(x, sigma, to_eps(scale_input(x, sigma), sigma, z, prediction or self.prediction))


def shifted_time(shift: float, t):
    """SD3's time shift: the flow sigma of time t in [0, 1] (``time_snr_shift``; Flux's ``flux_time_shift`` with
    mu is this with shift = e^mu)."""
    return shift * t / (1 + (shift - 1) * t)


class FlowSchedule(_SigmaTable):
    """ComfyUI's flow sampling (``CONST`` with ``ModelSamplingDiscreteFlow`` / ``ModelSamplingFlux``): the sampler
    holds x = (1 - sigma) x0 + sigma noise, the backbone sees x itself at timestep sigma * multiplier and returns
    the velocity v = noise - x0, so denoised = x - sigma v. ``sigmas`` are the schedule's ``timesteps`` sigmas,
    ascending, as ComfyUI registers them."""

    prediction = "flow"

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, timesteps: int = 1000):
        self.shift, self.multiplier = float(shift), float(multiplier)
        self.sigmas = shifted_time(self.shift, torch.arange(1, timesteps + 1, dtype=torch.float32) / timesteps)

    @classmethod
    def flux(cls, mu: float = 1.15) -> "FlowSchedule":
        """``ModelSamplingFlux`` (Flux, Chroma, the reference DiT): its "shift" is mu, timestep = sigma."""
        return cls(shift=math.exp(mu), multiplier=1.0, timesteps=10000)

    def to_dict(self) -> dict:
        return {"kind": "flow", "shift": self.shift, "multiplier": self.multiplier, "timesteps": len(self.sigmas)}

    def timestep(self, sigma):
        return torch.as_tensor(sigma, dtype=torch.float32) * self.multiplier

    def sigma(self, timestep):
        return shifted_time(self.shift, torch.as_tensor(timestep, dtype=torch.float32) / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's ``percent_to_sigma`` of the flow samplings: the shifted time 1 - percent."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(shifted_time(self.shift, 1.0 - percent))

    def initial_latent(self, noise, sigma_max):
        # CONST's noise scaling of an empty latent: sigma * noise + (1 - sigma) * 0
        return noise * sigma_max

    def model_input(self, x, sigma):
        return x

    def denoised(self, x, sigma, z, prediction=None):
        if prediction not in (None, "flow"):
            raise ValueError(f"a flow schedule's model predicts the velocity, not {prediction!r}")
        return x - sigma * z


def schedule_from_dict(d: dict):
    """A schedule from the dict a weights file stores (``FlowSchedule.to_dict``; anything else: SD's discrete)."""
    if d.get("kind") == "flow":
        return FlowSchedule(d["shift"], d["multiplier"], d["timesteps"])
    raise ValueError(f"schedule {d!r} is not a flow schedule; discrete schedules are built from their betas")
