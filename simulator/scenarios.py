"""Fault scenarios: YAML files of faults scheduled into a run.

```yaml
name: mixed
faults:
  - kind: battery_failure
    at_s: 60            # seconds after the run starts
    duration_s: 300     # optional: until the end of the run
    target: {count: 2}  # or indexes, terminals, fraction, city, carrier, merchant
    params: {drain_pct_per_hour: 600}
```

Targets are resolved against the fleet with the run's seed, so a scenario picks
the same terminals every time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posflow.errors import PosflowError
from simulator.fleet import Fleet, Terminal

__all__ = ["Fault", "FaultKind", "Scenario", "Target", "load_scenario", "scheduled"]

FaultKind = Literal[
    "battery_failure",
    "signal_loss",
    "terminal_offline",
    "printer_out_of_paper",
    "decline_spike",
    "terminal_moved",
    "tamper",
    "duplicate_messages",
    "malformed_messages",
    "clock_skew",
    "card_number",
]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Target(_Strict):
    """Which terminals a fault hits: filters first (city, carrier, merchant), then a pick."""

    terminals: list[str] | None = None
    indexes: list[int] | None = Field(default=None, description="positions in the fleet, from 0")
    count: int | None = Field(default=None, ge=1)
    fraction: float | None = Field(default=None, gt=0, le=1)
    city: str | None = None
    carrier: str | None = None
    merchant: str | None = None


class Fault(_Strict):
    kind: FaultKind
    at_s: float = Field(ge=0)
    duration_s: float | None = Field(default=None, gt=0)
    target: Target = Target()
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_target(self) -> Fault:
        t = self.target
        if not any((t.terminals, t.indexes, t.count, t.fraction, t.city, t.carrier, t.merchant)):
            raise ValueError("target selects nothing: give terminals, indexes, count, fraction, "
                             "city, carrier or merchant")  # fmt: skip
        return self


class Scenario(_Strict):
    name: str
    description: str = ""
    faults: list[Fault] = Field(default_factory=list)


@dataclass(frozen=True)
class Scheduled:
    """A fault with the terminal indexes it hits and its window in run seconds."""

    fault: Fault
    terminals: frozenset[int]
    start: float
    end: float

    def active(self, t: float) -> bool:
        return self.start <= t < self.end


def load_scenario(name_or_path: str) -> Scenario:
    """A scenario by file path, or by name from the scenarios shipped in simulator/scenarios/."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        where = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise PosflowError(f"cannot read scenario {where}: {exc.strerror}") from None
    else:
        where = f"simulator/scenarios/{name_or_path}.yaml"
        shipped = resources.files("simulator") / "scenarios" / f"{name_or_path}.yaml"
        if not shipped.is_file():
            names = sorted(
                p.name.removesuffix(".yaml")
                for p in (resources.files("simulator") / "scenarios").iterdir()
                if p.name.endswith(".yaml")
            )
            raise PosflowError(
                f"no scenario named {name_or_path!r}",
                fix=f"use one of {', '.join(names)} or a path to a .yaml file",
            )
        text = shipped.read_text()
    try:
        return Scenario.model_validate(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        raise PosflowError(f"scenario {where} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise PosflowError(f"scenario {where}: {loc}: {first['msg']}") from None


def _select(target: Target, fleet: Fleet, rng: random.Random) -> list[Terminal]:
    pool = fleet.terminals
    if target.city:
        pool = [t for t in pool if t.merchant.city.name == target.city]
    if target.carrier:
        pool = [t for t in pool if t.carrier == target.carrier and t.network not in
                ("wifi", "ethernet")]  # fmt: skip
    if target.merchant:
        pool = [t for t in pool if t.merchant.merchant_id == target.merchant]
    if target.terminals:
        wanted = set(target.terminals)
        pool = [t for t in pool if t.terminal_id in wanted]
    if target.indexes:
        wanted_i = set(target.indexes)
        pool = [t for t in pool if t.index in wanted_i]
    if target.count is not None:
        pool = rng.sample(pool, min(target.count, len(pool)))
    elif target.fraction is not None:
        pool = rng.sample(pool, round(target.fraction * len(pool)))
    return pool


def scheduled(scenario: Scenario, fleet: Fleet, duration_s: float) -> list[Scheduled]:
    """The scenario's faults resolved to terminals (same seed, same picks)."""
    rng = random.Random(f"{fleet.seed}:faults:{scenario.name}")
    out = []
    for fault in scenario.faults:
        hit = frozenset(t.index for t in _select(fault.target, fleet, rng))
        end = duration_s if fault.duration_s is None else fault.at_s + fault.duration_s
        out.append(Scheduled(fault, hit, fault.at_s, end))
    return out
