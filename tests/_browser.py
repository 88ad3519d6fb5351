"""Load a page in a real headless Chromium and report what a person would see go wrong.

Talks the DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-terminated JSON), so no
websocket library and no downloaded browser are needed: any chromium/chrome on PATH does.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    explicit = os.environ.get("SDCLI_TEST_BROWSER")
    if explicit:
        return explicit
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


class _Pipe:
    def __init__(self, to_browser: int, from_browser: int):
        self.out, self.inp = to_browser, from_browser
        self.next_id, self.buffer, self.events = 0, b"", []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def _read_one(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("the browser did not answer in time")
            chunk = os.read(self.inp, 1 << 16)
            if not chunk:
                raise RuntimeError("the browser closed the pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        wanted = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_one(deadline)
            if msg.get("id") == wanted:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for i, msg in enumerate(self.events):
            if msg.get("method") == method:
                return self.events.pop(i)
        while True:
            msg = self._read_one(deadline)
            self.events.append(msg)
            if msg.get("method") == method:
                return msg


_IMAGES_JS = """JSON.stringify([...document.images].map(i => ({src: i.getAttribute('src').slice(0, 60),
  complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight})))"""


def load_page(browser: str, page: Path, timeout: float = 60, screenshot: Path | None = None) -> dict:
    """Open `page` (a file) and return {"images": [...], "errors": [...], "title": str, "text": str}:
    errors holds console errors, uncaught exceptions and browser log errors (failed loads, CSP violations)."""
    with tempfile.TemporaryDirectory() as profile:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        proc = _spawn(browser, profile, to_browser_r, from_browser_w)
        os.close(to_browser_r)
        os.close(from_browser_w)
        pipe = _Pipe(to_browser_w, from_browser_r)
        try:
            return _inspect(pipe, page, timeout, screenshot)
        finally:
            try:
                pipe.send("Browser.close")
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
                proc.wait()
            os.close(to_browser_w)
            os.close(from_browser_r)


def _spawn(browser: str, profile: str, read_end: int, write_end: int) -> subprocess.Popen:
    """Start the browser with our pipe ends at fds 3 (it reads) and 4 (it writes), as it expects."""
    high_r, high_w = fcntl.fcntl(read_end, fcntl.F_DUPFD, 10), fcntl.fcntl(write_end, fcntl.F_DUPFD, 10)

    def child_fds():
        os.dup2(high_r, 3)
        os.dup2(high_w, 4)

    try:
        return subprocess.Popen(
            [browser, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=child_fds)
    finally:
        os.close(high_r)
        os.close(high_w)


def _inspect(pipe: _Pipe, page: Path, timeout: float, screenshot: Path | None) -> dict:
    target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
    session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        pipe.call(f"{domain}.enable", session=session)
    pipe.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
    pipe.wait_event("Page.loadEventFired", timeout=timeout)
    images = json.loads(_evaluate(pipe, session, _IMAGES_JS))
    title = _evaluate(pipe, session, "document.title")
    text = _evaluate(pipe, session, "document.body.innerText")
    if screenshot is not None:
        pipe.call("Emulation.setDeviceMetricsOverride", {"width": 1100, "height": 900, "deviceScaleFactor": 1,
                                                          "mobile": False}, session=session)
        shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        screenshot.write_bytes(base64.b64decode(shot))
    return {"images": images, "errors": _errors(pipe.events), "title": title, "text": text}


def _evaluate(pipe: _Pipe, session: str, expression: str):
    result = pipe.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
    return result["result"].get("value")


def _errors(events: list[dict]) -> list[str]:
    errors = []
    for msg in events:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + params["exceptionDetails"].get("text", "?"))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log ({params['entry'].get('source')}): {params['entry'].get('text')}")
    return errors
