"""A headless Chromium driven over the DevTools protocol on a pipe: enough to load a page, type, pick a file, read
the DOM and take screenshots, with nothing but the Debian `chromium` package (no Playwright/Selenium downloads).

`--remote-debugging-pipe` makes Chromium read protocol messages (JSON, each ended by a NUL byte) on fd 3 and write
its answers and events on fd 4; `Browser` keeps both ends of those pipes.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium binary: `$CHROMIUM`, else the first of the usual names on PATH."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def _high_fd(fd: int) -> int:
    """`fd` moved to a number >= 10, so that bash's `3<&N 4>&M` redirections cannot overwrite one another."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium with one page (tab).

    Args:
        binary (`str`): the Chromium executable.
        profile (`Path`): an empty folder for its profile (the test's tmp dir).
        size (`tuple[int, int]`, *optional*): the window's width and height in CSS pixels.
    """

    def __init__(self, binary: str, profile: Path, size: tuple[int, int] = (1280, 900)):
        chrome_reads, self._to_chrome = (_high_fd(fd) for fd in os.pipe())
        self._from_chrome, chrome_writes = (_high_fd(fd) for fd in os.pipe())
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}", "about:blank"]
        # bash puts the pipe ends on fds 3 and 4 (where Chromium looks for them), then becomes Chromium (dash cannot
        # redirect fds above 9; a preexec_fn could deadlock beside the test's server thread).
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{chrome_reads} 4>&{chrome_writes}', binary, *args],
            pass_fds=(chrome_reads, chrome_writes), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(chrome_reads)
        os.close(chrome_writes)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]

    # ------------------------------------------------------------------ protocol
    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True,
             timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and wait for its answer (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float, method: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_chrome], [], [], remaining)[0]:
                raise TimeoutError(f"Chromium did not answer {method}")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.process.poll()}) while waiting for {method}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    # ------------------------------------------------------------------ page actions
    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll `expression` until it is truthy; its value. An exception counts as not yet (the page may still be
        loading), and the last one is reported if time runs out."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as exc:
                value, last_error = None, exc
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never satisfied {expression}" + (f" (last error: {last_error})" if last_error
                                                                         else ""))

    def type_text(self, text: str) -> None:
        """Type into the focused element, as a keyboard would insert it."""
        self.call("Input.insertText", {"text": text})

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter",
                                                 "windowsVirtualKeyCode": 13, "text": "\r"})

    def choose_file(self, selector: str, path: Path) -> None:
        """Set a file input's file, as the file chooser does (the page receives `change`)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        self.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(path)]})

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):  # already gone is fine
            self.call("Browser.close", session=False, timeout=5)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        for fd in (self._to_chrome, self._from_chrome):
            os.close(fd)
