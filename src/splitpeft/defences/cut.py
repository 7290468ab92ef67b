"""Defences a device applies to what it sends across the cut, and what each one costs or proves.

Three named options (`privacy.*`), each measured by the privacy meter (`privacy/meter.py`):

- **Gaussian release** (`privacy.noise_multiplier` sigma, `privacy.clip_norm` C): every token's
  vector x_t (d,) that the device sends up (the cut activations; with `privacy.gradient_clip_norm`
  C_g > 0 also the head gradient of U-shaped split and dlora, C_g in place of C) is clipped and
  noised,

      x_t -> x_t min(1, C / ||x_t||_2) + sigma C xi_t,      xi_t ~ N(0, I_d)

  so one release of one clipped vector is the Gaussian mechanism with L2 sensitivity 2C (any
  clipped vector replaced by any other) and noise sigma C; per sequence, all T vectors change
  together, so the sensitivity is 2C sqrt(T). Its (epsilon, delta) over every release of the run
  comes from the dp-accounting library (`defences/accounting.py`), in every run's report
  (`privacy_accounting`). Backward goes through the clipping (noise is additive).
- **NoPeek** (`privacy.nopeek_weight` alpha; Vepakomma et al., 2020): the device adds
  alpha dCor(E, Z) to its loss, the distance correlation between the input embeddings E and the
  cut activations Z of the same tokens (rows: up to `NOPEEK_TOKENS` real positions of the batch),
  so its adapters learn activations that say less about the tokens. It needs adapters before the
  cut (split at k >= 1, or dlora's hybrid).
- **Labels on the device** (U-shaped split, `placement.labels_on_device`, the default) and
  **dlora's hybrid** (`placement.dlora_device_blocks`) are placements, not transforms: see
  `placements/split.py` and `dlora/placement.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NOPEEK_TOKENS = 256  # positions per step in the dCor penalty: its cost is O(n^2 d)


def clip_rows(x: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """(..., d) -> (..., d): each row scaled to L2 norm at most `clip_norm` (differentiable)."""
    norms = x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (..., 1)
    return x * (clip_norm / norms).clamp(max=1.0).to(x.dtype)


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation dCor(x, y) in [0, 1] of rows x (n, p), y (n, q) (Szekely et al., 2007).

    a_ij = ||x_i - x_j||, double-centred A = a - row mean - column mean + grand mean (b, B alike);
    dCov^2 = mean(A * B); dCor^2 = dCov^2(x, y) / sqrt(dCov^2(x, x) dCov^2(y, y)).
    """

    def centred(z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        d = torch.cdist(z, z)  # (n, n)
        return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()

    a, b = centred(x), centred(y)
    xy, xx, yy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return (xy.clamp_min(0) / (xx * yy).sqrt().clamp_min(1e-12)).sqrt()


@dataclass
class Defence:
    """A device's defences: `release` what goes up, `penalty` for its loss. Off by default.

    `seed` seeds the noise (one generator per torch device), so a run is reproducible.
    """

    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    gradient_clip_norm: float = 0.0
    nopeek_weight: float = 0.0
    clip_per: str = "token"  # or "sequence": the clip norm bounds each row's whole (T, d) release
    seed: int = 0
    _generators: dict[torch.device, torch.Generator] = field(default_factory=dict, repr=False)

    @property
    def noisy(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def active(self) -> bool:
        return self.noisy or self.clip_norm > 0 or self.nopeek_weight > 0

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def release(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) activations -> what is sent: clipped to `clip_norm` per token (`clip_per`
        "sequence": each row's whole (T, d) to Frobenius norm C), plus N(0, (sigma C)^2) noise per
        entry; `x` itself when both are off."""
        if self.clip_norm <= 0:
            return x
        if self.clip_per == "sequence":
            released = clip_rows(x.reshape(x.shape[0], -1), self.clip_norm).reshape(x.shape)
        else:
            released = clip_rows(x, self.clip_norm)
        if self.noisy:
            noise = torch.randn(x.shape, generator=self._generator(x.device), device=x.device, dtype=torch.float32)
            released = released + (noise * (self.noise_multiplier * self.clip_norm)).to(x.dtype)
        return released

    def release_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient the device sends up (U-shaped split's and dlora's head gradient, (B, T, d)):
        each token's row clipped to `gradient_clip_norm` C_g and N(0, (sigma C_g)^2) added; as is
        when C_g is 0. Its own C, since a gradient row is orders of magnitude smaller than a state."""
        if self.gradient_clip_norm <= 0:
            return grad
        return Defence(self.noise_multiplier, self.gradient_clip_norm, clip_per=self.clip_per, seed=self.seed,
                       _generators=self._generators).release(grad)

    def penalty(self, embedded: torch.Tensor, cut: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """alpha dCor(E, Z) over up to NOPEEK_TOKENS real positions (mask (B, T)) of the input
        embeddings `embedded` and the cut activations `cut` (B, T, d); None when off or when
        nothing before the cut trains (`cut` needs no gradient)."""
        if self.nopeek_weight <= 0 or not cut.requires_grad:
            return None
        rows = mask.reshape(-1).nonzero().squeeze(1)  # (n,)
        if rows.numel() > NOPEEK_TOKENS:
            pick = torch.randperm(rows.numel(), generator=self._generator(torch.device("cpu")))[:NOPEEK_TOKENS]
            rows = rows[pick.to(rows.device)]
        e = embedded.reshape(-1, embedded.shape[-1])[rows].detach()
        z = cut.reshape(-1, cut.shape[-1])[rows]
        return self.nopeek_weight * distance_correlation(e, z)

    def describe(self) -> dict[str, float | bool | str]:
        return {"noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "gradient_clip_norm": self.gradient_clip_norm, "nopeek_weight": self.nopeek_weight, "clip_per": self.clip_per}


NO_DEFENCE = Defence()
