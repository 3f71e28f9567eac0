"""Headless Chromium (Debian's package) driven over the DevTools protocol, for page tests."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.helpers import free_port

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("chromium not found: .ci/setup installs Debian's chromium package")
    return path


class Page:
    """Open `url`, collect console/log errors, evaluate JS, take screenshots."""

    def __init__(self, url: str, width: int = 1280, height: int = 1800, timeout: float = 60):
        from websockets.sync.client import connect

        port = free_port()
        self.profile = tempfile.mkdtemp()
        self.proc = subprocess.Popen([chromium_path(), *CHROMIUM_FLAGS, f"--remote-debugging-port={port}",
                                      f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
                ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                break
            except Exception:
                if time.time() > deadline:
                    self.close()
                    raise RuntimeError("chromium did not start")
                time.sleep(0.2)
        self.ws = connect(ws, max_size=None, legacy=True)  # the connection itself, closed in close()
        self.next_id = 0
        self.errors: list[str] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Page.navigate", url=url)
        self._wait_event("Page.loadEventFired", timeout)

    def _handle(self, msg: dict) -> None:
        method = msg.get("method")
        if method == "Runtime.consoleAPICalled" and msg["params"]["type"] in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in msg["params"]["args"]))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(msg["params"]["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and msg["params"]["entry"]["level"] == "error":
            self.errors.append(msg["params"]["entry"]["text"] + " " + msg["params"]["entry"].get("url", ""))

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._handle(msg)

    def _wait_event(self, name: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = json.loads(self.ws.recv(timeout=timeout))
            self._handle(msg)
            if msg.get("method") == name:
                return
        raise TimeoutError(name)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout: float = 30) -> None:
        """Until the JS expression `condition` is truthy (polled in the page every 50 ms)."""
        ok = self.evaluate(f"new Promise(done => {{ const t0 = Date.now(); const t = setInterval(() => {{"
                           f" let v = false; try {{ v = !!({condition}); }} catch (e) {{}}"
                           f" if (v || Date.now() - t0 > {timeout * 1000}) {{ clearInterval(t); done(v); }} }}, 50); }})")
        if not ok:
            raise TimeoutError(f"page never had: {condition}")

    def press(self, key: str, ctrl: bool = False) -> None:
        """A key typed by the user (DevTools Input events: the page's keydown handlers see a real key)."""
        text = key if len(key) == 1 and not ctrl else ""
        code = {"Enter": 13, "Escape": 27}.get(key, ord(key.upper()) if len(key) == 1 else 0)
        common = dict(key=key, windowsVirtualKeyCode=code, modifiers=2 if ctrl else 0)
        self.call("Input.dispatchKeyEvent", type="keyDown", text=text, **common)
        self.call("Input.dispatchKeyEvent", type="keyUp", **common)

    def type_text(self, text: str) -> None:
        """Text typed into the focused field."""
        self.call("Input.insertText", text=text)

    def reload(self, timeout: float = 60) -> None:
        self.call("Page.reload", ignoreCache=True)
        self._wait_event("Page.loadEventFired", timeout)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
