"""Fixtures for the store tests: small packets, a real redis-server, helpers that run code in a child process."""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch

from kvpacket_rag.packet import KVPacket


def make_packet(seed: int = 0, tokens: int = 12, layers: int = 2, heads: int = 2, head_dim: int = 16,
                n_header: int = 2, n_trailer: int = 2, dtype=torch.float32, model: str = "model-a",
                adapter: str = "adapter-a") -> KVPacket:
    """A packet with random keys/values (per-channel offsets, as real keys have) and distinct token ids."""
    g = torch.Generator().manual_seed(seed)
    shape = (layers, heads, n_header + tokens + n_trailer, head_dim)
    offsets = torch.randn(layers, heads, 1, head_dim, generator=g) * 3
    keys = (torch.randn(shape, generator=g) + offsets).to(dtype)
    values = torch.randn(shape, generator=g).to(dtype)
    ids = torch.randint(0, 50_000, (tokens,), generator=g)
    return KVPacket(keys, values, ids, n_header, n_trailer, model, "tokenizer-a", adapter)


@pytest.fixture
def packets() -> list[KVPacket]:
    return [make_packet(seed) for seed in range(4)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(*extra: str) -> tuple[subprocess.Popen, str]:
    """Start a real redis-server on a free loopback port (no persistence); return (process, url)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; ./run.sh setup does it)")
    for _ in range(5):
        port = free_port()
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", *extra],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return process, f"redis://127.0.0.1:{port}/0"
            except OSError:
                time.sleep(0.02)
        process.kill()
        process.wait()
    pytest.skip("redis-server did not start on a loopback port")


@pytest.fixture(scope="session")
def redis_url():
    process, url = start_redis()
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def redis_prefix() -> str:
    """A fresh key prefix per test, so tests sharing the server never see each other's entries."""
    return f"test-{uuid.uuid4().hex[:8]}:"


def drop_dac_capabilities() -> None:
    """preexec_fn: remove root's permission-bypass capabilities, so directory modes apply to the child."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


# Child processes import the store without the package's model stack (transformers takes seconds to import).
LIGHT_IMPORT = """
import importlib.util, sys, types
_spec = importlib.util.find_spec("kvpacket_rag")
_package = types.ModuleType("kvpacket_rag")
_package.__path__ = list(_spec.submodule_search_locations)
sys.modules["kvpacket_rag"] = _package
"""


def run_python(code: str, *args: str, unprivileged: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (one torch thread); ``unprivileged`` drops root's DAC override."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    preexec = drop_dac_capabilities if unprivileged and os.geteuid() == 0 else None
    return subprocess.run([sys.executable, "-c", LIGHT_IMPORT + code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, preexec_fn=preexec, check=False)


@pytest.fixture(name="make_packet")
def make_packet_fixture():
    """The `make_packet` factory."""
    return make_packet


def popen_python(code: str, *args: str) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter (one torch thread), stdout/stderr piped as text."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", LIGHT_IMPORT + code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(name="popen_python")
def popen_python_fixture():
    """The `popen_python` helper."""
    return popen_python


@pytest.fixture(name="run_python")
def run_python_fixture():
    """The `run_python` helper."""
    return run_python


@pytest.fixture(name="start_redis")
def start_redis_fixture():
    """Start extra redis-servers (e.g. with a password); they are stopped after the test."""
    started = []

    def start(*extra):
        process, url = start_redis(*extra)
        started.append(process)
        return url

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)
