"""Rotary frequencies with context-extension scaling, computed as Hugging Face computes them.

``RopeScaling`` is a small value holding one ``rope_parameters`` entry of a Hugging Face config
(``rope_type``: default, linear, dynamic, yarn, llama3). ``inv_freq`` returns the fp32 inverse
frequencies [D/2] and the factor applied to cos and sin (YaRN's attention factor, 1.0 otherwise),
following ``transformers.modeling_rope_utils`` line by line — the same fp32 operations in the same
order, so imported models' angles equal theirs bit for bit before the position product:

- linear (kaiokendev): inv_freq / factor.
- dynamic NTK (bloc97, emozilla): for a sequence longer than ``max_position_embeddings`` the base
  grows to base · (factor·L/max − (factor−1))^(D/(D−2)), L = the sequence length.
- yarn (Peng et al. 2023, arXiv:2309.00071): a linear ramp between interpolated and extrapolated
  frequencies over the dimensions whose wavelengths lie between beta_fast and beta_slow rotations of
  the original context, and cos/sin scaled by the attention factor 0.1·ln(factor) + 1 (or mscale's).
- llama3 (Llama 3.1): frequencies with wavelengths beyond original/low_freq_factor divided by
  factor, those shorter than original/high_freq_factor kept, a smooth blend between.

The model keeps the plain ``model.attention.rotary_angles`` path whenever ``rope_type`` is default
(its fp64 frequencies are what models trained here have always used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    max_position_embeddings: int = 2048  # dynamic: the length past which the base grows
    original_max_position_embeddings: int | None = None  # yarn, llama3: the pretraining context
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float | None = None  # yarn (None: 32)
    beta_slow: float | None = None  # yarn (None: 1)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn (None: from factor and mscale)
    truncate: bool = True  # yarn

    def validate(self) -> RopeScaling:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"model.rope_scaling.rope_type: must be one of {', '.join(ROPE_TYPES)}; "
                             f"got {self.rope_type!r}")
        if self.rope_type != "default" and not self.factor > 0:
            raise ValueError(f"model.rope_scaling.factor: must be > 0, got {self.factor!r}")
        if self.rope_type in ("yarn", "llama3") and not (self.original_max_position_embeddings or 0) >= 1:
            raise ValueError(f"model.rope_scaling.original_max_position_embeddings: {self.rope_type} needs the "
                             f"pretraining context length (>= 1), got {self.original_max_position_embeddings!r}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"model.rope_scaling.high_freq_factor: must be > low_freq_factor="
                             f"{self.low_freq_factor}, got {self.high_freq_factor}")
        return self


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _yarn(dim: int, base: float, r: RopeScaling) -> tuple[torch.Tensor, float]:
    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    factor, att = r.factor, r.attention_factor
    if att is None:
        att = (float(get_mscale(factor, r.mscale) / get_mscale(factor, r.mscale_all_dim))
               if r.mscale and r.mscale_all_dim else get_mscale(factor))
    beta_fast, beta_slow = r.beta_fast or 32, r.beta_slow or 1

    def correction_dim(rotations):  # the dimension whose wavelength fits ``rotations`` times in the context
        return (dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as Hugging Face: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, att


def _llama3(dim: int, base: float, r: RopeScaling) -> torch.Tensor:
    inv = _base_inv_freq(dim, base)
    old = r.original_max_position_embeddings
    low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / r.factor, inv)
    smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inv_freq(head_dim: int, theta: float, r: RopeScaling, seq_len: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] fp32 on CPU, cos/sin factor) for a sequence of ``seq_len``."""
    if r.rope_type == "linear":
        return _base_inv_freq(head_dim, theta) / r.factor, 1.0
    if r.rope_type == "dynamic":
        length = max(seq_len, r.max_position_embeddings)
        base = theta * ((r.factor * length / r.max_position_embeddings) - (r.factor - 1)) ** (head_dim / (head_dim - 2))
        return _base_inv_freq(head_dim, base), 1.0
    if r.rope_type == "yarn":
        return _yarn(head_dim, theta, r)
    if r.rope_type == "llama3":
        return _llama3(head_dim, theta, r), 1.0
    return _base_inv_freq(head_dim, theta), 1.0


def scaled_rotary_angles(positions: torch.Tensor, head_dim: int, theta: float, r: RopeScaling,
                         seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [..., T, head_dim/2] fp32, times the attention factor (as Hugging Face's
    ``attention_scaling``); the product with the positions is fp64 as in ``rotary_angles``."""
    inv, factor = inv_freq(head_dim, theta, r, seq_len)
    ang = (positions.to(torch.float64)[..., None] * inv.to(positions.device, torch.float64)).float()  # (..., T, D/2)
    return ang.cos() * factor, ang.sin() * factor
