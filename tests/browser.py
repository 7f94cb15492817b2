"""Open an HTML page in headless Chromium and report what a user would see.

Talks the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (JSON messages ending in
NUL, commands on fd 3, replies on fd 4), so it needs only the ``chromium`` binary: no
chromedriver, no selenium, no network. Tests call :func:`inspect_page`; they skip when
:func:`find_chromium` returns None.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# Chromium's own flags for a closed, quiet, throwaway browser (no sandbox: tests may run as
# root; no background networking: nothing may phone home).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--mute-audio")

# Loads every image (lazy ones too) and resolves to [[src, naturalWidth], ...].
_IMAGES_JS = """
Promise.all([...document.images].map(img => {
  img.loading = 'eager';
  return img.decode().then(() => [img.src, img.naturalWidth], () => [img.src, 0]);
}))
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _DevTools:
    """One Chromium process and its DevTools pipe."""

    def __init__(self, binary: str, profile: str, timeout: float):
        cmd_read, cmd_write = os.pipe()
        reply_read, reply_write = os.pipe()
        # Above 10 first, so that moving them to 3 and 4 in the child cannot overwrite either.
        child_in = fcntl.fcntl(cmd_read, fcntl.F_DUPFD, 10)
        child_out = fcntl.fcntl(reply_write, fcntl.F_DUPFD, 10)
        for fd in (cmd_read, reply_write):
            os.close(fd)

        def pipe_to_3_and_4():
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        # close_fds=False keeps fds 3 and 4; every other fd of ours is non-inheritable.
        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"],
            preexec_fn=pipe_to_3_and_4, close_fds=False, start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(child_in)
        os.close(child_out)
        self.commands, self.replies = cmd_write, reply_read
        self.timeout = timeout
        self.buffer = b""
        self.events: list[dict] = []
        self.next_id = 0

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise ConnectionError("Chromium closed its DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for index, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(index)
        deadline = time.monotonic() + self.timeout
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)

    def close(self):
        """Ask Chromium to quit, then end its whole process group (renderers included)."""
        try:
            self.call("Browser.close")
        except (OSError, RuntimeError, TimeoutError, ConnectionError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        for fd in (self.commands, self.replies):
            os.close(fd)


def _console_errors(events: list[dict]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                   for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(details.get("exception", {}).get("description") or details.get("text"))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"{entry.get('text')} {entry.get('url', '')}".strip())
    return errors


def inspect_page(page: Path, screenshot: Path, width: int = 1280, timeout: float = 60.0) -> dict:
    """Load ``page`` in headless Chromium, load all its images, and save a full-page PNG.

    Returns {"images": [(src, naturalWidth), ...], "console_errors": [...], "title": str,
    "height": int}. Raises RuntimeError when Chromium is not installed.
    """
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed")
    # Chromium's helpers may still be flushing the profile when it is removed.
    with tempfile.TemporaryDirectory(prefix="unimo-chromium-",
                                     ignore_cleanup_errors=True) as profile:
        browser = _DevTools(binary, profile, timeout)
        try:
            target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.call("Target.attachToTarget",
                                   {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                browser.call(f"{domain}.enable", session=session)
            browser.call("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": 900, "deviceScaleFactor": 1,
                          "mobile": False}, session=session)
            browser.call("Page.navigate", {"url": Path(page).resolve().as_uri()},
                         session=session)
            browser.wait_for("Page.loadEventFired")
            images = browser.call("Runtime.evaluate",
                                  {"expression": _IMAGES_JS, "awaitPromise": True,
                                   "returnByValue": True}, session=session)
            title = browser.call("Runtime.evaluate", {"expression": "document.title",
                                                      "returnByValue": True}, session=session)
            metrics = browser.call("Page.getLayoutMetrics", session=session)
            height = int(metrics["cssContentSize"]["height"])
            browser.call("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1,
                          "mobile": False}, session=session)
            shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
            Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            # Give late console messages (e.g. a failed image decode) a moment to arrive.
            browser.call("Runtime.evaluate", {"expression": "1"}, session=session)
            return {"images": [tuple(item) for item in images["result"]["value"]],
                    "console_errors": _console_errors(browser.events),
                    "title": title["result"]["value"], "height": height}
        finally:
            browser.close()
