"""A merchant's live cash-flow feed, read like a merchant's app reads it (SSE, resumable).

The main job runs one for a featured merchant so the console shows the feed
working end to end: payment published over MQTT -> ledger -> NOTIFY -> SSE.
It reconnects with ``Last-Event-ID`` after any drop, so it sees every event once.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = ["FeedClient"]


@dataclass
class FeedClient:
    base_url: str
    merchant_id: str
    api_key: str
    events: int = 0
    last: dict[str, Any] | None = None
    last_id: int | None = None
    reconnects: int = 0
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="feed-client", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def line(self) -> str:
        """One line for the console."""
        if self.last is None:
            return f"live feed (SSE): waiting for events{f' - {self.error}' if self.error else ''}"
        amount = int(self.last.get("amount_minor", 0))
        sign = "-" if amount < 0 else "+"
        return (
            f"live feed (SSE): {self.events:,} events, last #{self.last_id} "
            f"{self.last.get('kind')} {sign}{abs(amount) // 100:,}.{abs(amount) % 100:02d} "
            f"{self.last.get('currency')}"
        )

    def _run(self) -> None:
        url = f"{self.base_url}/v1/merchants/{self.merchant_id}/events/stream"
        timeout = httpx.Timeout(5.0, read=60.0)
        while not self._stop.is_set():
            headers = {"Authorization": f"Bearer {self.api_key}"}
            if self.last_id is not None:
                headers["Last-Event-ID"] = str(self.last_id)
            try:
                with httpx.stream("GET", url, headers=headers, timeout=timeout) as resp:
                    if resp.status_code != httpx.codes.OK:
                        self.error = f"HTTP {resp.status_code}"
                        self._stop.wait(2.0)
                        continue
                    self.error = None
                    self._read(resp)
            except httpx.HTTPError as exc:
                self.error = type(exc).__name__
            if not self._stop.is_set():
                self.reconnects += 1
                self._stop.wait(1.0)

    def _read(self, resp: httpx.Response) -> None:
        event_id: int | None = None
        for raw in resp.iter_lines():
            if self._stop.is_set():
                return
            if raw.startswith("id:"):
                event_id = int(raw[3:].strip())
            elif raw.startswith("data:") and event_id is not None:
                data = json.loads(raw[5:].strip())
                if self.last_id is None or event_id > self.last_id:
                    self.events += 1
                    self.last, self.last_id = data, event_id
                event_id = None
            elif raw == "" and self._stop.is_set():
                return
        time.sleep(0)  # the server ended the stream: reconnect
