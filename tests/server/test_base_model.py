"""Preparing the base model: an interrupted run leaves nothing half-made."""

import pytest

from server.core import base_model
from server.core.settings import Settings


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    def half(gguf, out, bar, task):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(base_model, "_convert", half)
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        base_model.prepare(settings, quiet=True)
    models = tmp_path / "models"
    assert list(models.iterdir()) == []


def test_prepared_model_is_reused(base_spec):
    settings = Settings()
    path = base_model.prepare(settings, quiet=True)
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert base_model.prepare(settings, quiet=True) == path
    assert "model.layers.29.self_attn.q_proj" in base_spec.shapes


def test_custom_base_model_folder_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        base_model.prepare(Settings(base_model=str(tmp_path)), quiet=True)
