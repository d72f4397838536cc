"""What the tests share besides fixtures (those are in the conftest.py files): where Redis and the demo
skills are, key prefixes, random LoRA adapters on made-up or real module shapes, a Redis server a test
owns, and the router's default thresholds."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import torch

from adapter_store.redis_conn import connect
from lora.adapter import LoraAdapter, factor_key
from server.cli.launch import ROOT, free_port
from server.core.settings import Settings

TEST_REDIS_URL = os.environ.get("MOSAIC_TEST_REDIS_URL", "redis://127.0.0.1:6379/3")
# a TestClient on this machine, as server/edge/auth.py tells one: a loopback client address and Host
LOCAL, LOCAL_URL = ("127.0.0.1", 50000), "http://127.0.0.1"
DEMO = ROOT / "bench" / "skills"  # the 8 demo skills (PEFT folders with mosaic.json)
BASE = "SmolLM2-135M-Instruct"  # the bundled base model's id
JSON_PROMPT = "Extract the person as JSON: Ada is 36 years old and lives in London."
# the router thresholds the server uses by default (not read from the environment); a test that changes the
# library waits for the router's retraining (tests/router/test_background_training.py covers the bounded wait)
ROUTER_CONFIG = dataclasses.replace(Settings.model_construct().router_config(), train_wait_seconds=None)


def new_prefix(kind: str = "mosaic-test") -> str:
    """A Redis key prefix no other test uses."""
    return f"{kind}-{uuid.uuid4().hex[:10]}"


def mosaic_env(base_model_dir, model_id: str, data_dir, prefix: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a ``mosaic`` process under test: the test Redis under its own prefix, its own data
    folder, the bundled base model, no API key from the caller's environment; ``extra`` adds MOSAIC_* settings."""
    env = {k: v for k, v in os.environ.items() if k != "MOSAIC_API_KEY"}
    env.update(MOSAIC_REDIS_URL=TEST_REDIS_URL, MOSAIC_REDIS_PREFIX=prefix or new_prefix(), MOSAIC_DATA_DIR=str(data_dir),
               MOSAIC_BASE_MODEL=str(base_model_dir), MOSAIC_BASE_MODEL_ID=model_id, MOSAIC_ENGINE="vllm")
    return env | {f"MOSAIC_{k.upper()}": v for k, v in extra.items()}


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(env: dict[str, str], *args: str) -> CliResult:
    """``mosaic ARGS`` in this process with ``env`` as its environment (typer's test runner: seconds faster
    than a new process per call, which imports torch again); its exit code and output, as a process gives
    them. An exception the CLI does not turn into an exit code is raised here, not hidden in a code."""
    from typer.testing import CliRunner

    from server.cli import app
    from server.core.settings import get_settings

    get_settings.cache_clear()  # settings are read once per process: once per call here
    try:
        result = CliRunner().invoke(app, list(args), env={**{k: None for k in os.environ if k.startswith("MOSAIC_")}, **env})
    finally:
        get_settings.cache_clear()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout, result.stderr)


@contextmanager
def reference_app(redis_client: redis.Redis, **settings):
    """A test client of the whole app on the reference engine (``MOSAIC_ENGINE=hf``), under a Redis prefix of
    its own (dropped afterwards), calling from a loopback address; ``settings`` override the defaults."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app

    prefix = new_prefix()
    try:
        with TestClient(create_app(Settings(engine="hf", redis_url=TEST_REDIS_URL, redis_prefix=prefix, **settings)),
                        client=LOCAL, base_url=LOCAL_URL) as client:
            yield client
    finally:
        drop_prefix(redis_client, prefix)


def drop_prefix(client: redis.Redis, prefix: str) -> None:
    """Remove every key under ``prefix`` (tests never FLUSHALL a shared Redis)."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)


