"""How one terminal behaves: its battery, its signal and the payments made on it.

Each terminal draws from its own generator (seeded by the run's seed and its id),
so its messages do not depend on the rest of the fleet, on sharding, or on timing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Final

from simulator.fleet import CATEGORIES, Terminal

__all__ = ["DECLINE_CODES", "TerminalState", "TxnDraw"]

_SCHEMES: Final = {
    "AUD": (("visa", 50), ("mastercard", 38), ("amex", 8), ("other", 4)),
    "USD": (("visa", 52), ("mastercard", 25), ("amex", 15), ("discover", 6), ("other", 2)),
    "GBP": (("visa", 50), ("mastercard", 42), ("amex", 5), ("maestro", 3)),
    "EUR": (("visa", 44), ("mastercard", 40), ("maestro", 12), ("amex", 4)),
    "SGD": (("visa", 45), ("mastercard", 35), ("amex", 8), ("unionpay", 7), ("jcb", 5)),
}
_ENTRY: Final = (("contactless", 62), ("wallet", 18), ("chip", 15), ("swipe", 3), ("manual", 2))
# ISO 8583 response codes as acquirers report them, with a realistic mix.
DECLINE_CODES: Final = (
    ("05", 35),  # do not honour
    ("51", 30),  # insufficient funds
    ("55", 10),  # incorrect PIN
    ("54", 8),  # expired card
    ("61", 7),  # exceeds withdrawal amount limit
    ("65", 6),  # exceeds frequency limit (strong authentication required)
    ("91", 4),  # issuer unavailable
)
# No digits: a simulated card token never looks like a card number.
_TAG_LETTERS: Final = "abcdefghjkmnpqrstuvwxyz"


def _weighted(rng: random.Random, table: tuple[tuple[str, int], ...]) -> str:
    return rng.choices([k for k, _ in table], weights=[w for _, w in table])[0]


@dataclass
class TxnDraw:
    type: str
    amount_minor: int
    tip_minor: int
    status: str
    decline_code: str | None
    auth_latency_ms: int
    scheme: str
    entry_mode: str
    card_last4: str
    card_token: str
    original_txn_id: str | None


@dataclass
class TerminalState:
    """Mutable state of one simulated terminal."""

    terminal: Terminal
    rng: random.Random
    level: float
    signal: float  # current strength, dBm on the terminal's network scale
    base_signal: float
    seq: int = 0
    dead: bool = False  # battery empty (or switched off by a fault)
    online: bool = False
    will: bytes | None = None  # the Last Will registered at the last connect
    recent_sales: list[tuple[str, int]] = field(default_factory=list)
    last_t: float = 0.0
    txns_since: int = 0

    @classmethod
    def new(cls, terminal: Terminal, seed: int) -> TerminalState:
        rng = random.Random(f"{seed}:terminal:{terminal.terminal_id}")
        docked = terminal.model != "portable"
        level = rng.uniform(85, 100) if docked else rng.uniform(45, 100)
        # Where a merchant put its terminal: most have decent coverage, some a poor spot.
        low, mean, high = {
            "lte": (-101, -88, -75), "5g": (-101, -87, -75), "3g": (-86, -77, -65),
            "wifi": (-70, -57, -45), "ethernet": (0, 0, 0),
        }[terminal.network]  # fmt: skip
        base = float(min(high, max(low, rng.gauss(mean, 5))))
        return cls(terminal=terminal, rng=rng, level=level, signal=base, base_signal=base)

    def next_seq(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    # --- battery ------------------------------------------------------------------------

    def docked(self, open_now: bool) -> bool:
        # Countertops live on their dock; portables leave it while the shop is open.
        return self.terminal.model != "portable" or not open_now

    def advance_battery(self, t: float, open_now: bool, *, failing_drain: float | None) -> None:
        hours = max(0.0, t - self.last_t) / 3600
        self.last_t = t
        cap = self.terminal.battery_capacity
        if failing_drain is not None:
            self.level -= failing_drain * hours
        elif self.docked(open_now):
            self.level += 25 * hours
        else:
            # Idle draw, the screen while open, and a little per payment; aged cells hold less.
            self.level -= (2.0 + (6.0 if open_now else 0.0)) * hours / cap
            self.level -= 0.05 * self.txns_since / cap
        self.txns_since = 0
        self.level = max(0.0, min(100.0, self.level))

    def battery_health(self) -> str:
        cap = self.terminal.battery_capacity
        return "good" if cap >= 0.8 else "fair" if cap >= 0.65 else "poor"

    def temperature(self, charging: bool, heat: float) -> float:
        base = self.terminal.merchant.city.ambient_c + (5.0 if charging else 2.0) + heat
        return round(base + self.rng.gauss(0, 0.8), 1)

    # --- signal ---------------------------------------------------------------------------

    @property
    def poor_coverage(self) -> bool:
        """A spot near the edge of coverage, where the link drops now and then."""
        t = self.terminal
        return t.network in ("lte", "5g") and self.base_signal < -96

    def drift_signal(self, dt: float) -> float:
        """Ornstein-Uhlenbeck drift around the terminal's base strength."""
        if self.terminal.network == "ethernet":
            return 0.0
        theta, sigma = 0.01, 0.3  # stationary spread sigma / sqrt(2 theta) ~ 2 dB
        self.signal += theta * (self.base_signal - self.signal) * dt + sigma * math.sqrt(
            max(dt, 0.0)
        ) * self.rng.gauss(0, 1)
        # The spot does not move: the link varies around it, within a few dB.
        self.signal = min(self.base_signal + 5, max(self.base_signal - 5, self.signal))
        return self.signal

    # --- payments ---------------------------------------------------------------------------

    def draw_txn(self, txn_id: str, *, decline_rate: float, failures: bool = True) -> TxnDraw:
        rng = self.rng
        merchant = self.terminal.merchant
        cat = CATEGORIES[merchant.category]
        roll = rng.random()
        kind, original, amount = "sale", None, 0
        if roll < 0.015 and self.recent_sales:
            kind = "refund"
            original, paid = rng.choice(self.recent_sales)
            amount = paid if rng.random() < 0.7 else max(100, paid // 2)
        elif roll < 0.022 and self.recent_sales:
            kind = "void"
            original, amount = self.recent_sales.pop()
        else:
            amount = max(100, int(cat["ticket"] * math.exp(rng.gauss(0, 0.6))))
        status_roll = rng.random()
        status, code = "approved", None
        if kind == "sale" and status_roll < decline_rate:
            status, code = "declined", _weighted(rng, DECLINE_CODES)
        elif status_roll > 0.994 and failures:
            status = "timeout" if status_roll > 0.998 else "error"
        if status == "timeout":
            latency = rng.randint(30_000, 45_000)
        elif status == "error":
            latency = rng.randint(40, 400)
        else:
            latency = int(380 * math.exp(rng.gauss(0, 0.35)))
        tip = 0
        if kind == "sale" and status == "approved" and rng.random() < cat["tips"]:
            tip = amount * rng.choice((10, 15, 20)) // 100
        if kind == "sale" and status == "approved":
            self.recent_sales.append((txn_id, amount))
            del self.recent_sales[:-20]
        return TxnDraw(
            type=kind,
            amount_minor=amount,
            tip_minor=tip,
            status=status,
            decline_code=code,
            auth_latency_ms=latency,
            scheme=_weighted(rng, _SCHEMES.get(merchant.currency, _SCHEMES["USD"])),
            entry_mode=_weighted(rng, _ENTRY),
            card_last4=f"{rng.randrange(10_000):04d}",
            card_token="tok_" + "".join(rng.choices(_TAG_LETTERS, k=16)),
            original_txn_id=original,
        )
