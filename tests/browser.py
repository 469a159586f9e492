"""A real headless Chromium (Debian's `chromium`, installed by `make setup`) driven over the DevTools protocol:
open a local page, record every network request the page makes, measure elements, take a full-page screenshot.

The protocol is JSON over a websocket (the `websockets` package); no browser-automation library is needed.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--remote-debugging-port=0", "--window-size=1280,900",
)  # fmt: skip


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("chromium is not installed: `make setup` installs Debian's `chromium` (apt-get)")
    return found


class Page:
    """One tab: send commands, collect events."""

    def __init__(self, ws: Any):
        self.ws, self.ids, self.events = ws, itertools.count(1), []

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == n:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)
        raise TimeoutError(method)

    def wait_for(self, event: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for seen in self.events:
            if seen.get("method") == event:
                return seen
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            self.events.append(message)
            if message.get("method") == event:
                return message
        raise TimeoutError(event)

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip, timeout=60)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextlib.contextmanager
def open_page(url: str) -> Iterator[Page]:
    """Start Chromium, open `url` with network recording on, wait for the load event; stop Chromium after."""
    profile = tempfile.mkdtemp(prefix="transflow-chromium-")
    proc = subprocess.Popen(
        [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        browser_ws = _devtools_url(proc)
        with connect(browser_ws, max_size=64 << 20) as browser:
            root = Page(browser)
            target = root.call("Target.createTarget", url="about:blank")["targetId"]
        port = re.search(r":(\d+)/", browser_ws).group(1)
        with connect(f"ws://127.0.0.1:{port}/devtools/page/{target}", max_size=64 << 20) as ws:
            page = Page(ws)
            page.call("Network.enable")
            page.call("Page.enable")
            page.call("Page.navigate", url=url)
            page.wait_for("Page.loadEventFired")
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_url(proc: subprocess.Popen, timeout: float = 60) -> str:
    """Chromium prints `DevTools listening on ws://…` on stderr once it is ready."""
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before DevTools came up")
        found = re.search(r"DevTools listening on (ws://\S+)", line)
        if found:  # keep draining stderr, or a chatty browser blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
            return found.group(1)
    raise TimeoutError("chromium did not announce its DevTools endpoint")