def random_adapter(
    shapes: dict[str, tuple[int, int]],
    r: int,
    *,
    alpha: float = 16,
    seed: int = 0,
    rslora: bool = False,
    base_model: str = "tiny",
    dtype: torch.dtype = torch.float32,
    scale: float = 0.1,
) -> LoraAdapter:
    """A PEFT-format adapter with random (non-zero) A and B for each module in ``shapes``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_out, d_in) in shapes.items():
        tensors[factor_key(name, "A")] = (torch.randn(r, d_in, generator=g) * scale).to(dtype)
        tensors[factor_key(name, "B")] = (torch.randn(d_out, r, generator=g) * scale).to(dtype)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": r,
        "lora_alpha": alpha, "use_rslora": rslora, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in shapes}),
        "lora_dropout": 0.0, "bias": "none",
    }
    return LoraAdapter(config=config, tensors=tensors)


def dense_delta(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The oracle: each module's ΔW = s·B·A as a dense float64 matrix."""
    return {n: m.scaling * (m.B.double() @ m.A.double()) for n, m in adapter.modules().items()}


# ---- the router: the demo skills' real descriptions and examples on small random adapters ----------------
ROUTER_SHAPES = {"model.layers.0.self_attn.q_proj": (576, 576)}


def add_demo_profiles(registry) -> None:
    """The 8 demo skills' real descriptions and examples, on small random adapters."""
    for d in sorted(DEMO.iterdir()):
        meta = json.loads((d / "mosaic.json").read_text())
        registry.add(d.name, random_adapter(ROUTER_SHAPES, r=2, seed=len(d.name)), description=meta["description"],
                     examples=meta["examples"])


# ---- shard storage: libraries that share directions ---------------------------------------------------
SHARD_SHAPES = {f"model.layers.{i}.self_attn.{p}": (192, 128) for i in range(3) for p in ("q_proj", "v_proj")}


def dense_rel_error(original: LoraAdapter, decoded: LoraAdapter) -> float:
    want, got = dense_delta(original), dense_delta(decoded)
    num = sum(float((want[n] - got[n]).norm() ** 2) for n in want)
    return (num / sum(float(w.norm() ** 2) for w in want.values())) ** 0.5


def structured_library(n: int, r: int = 8, width: int = 4, atoms: int = 12, seed: int = 0) -> list[LoraAdapter]:
    """Adapters whose rank vectors are made of shards drawn from a small shared set (plus 1% noise):
    the case shard sharing is for (skills trained on one base model that share directions)."""
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(atoms, width, generator=g)
    out = []
    for i in range(n):
        tensors = {}
        for name, (d_out, d_in) in SHARD_SHAPES.items():
            def vec(d):
                pick = torch.randint(0, atoms, (r, d // width), generator=g)
                v = bank[pick].reshape(r, d) * (torch.rand(r, 1, generator=g) + 0.5)
                return v + 0.01 * torch.randn(r, d, generator=g)
            tensors[factor_key(name, "A")] = vec(d_in) * 0.1
            tensors[factor_key(name, "B")] = vec(d_out).T.contiguous() * 0.1
        out.append(LoraAdapter(config={"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
                                       "base_model_name_or_path": "tiny"}, tensors=tensors))
    return out


# ---- a Redis server a test owns --------------------------------------------------------------------------
class OwnRedis:
    """A redis-server a test starts, stops and kills (append-only file on, like the managed one)."""

    def __init__(self, folder) -> None:
        self.folder, self.url = folder, f"redis://127.0.0.1:{free_port()}/0"

    def start(self) -> redis.Redis:
        return connect(self.url, managed_dir=self.folder, timeout=0.5)

    def pid(self) -> int:
        return int(redis.Redis.from_url(self.url).info("server")["process_id"])

    def kill(self) -> None:
        import signal

        os.kill(self.pid(), signal.SIGKILL)
        while True:  # wait until the port is free again
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping()
                time.sleep(0.05)
            except redis.ConnectionError:
                return
