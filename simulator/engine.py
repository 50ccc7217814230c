"""A fleet run as a stream of messages in simulated time, built through the wire contracts.

:class:`Run` knows nothing of MQTT: it yields :class:`Message` objects (topic,
bytes, QoS, what the pipeline is expected to do with it) in time order. The
transports publish them; the offline generator just collects them. Same seed,
fleet, scenario and start time: the same bytes.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from posflow.contracts import Transaction
from simulator.behaviour import TerminalState
from simulator.fleet import CATEGORIES, Fleet, Terminal
from simulator.scenarios import Scenario, Scheduled, scheduled

__all__ = ["EXPECT_DUPLICATE", "EXPECT_OK", "Message", "Run"]

EXPECT_OK: Final = "ok"
EXPECT_DUPLICATE: Final = "dup"
# Anything else is "dl:<reason>": a dead letter with that reason code is expected.

_ACTIVATE, _TELE, _TXN, _OFF, _ON = range(5)
_TEST_PANS: Final = ("4111111111111111", "5555555555554444", "378282246310005")
_APP, _FW = "4.3.2", "fw-2026.09"
# About 85 on the health worker's scales (streams/score.py); drift stays within 5 dB.
_GOOD_SIGNAL: Final = {"lte": -92.0, "5g": -92.0, "3g": -80.0, "wifi": -63.0}


@dataclass(frozen=True, slots=True)
class Message:
    at: float  # run seconds
    terminal: int  # index in the fleet
    kind: str  # telemetry | txn | status
    seq: int
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    expect: str = EXPECT_OK
    will: bytes | None = None  # on an "online" status: the Last Will to register on connect
    is_will: bool = False  # the broker publishes this one when the connection drops


def _iso(epoch: float) -> datetime:
    return datetime.fromtimestamp(round(epoch, 3), UTC)


def _json(doc: dict[str, Any]) -> bytes:
    """A payload as the contract model serialises it (same field order, ``null`` for an
    absent optional field, a UTC time with ``Z``), without building the model: telemetry
    and status are most of what a fleet sends. tests/unit/test_simulator.py checks every
    payload of a run against its model, value and byte for byte."""
    return orjson.dumps(doc, option=orjson.OPT_UTC_Z)


class Run:
    """The messages of ``fleet`` over ``duration_s`` seconds from epoch ``t0``.

    Terminal ``i`` comes online at ``i / ramp_per_s`` seconds (all at once when
    ``ramp_per_s`` is None). ``only`` restricts the run to some terminal indexes
    (a shard); each terminal's messages are the same either way.
    """

    def __init__(
        self,
        fleet: Fleet,
        *,
        t0: float,
        duration_s: float,
        telemetry_s: int = 30,
        txn_scale: float = 1.0,
        ramp_per_s: float | None = None,
        scenario: Scenario | None = None,
        only: range | None = None,
        always_open: bool = False,
        baseline_failures: bool = True,
    ) -> None:
        self.fleet = fleet
        self.t0 = t0
        self.duration_s = duration_s
        self.telemetry_s = telemetry_s
        self.txn_scale = txn_scale
        # Every shop at its peak hour, whatever the clock: runs that must not depend on it.
        self.always_open = always_open
        # Off: terminals without a fault never decline, fail or drop out, so every health
        # finding in such a run comes from a scheduled fault (scenario tests).
        self.baseline_failures = baseline_failures
        self.faults: list[Scheduled] = (
            scheduled(scenario, fleet, duration_s) if scenario is not None else []
        )
        indexes = only if only is not None else range(len(fleet.terminals))
        self.states = {i: TerminalState.new(fleet.terminals[i], fleet.seed) for i in indexes}
        # A terminal's counter keeps rising across runs, as a real one's does across reboots:
        # a later run's (terminal, seq) never meets an earlier run's (retained messages) as
        # long as a terminal sends under 10 messages a second. Eleven digits, never 13-19:
        # a longer number can pass the Luhn check and be taken for a card number.
        self.seq_base = int(t0) * 10
        for st in self.states.values():
            st.seq = self.seq_base
            if not baseline_failures:  # and every terminal in a good spot
                floor = _GOOD_SIGNAL.get(st.terminal.network, -200.0)
                st.base_signal = st.signal = max(st.base_signal, floor)
        self._faults_of: dict[int, list[Scheduled]] = {}
        for s in self.faults:
            for i in s.terminals:
                if i in self.states:
                    self._faults_of.setdefault(i, []).append(s)
        self._heap: list[tuple[float, int, int, int]] = []
        self._order = 0
        for i in indexes:
            start = 0.0 if ramp_per_s is None else i / ramp_per_s
            self._push(start, i, _ACTIVATE)
            for s in self._faults_of.get(i, ()):
                if s.fault.kind == "terminal_offline":
                    self._push(max(s.start, start), i, _OFF)
                    if s.end < duration_s:
                        self._push(s.end, i, _ON)

    def _push(self, at: float, terminal: int, what: int) -> None:
        if at < self.duration_s:
            heapq.heappush(self._heap, (at, self._order, terminal, what))
            self._order += 1

    def _active(self, i: int, t: float, kind: str) -> Scheduled | None:
        faults = self._faults_of.get(i)
        if faults is None:  # most terminals: no fault scheduled at all
            return None
        for s in faults:
            if s.fault.kind == kind and s.active(t):
                return s
        return None

    # --- the stream ---------------------------------------------------------------------

    def until(self, t: float) -> list[Message]:
        """Every message due before run time ``t``, in time order."""
        out: list[Message] = []
        heap = self._heap
        while heap and heap[0][0] < t:
            at, _, i, what = heapq.heappop(heap)
            st = self.states[i]
            if what == _ACTIVATE:
                st.last_t = at
                out.append(self._online(st, at))
                self._push(at + st.rng.uniform(0, self.telemetry_s), i, _TELE)
                self._schedule_txn(st, at)
            elif what == _TELE:
                out.extend(self._telemetry(st, at))
                self._push(at + self.telemetry_s, i, _TELE)
            elif what == _TXN:
                out.extend(self._txn(st, at))
            elif what == _OFF and st.online:
                out.append(self._will(st, at))
            elif what == _ON and not st.online and not st.dead:
                out.append(self._online(st, at))
        return out

    def all(self) -> list[Message]:
        """The whole run (offline generation)."""
        return self.until(math.inf)

    @property
    def done(self) -> bool:
        return not self._heap

    # --- message builders (payloads exactly as the contract models write them) ----------

    def _emit(
        self,
        st: TerminalState,
        at: float,
        kind: str,
        body: bytes,
        seq: int,
        *,
        expect: str = EXPECT_OK,
    ) -> list[Message]:
        t = st.terminal
        msg = Message(at, t.index, kind, seq, t.topic(kind), body, expect=expect)
        bad = self._active(t.index, at, "malformed_messages")
        if bad is not None and st.rng.random() < float(bad.fault.params.get("probability", 0.3)):
            return [_corrupt(msg, st, kind)]
        out = [msg]
        dup = self._active(t.index, at, "duplicate_messages")
        if dup is not None and st.rng.random() < float(dup.fault.params.get("probability", 0.5)):
            out.append(Message(at, t.index, kind, seq, msg.topic, body, expect=EXPECT_DUPLICATE))
        return out

    def _ts(self, st: TerminalState, at: float) -> datetime:
        skew = self._active(st.terminal.index, at, "clock_skew")
        offset = float(skew.fault.params.get("skew_s", -900)) if skew is not None else 0.0
        return _iso(self.t0 + at + offset)

    def _status(self, st: TerminalState, at: float, state: str, seq: int) -> bytes:
        t = st.terminal
        return _json({
            "v": 1, "kind": "status", "merchant_id": t.merchant.merchant_id,
            "terminal_id": t.terminal_id, "ts": self._ts(st, at), "seq": seq, "state": state,
            "reason": "last will" if state == "offline" else None,
        })  # fmt: skip

    def _online(self, st: TerminalState, at: float) -> Message:
        t = st.terminal
        seq, will_seq = st.next_seq(), st.next_seq()
        st.will = self._status(st, at, "offline", will_seq)
        st.online = True
        body = self._status(st, at, "online", seq)
        return Message(at, t.index, "status", seq, t.topic("status"), body, retain=True,
                       will=st.will)  # fmt: skip

    def _will(self, st: TerminalState, at: float) -> Message:
        t = st.terminal
        st.online = False
        will = st.will or b""
        seq = json.loads(will)["seq"] if will else -1
        return Message(at, t.index, "status", seq, t.topic("status"), will, retain=True,
                       is_will=True)  # fmt: skip

    def _local_hour(self, t: Terminal, at: float) -> int:
        return int((self.t0 + at + t.merchant.utc_offset_s) // 3600 % 24)

    def _open(self, t: Terminal, at: float) -> float:
        """The share of the category's peak payment rate at this local hour (0: closed)."""
        if self.always_open:
            return 1.0
        profile: list[float] = CATEGORIES[t.merchant.category]["profile"]
        return profile[self._local_hour(t, at)]

    def _telemetry(self, st: TerminalState, at: float) -> list[Message]:
        if not st.online:
            st.drift_signal(self.telemetry_s)
            return []
        t = st.terminal
        i = t.index
        busy = self._open(t, at)
        failing = self._active(i, at, "battery_failure")
        drain = float(failing.fault.params.get("drain_pct_per_hour", 400)) if failing else None
        st.advance_battery(at, busy > 0, failing_drain=drain)
        if st.level <= 0 and failing is not None:
            # Dead since its last report: the connection drops, the broker sends the will.
            st.dead = True
            return [self._will(st, at)]
        charging = failing is None and st.docked(busy > 0) and st.level < 100
        heat = float(failing.fault.params.get("heat_c", 14)) if failing else 0.0
        strength = st.drift_signal(self.telemetry_s)
        lost = self._active(i, at, "signal_loss") is not None
        dropout = st.rng.random() < 0.02 and st.poor_coverage and self.baseline_failures
        carrier: str | None = t.carrier
        rssi = rsrp = sinr = wifi = None
        if lost or dropout:
            net = "none"
            carrier = carrier if t.network != "ethernet" else None
        elif t.network in ("lte", "5g"):
            net = t.network
            rsrp = max(-156, min(-31, round(strength)))
            rssi = max(-150, min(0, rsrp + 22))
            sinr = round(max(-20.0, min(40.0, (rsrp + 125) / 2.5)), 1)
        elif t.network == "3g":
            net, rssi = "3g", max(-150, min(0, round(strength)))
        elif t.network == "wifi":
            net, carrier, wifi = "wifi", None, max(-100, min(0, round(strength)))
        else:
            net, carrier = "ethernet", None
        lat, lon = t.lat, t.lon
        if (moved := self._active(i, at, "terminal_moved")) is not None:
            km = float(moved.fault.params.get("distance_km", 25))
            lat, lon = lat + km / 111.0, lon + km / 111.0
        paper = "out" if self._active(i, at, "printer_out_of_paper") else "ok"
        seq = st.next_seq()
        body = _json({
            "v": 1, "kind": "telemetry", "merchant_id": t.merchant.merchant_id,
            "terminal_id": t.terminal_id, "ts": self._ts(st, at), "seq": seq,
            "battery": {"level_pct": int(st.level), "charging": charging,
                        "temperature_c": st.temperature(charging, heat),
                        "health": "poor" if failing else st.battery_health()},
            "signal": {"type": net, "rssi_dbm": rssi, "rsrp_dbm": rsrp, "sinr_db": sinr,
                       "wifi_rssi_dbm": wifi, "carrier": carrier},
            "printer": {"paper": paper},
            "location": {"lat": round(lat, 6), "lon": round(lon, 6),
                         "accuracy_m": round(st.rng.uniform(5, 30), 1)},
            "app_version": _APP, "firmware_version": _FW, "uptime_s": int(at) + 3600,
            "tamper": self._active(i, at, "tamper") is not None,
            "heartbeat_interval_s": self.telemetry_s,
        })  # fmt: skip
        return self._emit(st, at, "telemetry", body, seq)

    def _schedule_txn(self, st: TerminalState, at: float) -> None:
        peak = float(CATEGORIES[st.terminal.merchant.category]["peak"]) * self.txn_scale
        if peak <= 0:
            return
        self._push(at + st.rng.expovariate(peak / 3600), st.terminal.index, _TXN)

    def _txn(self, st: TerminalState, at: float) -> list[Message]:
        self._schedule_txn(st, at)
        t = st.terminal
        # Thinning: candidates come at the peak rate, kept with the hour's share of it.
        if not st.online or st.rng.random() >= self._open(t, at):
            return []
        spike = self._active(t.index, at, "decline_spike")
        decline = float(spike.fault.params.get("decline_rate", 0.6)) if spike else 0.04
        failures = self.baseline_failures or spike is not None
        if not failures:
            decline = 0.0
        seq = st.next_seq()
        txn_id = f"{t.terminal_id}:{seq:08d}"
        d = st.draw_txn(txn_id, decline_rate=decline, failures=failures)
        st.txns_since += 1
        token = d.card_token
        expect = EXPECT_OK
        if self._active(t.index, at, "card_number") is not None:
            token = st.rng.choice(_TEST_PANS)  # a broken app puts the card number in the token
            expect = "dl:card_data"
        fields: dict[str, Any] = {
            "v": 1, "kind": "txn", "merchant_id": t.merchant.merchant_id,
            "terminal_id": t.terminal_id, "ts": self._ts(st, at), "seq": seq, "txn_id": txn_id,
            "type": d.type, "amount_minor": d.amount_minor, "tip_minor": d.tip_minor,
            "currency": t.merchant.currency, "status": d.status, "decline_code": d.decline_code,
            "auth_latency_ms": d.auth_latency_ms, "scheme": d.scheme, "entry_mode": d.entry_mode,
            "card_last4": d.card_last4, "card_token": token, "original_txn_id": d.original_txn_id,
        }  # fmt: skip
        # The contract checks every payment, except the card number a broken app sends.
        body = (
            Transaction(**fields) if expect == EXPECT_OK else Transaction.model_construct(**fields)
        )
        return self._emit(st, at, "txn", body.model_dump_json().encode(), seq, expect=expect)


