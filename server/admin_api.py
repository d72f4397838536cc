"""The skill library over HTTP: upload, list, show, download, delete, and stored compositions."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field

from adapter_store.adapter import CONFIG_FILE, WEIGHTS_FILE
from adapter_store.errors import InvalidRequestError
from adapter_store.registry import SkillInfo
from adapter_store.validation import check_name, validate_files
from composer.spec import Composition
from server import limits
from server.auth import require_scope
from server.library import store_composition
from server.state import Mosaic
from server.uploads import pack_tar_gz, unpack


router = APIRouter(tags=["skills"])
admin = [Depends(require_scope("admin"))]


def _state(request: Request) -> Mosaic:
    return request.app.state.mosaic


def _json_list(raw: str | None, field: str) -> list[str]:
    if raw is None or raw == "":
        return []
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = [raw]  # one plain string is one item
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise InvalidRequestError(f"{field} must be a JSON list of strings", param=field)
    return value


class SkillList(BaseModel):
    object: str = "list"
    data: list[SkillInfo]


class SkillDetail(SkillInfo):
    versions: list[int] = Field(default_factory=list)


class Deleted(BaseModel):
    deleted: list[str]


@router.post("/v1/adapters", status_code=201, response_model=SkillInfo, dependencies=admin)
async def upload_adapter(
    request: Request,
    name: Annotated[str, Form()],
    files: Annotated[list[UploadFile], File(description="adapter_config.json + adapter_model.safetensors, or one .tar.gz/.zip")],
    description: Annotated[str, Form()] = "",
    examples: Annotated[str | None, Form(description="JSON list of example prompts")] = None,
    tags: Annotated[str | None, Form(description="JSON list of tags")] = None,
) -> SkillInfo:
    m = _state(request)
    limit = m.settings.max_upload_mb * 1024 * 1024  # the body as a whole is capped by limits.BodySizeLimit
    raw = [(f.filename or "", await f.read()) for f in files]
    example_list, tag_list = _json_list(examples, "examples"), _json_list(tags, "tags")
    payload = unpack(raw, limit)
    adapter = await asyncio.to_thread(validate_files, payload, m.spec, max_rank=m.settings.max_adapter_rank, name=name)
    return await asyncio.to_thread(
        m.registry.add, name, adapter, description=description, examples=example_list, tags=tag_list
    )


@router.get("/v1/adapters", response_model=SkillList)
async def list_adapters(request: Request) -> SkillList:
    return SkillList(data=await asyncio.to_thread(_state(request).registry.list))


@router.get("/v1/adapters/{name}", response_model=SkillDetail)
async def show_adapter(name: str, request: Request) -> SkillDetail:
    reg = _state(request).registry
    info = await asyncio.to_thread(reg.info, name)
    versions = await asyncio.to_thread(reg.versions, info.name)
    return SkillDetail(**info.model_dump(), versions=[v.version for v in versions])


@router.get("/v1/adapters/{name}/download", response_class=Response,
            responses={200: {"content": {"application/gzip": {}}}})
async def download_adapter(name: str, request: Request) -> Response:
    info, adapter = await asyncio.to_thread(_state(request).registry.load, name)
    data = pack_tar_gz({CONFIG_FILE: adapter.config_bytes(), WEIGHTS_FILE: adapter.weights_bytes()}, info.name)
    return Response(
        data, media_type="application/gzip",
        headers={"content-disposition": f'attachment; filename="{info.name}-v{info.version}.tar.gz"'},
    )


@router.delete("/v1/adapters/{name}", response_model=Deleted, dependencies=admin)
async def delete_adapter(name: str, request: Request) -> Deleted:
    gone = await asyncio.to_thread(_state(request).registry.delete, name)
    return Deleted(deleted=[g.ref for g in gone])


class CompositionRequest(Composition):
    name: str = Field(description="the new skill's name")
    description: str = ""
    examples: list[str] = Field(default_factory=list)


@router.post("/v1/compositions", status_code=201, response_model=SkillInfo, dependencies=admin)
async def create_composition(body: CompositionRequest, request: Request) -> SkillInfo:
    m = _state(request)
    if problems := check_name(body.name):
        raise InvalidRequestError("; ".join(problems), param="name")
    comp = Composition(**body.model_dump(include=set(Composition.model_fields)))
    limits.check_composition(m.settings, comp, param="skills")
    return await asyncio.to_thread(
        store_composition, m.registry, m.spec, comp, body.name, body.description, body.examples,
        max_rank=m.settings.max_adapter_rank,
    )
