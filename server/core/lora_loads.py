"""Counting the engine's adapter loads: a vLLM worker extension (``--worker-extension-cls``, vLLM's own
way to add calls to its workers) whose calls wrap the worker's LoRA manager so that every adapter it
reads from disk (a load into its LRU cache of ``MOSAIC_MAX_CPU_LORAS``) is counted where it happens, in
the engine's own process. The server asks through ``AsyncLLM.collective_rpc`` (server/core/engine.py
``VllmEngine.adapter_loads``); warm-up's dummy adapters are not loads and are not counted."""

from __future__ import annotations

EXTENSION = "server.core.lora_loads.LoraLoadCounter"


class LoraLoadCounter:
    """Mixed into vLLM's worker class; ``self`` is the worker."""

    def mosaic_watch_lora_loads(self) -> bool:
        """Start counting (idempotent); False when the worker has no LoRA manager (LoRA off)."""
        manager = getattr(getattr(self, "model_runner", None), "lora_manager", None)
        if manager is None:
            return False
        if getattr(manager, "mosaic_loads", None) is None:
            manager.mosaic_loads = 0
            load = manager._load_adapter

            def counted(request):
                lora = load(request)
                manager.mosaic_loads += 1
                return lora

            manager._load_adapter = counted
        return True

    def mosaic_lora_loads(self) -> int:
        """Adapters read from disk since counting started."""
        manager = getattr(getattr(self, "model_runner", None), "lora_manager", None)
        return int(getattr(manager, "mosaic_loads", 0) or 0)
