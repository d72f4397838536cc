"""What the registry says about one stored skill version, and how a client names a version."""

from __future__ import annotations

from pydantic import BaseModel, Field, computed_field

from lora.adapter import LoraAdapter, content_id
from lora.errors import InvalidRequestError, NotFoundError


class SkillInfo(BaseModel):
    """Metadata of one stored skill version."""

    name: str
    version: int
    sha256: str
    base_model: str | None = None
    rank: int
    target_modules: list[str]
    description: str = ""
    examples: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    size: int = 0
    created: float = 0.0
    origin: str = "upload"
    composition: dict | None = None
    # how the weights are stored when a shard encoding is on: {"pool_version": V or None (kept exact),
    # "error": relative ‖ΔW − ΔŴ‖_F against the upload, "bytes": stored bytes, "sha256": of them, ...}
    mos: dict | None = None
    config_sha256: str = ""  # of the ΔW-relevant config (adapter.normalised_config)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @computed_field
    @property
    def content_id(self) -> str:
        """The identity of what is served: the weights (the upload's, or the shard encoding that
        replaced them: re-encoding changes the weights served) together with the ΔW-relevant config.
        Engine folders, engine ids and composition caches are named by it."""
        return content_id((self.mos or {}).get("sha256") or self.sha256, self.config_sha256)

    def same_content(self, adapter: LoraAdapter) -> bool:
        """Whether ``adapter`` is what this version was made from (weights and ΔW-relevant config)."""
        return self.sha256 == adapter.sha256() and self.config_sha256 == adapter.config_sha256()


def read_meta(raw: bytes | None) -> SkillInfo:
    """A version's stored ``meta`` field as a :class:`SkillInfo`; None means it was deleted meanwhile."""
    if raw is None:
        raise NotFoundError("skill vanished while it was read", param="model")
    return SkillInfo.model_validate_json(raw)


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` -> (name, None); ``"name@3"`` -> (name, 3)."""
    name, sep, ver = ref.partition("@")
    if not sep:
        return name, None
    if not (ver.isascii() and ver.isdigit()) or int(ver) < 1:  # str.isdigit() also accepts "²"
        raise InvalidRequestError(f"bad skill reference {ref!r}: the version after '@' must be a positive integer")
    return name, int(ver)


__all__ = ["SkillInfo", "parse_ref", "read_meta"]
