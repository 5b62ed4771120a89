"""Start ``python app.py`` as a child process on a free port and wait until it has warmed up."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """``python app.py`` in a child process; records when it serves and when warm-up finished."""

    def __init__(self, *args: str, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.lines: list[str] = []
        self.started = time.perf_counter()
        self.warm_s: float | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(self.port), "--host", "127.0.0.1", *args], cwd=REPO,
            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if "warm:" in line and self.warm_s is None:
                self.warm_s = time.perf_counter() - self.started

    def wait_serving(self, timeout: float = 300) -> float:
        import urllib.request

        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("app exited:\n" + "\n".join(self.lines[-30:]))
            try:
                urllib.request.urlopen(self.url, timeout=2).read(100)
                return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("app did not start serving")

    def wait_warm(self, timeout: float = 900) -> float:
        deadline = time.perf_counter() + timeout
        while self.warm_s is None:
            if time.perf_counter() > deadline or self.proc.poll() is not None:
                raise RuntimeError("app did not warm up:\n" + "\n".join(self.lines[-30:]))
            time.sleep(0.2)
        return self.warm_s

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def gallery_items(output) -> list:
    """The items of a gallery output as gradio_client returns it: a list, or an update dict with 'value'."""
    if isinstance(output, dict):
        output = output.get("value")
    return output if isinstance(output, list) else []