def _corrupt(msg: Message, st: TerminalState, kind: str) -> Message:
    """A broken version of ``msg`` and the dead-letter reason the bridge will give it."""
    doc = json.loads(msg.payload)
    variants = ["truncated", "unknown_field", "naive_timestamp"]
    if kind == "txn":
        variants.append("float_money")
    variant = st.rng.choice(variants)
    if variant == "truncated":
        # Cut after the seq, so the dead letter still says which message it was.
        cut = msg.payload.index(b",", msg.payload.index(b'"seq":')) + 1
        body, reason = msg.payload[: cut + st.rng.randrange(20)], "malformed_json"
    elif variant == "unknown_field":
        doc["debug"] = {"build": "dev"}
        body, reason = json.dumps(doc).encode(), "unknown_field"
    elif variant == "naive_timestamp":
        doc["ts"] = doc["ts"][:19]
        body, reason = json.dumps(doc).encode(), "naive_timestamp"
    else:
        doc["amount_minor"] = doc["amount_minor"] / 100
        body, reason = json.dumps(doc).encode(), "float_money"
    if msg.expect == "dl:card_data" and variant != "truncated":
        reason = "card_data"  # the bridge looks for card numbers before anything else
    return Message(msg.at, msg.terminal, kind, msg.seq, msg.topic, body, expect=f"dl:{reason}")
