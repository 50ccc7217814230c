"""A headless Chromium driven over the DevTools protocol (no WebDriver, no extra package).

Debian's ``chromium`` runs with a fresh profile, and every request it makes carries
the Grafana admin's basic-auth header (``Network.setExtraHTTPHeaders``): Grafana has
anonymous access off, and signs a request in by that header like an API call.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import websockets

from tests.conftest import free_port

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        await self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(await self._ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        answer = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return answer.get("result", {}).get("value")

    async def screenshot(self) -> bytes:
        """The viewport as PNG."""
        shot = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])


@asynccontextmanager
async def browser(authorization: str, width: int, height: int) -> AsyncIterator[Page]:
    """One Chromium page of ``width`` x ``height`` CSS pixels; stopped afterwards."""
    binary = chromium_binary()
    assert binary is not None
    port = free_port()
    with tempfile.TemporaryDirectory(
        prefix="posflow-chromium-", ignore_cleanup_errors=True
    ) as profile:
        proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            target = _page_target(port)
            async with websockets.connect(target, max_size=64 * 2**20) as ws:
                page = Page(ws)
                await page.call("Network.enable")
                await page.call(
                    "Network.setExtraHTTPHeaders", headers={"Authorization": authorization}
                )
                await page.call(
                    "Emulation.setDeviceMetricsOverride",
                    width=width, height=height, deviceScaleFactor=1, mobile=False,
                )  # fmt: skip
                await page.call("Page.enable")
                yield page
        finally:
            # Chromium's helpers (renderer, GPU, zygote) share its new process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _page_target(port: int) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("chromium's DevTools endpoint did not answer in 30 s")
        time.sleep(0.2)


async def settle(page: Page, probe: str, *, timeout_s: float = 60, quiet_s: float = 3) -> Any:
    """Evaluate ``probe`` until it returns the same truthy value for ``quiet_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        value = await page.evaluate(probe)
        if value != last:
            last, since = value, time.monotonic()
        elif value and time.monotonic() - since >= quiet_s:
            return value
        await asyncio.sleep(0.5)
    return last
