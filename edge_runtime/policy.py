"""Budget policy: which of the module sets the manifest allows fits the board right now.

Going down happens at once, so the sub-model is never above the budget after a drop is
seen; going up waits until the larger set has fit, with a margin, for several readings in
a row, so oscillating readings do not cause a swap storm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from device_profiles import Budget
from edge_runtime.errors import ConfigError
from edge_runtime.monitor import Reading


@dataclass(frozen=True)
class Option:
    """One module set the manifest allows, with its memory footprint."""

    selection: tuple[tuple[int, ...], ...]
    memory_kb: float


@dataclass(frozen=True)
class PolicyConfig:
    memory_fraction: float = 0.25  # of the memory available now, at most this for the model
    low_battery_percent: float = 20.0
    hot_celsius: float = 75.0
    constrained_scale: float = 0.5  # budget multiplier on low battery or when hot
    up_after: int = 3  # readings in a row a larger set must fit before switching up
    up_margin: float = 0.1  # ... with this much room to spare


class Policy:
    """Maps readings to the largest allowed option that fits, with hysteresis."""

    def __init__(
        self, options: Sequence[Option], budget: Budget, config: PolicyConfig = PolicyConfig()
    ) -> None:
        if not options:
            raise ConfigError("the manifest allows no module set")
        self.options = sorted(options, key=lambda o: o.memory_kb)
        self.budget = budget
        self.config = config
        self.current: Option | None = None
        self._fits_larger = 0
        self.last_allowed_kb = float(budget.model_memory_kb)

    def allowed_kb(self, reading: Reading, *, margin: float = 0.0) -> float:
        """The memory the sub-model may use under this reading; ``margin`` asks for that
        much room to spare in the memory that is free (the static budget needs none)."""
        c = self.config
        free = reading.available_mb * 1024 * c.memory_fraction / (1 + margin)
        allowed = min(self.budget.model_memory_kb, free)
        low_battery = (
            reading.battery_percent is not None
            and not reading.on_power
            and reading.battery_percent < c.low_battery_percent
        )
        hot = reading.temperature_c is not None and reading.temperature_c >= c.hot_celsius
        if low_battery or hot:
            allowed *= c.constrained_scale
        return allowed

    def decide(self, reading: Reading) -> Option | None:
        """The option to switch to now, or None to keep the current one."""
        allowed = self.last_allowed_kb = self.allowed_kb(reading)
        target = self._largest_within(allowed)
        current = self.current
        if current is None or target.memory_kb < current.memory_kb:
            self._fits_larger = 0
            return self._switch(target)
        roomy = self._largest_within(self.allowed_kb(reading, margin=self.config.up_margin))
        if roomy.memory_kb > current.memory_kb:
            self._fits_larger += 1
            if self._fits_larger >= self.config.up_after:
                self._fits_larger = 0
                return self._switch(roomy)
            return None
        self._fits_larger = 0
        return None

    def _largest_within(self, kb: float) -> Option:
        fitting = [o for o in self.options if o.memory_kb <= kb]
        return fitting[-1] if fitting else self.options[0]

    def _switch(self, option: Option) -> Option | None:
        if option == self.current:
            return None
        self.current = option
        return option

    @property
    def over_budget(self) -> bool:
        """True if the current set is above what the last reading allowed (only when even
        the smallest allowed set does not fit)."""
        return self.current is not None and self.current.memory_kb > self.last_allowed_kb
