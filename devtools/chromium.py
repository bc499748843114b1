"""Headless Chromium driven over ``--remote-debugging-pipe`` (the DevTools protocol on
file descriptors 3 and 4, each message JSON ending in a NUL byte): no pip browser
driver, no debugging port anyone else could reach, no network but loopback.

``with Chromium(tmp) as browser: page = browser.open(url); page.evaluate("...")``;
``page.screenshot(path)``. Whatever happens, the browser is closed (Browser.close,
then SIGKILL) and its profile directory removed with ``tmp``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

CHROMIUM = "chromium"
BASH = "bash"
TIMEOUT_S = 30.0
# fds 3 and 4 of the browser are the pipe; the shell moves ours there (through 10 and
# 11, so that neither overwrites the other on the way)
_MOVE_FDS = 'exec 10<&"$1" 11>&"$2"; exec 3<&10 4>&11 10<&- 11>&-; shift 2; exec "$@"'
FLAGS = (
    "--headless",
    "--no-sandbox",  # tests run as root in CI, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--remote-debugging-pipe",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
    "--metrics-recording-only",
    "--mute-audio",
    "--hide-scrollbars",
    # nothing resolves but loopback: the page must work with no network at all
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


class CdpError(RuntimeError):
    pass


class Chromium:
    def __init__(self, workdir: Path, *, width: int = 1400, height: int = 1000) -> None:
        self.workdir = workdir
        self.width, self.height = width, height
        self._next = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._to: int | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> Chromium:
        to_read, self._to = os.pipe()  # browser reads its commands at fd 3
        self._from, to_write = os.pipe()  # and writes its answers at fd 4
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        argv = [
            BASH,
            "-c",
            _MOVE_FDS,
            "chromium-pipe",
            str(to_read),
            str(to_write),
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={self.width},{self.height}",
            "about:blank",
        ]
        self._log = (self.workdir / "chromium.log").open("wb")
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=(to_read, to_write),
            env={**os.environ, "LANG": "C.UTF-8"},
        )
        os.close(to_read)
        os.close(to_write)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(CdpError, OSError):
            self.call("Browser.close", timeout_s=5)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._to is not None:
            os.close(self._to)
            self._to = None
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._log.close()
        self._proc = None

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._from, "rb", buffering=0) as f:
            while True:
                chunk = f.read(65536)
                if not chunk:
                    break
                buf += chunk
                *messages, buf = buf.split(b"\0")
                for raw in messages:
                    msg = json.loads(raw)
                    with self._cond:
                        if "id" in msg:
                            self._answers[msg["id"]] = msg
                        else:
                            self.events.append(msg)
                        self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout_s: float = TIMEOUT_S,
    ) -> dict[str, Any]:
        if self._to is None:
            raise CdpError("the browser is closed")
        with self._cond:
            self._next += 1
            mid = self._next
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if (
                not self._cond.wait_for(
                    lambda: (
                        mid in self._answers
                        or (self._reader is not None and not self._reader.is_alive())
                    ),
                    timeout=timeout_s,
                )
                or mid not in self._answers
            ):
                raise CdpError(f"{method}: no answer from the browser")
            answer = self._answers.pop(mid)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def open(self, url: str) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        page = Page(self, session)
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        page.call("Page.navigate", {"url": url})
        return page


class Page:
    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, session=self.session)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, *, full_page: bool = False) -> Path:
        """A PNG of the viewport (``full_page``: of the whole page)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
        data = self.call("Page.captureScreenshot", params)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def events(self, method: str) -> list[dict[str, Any]]:
        with self.browser._cond:
            return [
                e["params"]
                for e in self.browser.events
                if e.get("method") == method and e.get("sessionId") == self.session
            ]
