"""Differential privacy for what a device uploads: the change of its adapter from the
cloud's head, clipped to an L2 norm and blurred with Gaussian noise on the device, and the
privacy those releases have spent so far.

The guarantee is local and at the level of the device's data as a whole: a release is
the Gaussian mechanism on the device's clipped delta (sensitivity ``clip`` between "this
delta" and "no delta"), with noise ``noise_multiplier * clip`` per coordinate. Releases
of every domain's adapter count against one budget (conservative: their samples differ).
Numpy only, like the rest of the edge runtime.
"""

from __future__ import annotations

import math

import numpy as np

from edge_runtime.errors import ConfigError


def clip_delta(
    weights: dict[str, np.ndarray], base: dict[str, np.ndarray], clip: float
) -> dict[str, np.ndarray]:
    """``weights`` with their change from ``base`` scaled down to L2 norm ``clip`` (the
    norm over all tensors together) where it is larger; unchanged if ``clip`` is 0."""
    delta = {k: np.asarray(weights[k], np.float32) - base[k] for k in base}
    norm = math.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in delta.values()))
    if not 0 < clip < norm:
        return {k: np.asarray(weights[k], np.float32).copy() for k in base}
    return {k: (base[k] + (clip / norm) * d).astype(np.float32) for k, d in delta.items()}


def gaussian_epsilon(releases: int, noise_multiplier: float, delta: float) -> float:
    """The epsilon of ``releases`` Gaussian mechanisms with ``noise_multiplier`` z (no
    subsampling) at ``delta``, by Rényi DP (Mironov 2017).

    One release has RDP ``a / (2 z^2)`` at order ``a``; T releases compose to
    ``T a / (2 z^2)``, and RDP ``r`` at order ``a`` gives ``(r + log(1/delta) / (a - 1),
    delta)``-DP. With ``c = T / (2 z^2)`` and ``L = log(1/delta)`` the minimum over
    orders ``a > 1`` of ``c a + L / (a - 1)`` is at ``a = 1 + sqrt(L / c)``:

        epsilon = c + 2 sqrt(c L)
    """
    if releases < 0 or noise_multiplier <= 0 or not 0 < delta < 1:
        raise ConfigError("releases >= 0, noise_multiplier > 0 and 0 < delta < 1 are needed")
    c = releases / (2 * noise_multiplier**2)
    return c + 2 * math.sqrt(c * math.log(1 / delta))


class GaussianNoise:
    """Clips an adapter's delta from its base to ``clip`` and adds N(0, (noise_multiplier
    * clip)^2) to every coordinate; counts the releases and reports their epsilon at
    ``delta``. ``seed`` is for tests: None draws from the OS, as a device must (noise the
    cloud could predict would protect nothing)."""

    def __init__(
        self,
        clip: float,
        noise_multiplier: float,
        *,
        delta: float = 1e-5,
        seed: int | None = None,
    ) -> None:
        if not (math.isfinite(clip) and clip > 0):
            raise ConfigError(f"clip: must be > 0, got {clip}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ConfigError(f"noise_multiplier: must be > 0, got {noise_multiplier}")
        if not 0 < delta < 1:
            raise ConfigError(f"delta: must be in (0, 1), got {delta}")
        self.clip, self.noise_multiplier, self.delta = clip, noise_multiplier, delta
        self.releases = 0
        self._rng = np.random.default_rng(seed)

    @property
    def std(self) -> float:
        """The noise's standard deviation per coordinate."""
        return self.noise_multiplier * self.clip

    @property
    def epsilon(self) -> float:
        """The epsilon spent by the releases so far (0 before the first)."""
        return gaussian_epsilon(self.releases, self.noise_multiplier, self.delta)

    def privatize(
        self, weights: dict[str, np.ndarray], base: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """``base`` plus the clipped, noised delta of ``weights`` (float32); one release."""
        clipped = clip_delta(weights, base, self.clip)
        self.releases += 1
        return {
            k: (v + self._rng.normal(0.0, self.std, v.shape)).astype(np.float32)
            for k, v in clipped.items()
        }
