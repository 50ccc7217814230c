"""The fleet: merchants (category, city, time zone, opening hours, size) and their terminals.

Everything is drawn from one seeded generator, so the same seed and size give the
same fleet, down to ids, places and credentials.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

from posflow.contracts.money import FeePlan, FeeRule, SettlementRule

__all__ = ["CATEGORIES", "CITIES", "City", "Fleet", "Merchant", "Terminal", "build_fleet"]


@dataclass(frozen=True)
class City:
    name: str
    lat: float
    lon: float
    timezone: str
    currency: str
    carriers: tuple[str, ...]
    ambient_c: float  # typical indoor temperature near a counter


CITIES: Final = (
    City("Sydney", -33.8688, 151.2093, "Australia/Sydney", "AUD", ("Telstra", "Optus", "TPG"), 24),
    City("Melbourne", -37.8136, 144.9631, "Australia/Melbourne", "AUD", ("Telstra", "Optus"), 22),
    City("London", 51.5072, -0.1276, "Europe/London", "GBP", ("EE", "Vodafone", "O2"), 20),
    City("Berlin", 52.52, 13.405, "Europe/Berlin", "EUR", ("Telekom", "Vodafone", "O2"), 21),
    City("New York", 40.7128, -74.006, "America/New_York", "USD", ("Verizon", "AT&T"), 23),
    City("Singapore", 1.3521, 103.8198, "Asia/Singapore", "SGD", ("Singtel", "StarHub"), 29),
)

# category -> (opening hours, peak payments per terminal-hour, ticket median in minor units,
#              tipping share, hourly profile 0..23 as multipliers of the peak)
_H = "08:00", "18:00"
CATEGORIES: Final[dict[str, dict[str, Any]]] = {
    "cafe": {
        "hours": ("06:30", "16:00"), "peak": 45, "ticket": 650, "tips": 0.25,
        "profile": [0]*6 + [.3, .9, 1, .7, .5, .6, .9, .6, .4, .3] + [0]*8,
    },
    "restaurant": {
        "hours": ("11:00", "23:00"), "peak": 18, "ticket": 5400, "tips": 0.6,
        "profile": [0]*11 + [.4, 1, .8, .3, .2, .2, .5, .9, 1, .8, .5, .2, 0],
    },
    "grocery": {
        "hours": ("07:00", "22:00"), "peak": 60, "ticket": 3800, "tips": 0.0,
        "profile": [0]*7 + [.3, .5, .6, .7, .8, .9, .8, .7, .8, 1, 1, .8, .5, .3, .2] + [0]*2,
    },
    "retail": {
        "hours": ("09:00", "19:00"), "peak": 14, "ticket": 7200, "tips": 0.0,
        "profile": [0]*9 + [.3, .5, .7, .9, 1, .9, .8, .8, .7, .5] + [0]*5,
    },
    "fuel": {
        "hours": ("00:00", "24:00"), "peak": 30, "ticket": 6500, "tips": 0.0,
        "profile": [.1, .05, .05, .05, .1, .3, .7, 1, .8, .6, .5, .5,
                    .6, .5, .5, .6, .8, 1, .8, .5, .4, .3, .2, .15],
    },
    "pharmacy": {
        "hours": _H, "peak": 20, "ticket": 2900, "tips": 0.0,
        "profile": [0]*8 + [.5, .8, .9, 1, 1, .9, .8, .8, .7, .6] + [0]*6,
    },
    "bar": {
        "hours": ("16:00", "02:00"), "peak": 35, "ticket": 1800, "tips": 0.4,
        "profile": [.8, .5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    .2, .4, .7, .9, 1, 1, 1, .9],
    },
}  # fmt: skip
_SIZES: Final = {"small": (1, 2), "medium": (2, 4), "large": (4, 8)}
_MODELS: Final = ("countertop", "portable", "smartpos")
_NETWORKS: Final = ("lte", "5g", "3g", "wifi", "ethernet")


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    name: str
    category: str
    city: City
    lat: float
    lon: float
    size: str
    opening_hours: dict[str, list[list[str]]]
    fee_plan: dict[str, Any]
    settlement_rule: dict[str, Any]
    utc_offset_s: int  # at the fleet's reference time (DST changes within a run are ignored)

    @property
    def currency(self) -> str:
        return self.city.currency


@dataclass(frozen=True)
class Terminal:
    index: int
    terminal_id: str
    merchant: Merchant
    model: str
    carrier: str
    network: str  # lte | 5g | 3g | wifi | ethernet
    lat: float
    lon: float
    battery_capacity: float  # 1.0 new, lower is an aged battery
    password: str = field(repr=False)

    def topic(self, kind: str) -> str:
        return f"pos/v1/{self.merchant.merchant_id}/{self.terminal_id}/{kind}"


@dataclass(frozen=True)
class Fleet:
    name: str
    seed: int
    merchants: list[Merchant]
    terminals: list[Terminal]

    def by_id(self) -> dict[str, Terminal]:
        return {t.terminal_id: t for t in self.terminals}


_NAMES_A: Final = ("Luna", "Harbour", "Corner", "Blue", "Golden", "Urban", "Little", "Old Mill")
_NAMES_B: Final = {
    "cafe": "Café", "restaurant": "Kitchen", "grocery": "Market", "retail": "Store",
    "fuel": "Fuel", "pharmacy": "Pharmacy", "bar": "Bar",
}  # fmt: skip


def _password(seed: int, name: str, terminal_id: str) -> str:
    # Derived, so a registered fleet can be driven again without storing secrets;
    # simulator accounts only: a real terminal's secret is provisioned, never derived.
    return hashlib.blake2b(f"{seed}/{name}/{terminal_id}".encode(), digest_size=12).hexdigest()


def _hours(category: str) -> dict[str, list[list[str]]]:
    start, end = CATEGORIES[category]["hours"]
    days = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    if end <= start:  # past midnight: two spans a day
        return {d: [[start, "24:00"], ["00:00", end]] for d in days}
    return {d: [[start, end]] for d in days}


def _split(terminals: int, merchants: int, rng: random.Random) -> list[int]:
    """``terminals`` shared by exactly ``merchants`` merchants, at least one each, in the
    same small/medium/large mix as an unconstrained fleet (largest remainder)."""
    if not 1 <= merchants <= terminals:
        raise ValueError(f"merchants must be 1 to {terminals} (the terminals), not {merchants}")
    weights = []
    for _ in range(merchants):
        low, high = _SIZES[rng.choices(list(_SIZES), weights=(6, 3, 1))[0]]
        weights.append(rng.randint(low, high))
    spare = terminals - merchants  # one each first, the rest by weight
    total = sum(weights)
    shares = [spare * w / total for w in weights]
    counts = [1 + int(x) for x in shares]
    by_remainder = sorted(range(merchants), key=lambda i: (int(shares[i]) - shares[i], i))
    for i in by_remainder[: terminals - sum(counts)]:
        counts[i] += 1
    return counts


def _size_of(count: int) -> str:
    return "small" if count <= 2 else "medium" if count <= 4 else "large"


def build_fleet(
    terminals: int, *, seed: int, name: str = "sim", at: float = 0.0, merchants: int | None = None
) -> Fleet:
    """A fleet of ``terminals`` terminals; ``name`` prefixes every id (``M-name-00001``).

    ``at`` (epoch seconds) fixes the UTC offsets of the merchants' time zones.
    ``merchants`` shares the terminals among exactly that many merchants (default: each
    merchant's size drawn from the realistic mix, about 2.4 terminals a merchant).
    """
    rng = random.Random(f"{seed}:fleet:{name}")
    counts = (
        _split(terminals, merchants, random.Random(f"{seed}:sizes:{name}"))
        if merchants is not None
        else None
    )
    ref = datetime.fromtimestamp(at or 1_790_000_000, ZoneInfo("UTC"))
    made: list[Merchant] = []
    fleet: list[Terminal] = []
    while len(fleet) < terminals:
        m = len(made) + 1
        category = rng.choice(list(CATEGORIES))
        city = rng.choice(CITIES)
        size = rng.choices(list(_SIZES), weights=(6, 3, 1))[0]
        if counts is not None:
            size = _size_of(counts[m - 1])
        lat = round(city.lat + rng.uniform(-0.08, 0.08), 5)
        lon = round(city.lon + rng.uniform(-0.1, 0.1), 5)
        offset = ZoneInfo(city.timezone).utcoffset(ref)
        merchant = Merchant(
            merchant_id=f"M-{name}-{m:05d}",
            name=f"{rng.choice(_NAMES_A)} {_NAMES_B[category]} {m}",
            category=category,
            city=city,
            lat=lat,
            lon=lon,
            size=size,
            opening_hours=_hours(category),
            # Through the money contracts, as `posflow settlement set-plan` would store them.
            fee_plan=FeePlan(
                default=FeeRule(
                    percent=rng.choice(("1.2", "1.5", "1.75", "1.9")),
                    fixed_minor=rng.choice((0, 10, 25)),
                ),
                rules=[FeeRule(scheme="amex", percent="2.9")],
            ).model_dump(mode="json"),
            settlement_rule=(
                SettlementRule(kind="instant")
                if rng.random() < 0.6
                else SettlementRule(kind="daily", cutoff=rng.choice(("17:00", "23:00")))
            ).model_dump(mode="json", exclude_none=True),
            utc_offset_s=int(offset.total_seconds()) if offset is not None else 0,
        )
        made.append(merchant)
        low, high = _SIZES[size]
        count = counts[m - 1] if counts is not None else rng.randint(low, high)
        for _ in range(min(count, terminals - len(fleet))):
            i = len(fleet)
            terminal_id = f"T-{name}-{i + 1:06d}"
            model = rng.choices(_MODELS, weights=(5, 3, 2))[0]
            network = rng.choices(_NETWORKS, weights=(55, 15, 5, 20, 5))[0]
            if model == "portable" and network == "ethernet":
                network = "lte"
            fleet.append(
                Terminal(
                    index=i,
                    terminal_id=terminal_id,
                    merchant=merchant,
                    model=model,
                    carrier=rng.choice(city.carriers),
                    network=network,
                    lat=round(lat + rng.uniform(-0.0003, 0.0003), 6),
                    lon=round(lon + rng.uniform(-0.0003, 0.0003), 6),
                    battery_capacity=round(rng.triangular(0.55, 1.0, 0.92), 3),
                    password=_password(seed, name, terminal_id),
                )
            )
    return Fleet(name=name, seed=seed, merchants=made, terminals=fleet)
