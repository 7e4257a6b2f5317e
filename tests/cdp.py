"""Headless Chromium driven over the Chrome DevTools Protocol (`websocket-client`): shared by the docs check
(test_site.py) and the chat page test (test_serve.py)."""
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

from llm_book.training.distributed import free_port

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-allow-origins=*", "--window-size=1280,900"]


def chromium_path() -> str:
    "The Chromium binary (`$CHROMIUM`, else `chromium` or `chromium-browser` on PATH); AssertionError if none."
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed: `make system-deps` (apt install chromium)"
    return chromium


class DevTools:
    "A minimal Chrome DevTools Protocol client for one page target."

    def __init__(self, ws_url: str):
        import websocket
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True, enable_multithread=True)
        self.next_id, self.events = 0, []

    def _recv(self, timeout: float):
        self.ws.settimeout(max(timeout, 0.01))
        return json.loads(self.ws.recv())

    def send(self, method: str, timeout: float = 60, **params):
        self.next_id += 1
        call_id = self.next_id
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.time() + timeout
        while True:
            msg = self._recv(deadline - time.time())
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, name: str, timeout: float = 30) -> dict:
        deadline = time.time() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["method"] == name:
                    return self.events.pop(i)
            if time.time() > deadline:
                raise TimeoutError(f"no {name} within {timeout}s")
            try:
                msg = self._recv(deadline - time.time())
            except Exception:  # websocket timeout: loop re-checks the deadline
                continue
            if "method" in msg:
                self.events.append(msg)

    def evaluate(self, expression: str, timeout: float = 30):
        res = self.send("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def close(self):
        self.ws.close()


@contextlib.contextmanager
def chromium_page():
    "Start headless Chromium with a fresh profile; yield a `DevTools` connected to its page; stop it afterwards."
    profile = tempfile.mkdtemp(prefix="llm_book_chromium_")
    port = free_port()
    proc = subprocess.Popen([chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             f"--remote-debugging-port={port}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tools = None
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                    targets = [t for t in json.load(r) if t.get("type") == "page"]
                if targets:
                    break
            except OSError:
                pass
            assert proc.poll() is None, f"Chromium exited with status {proc.returncode}"
            assert time.time() < deadline, "Chromium's DevTools endpoint did not come up within 60 s"
            time.sleep(0.2)
        tools = DevTools(targets[0]["webSocketDebuggerUrl"])
        yield tools
    finally:
        if tools:
            tools.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
