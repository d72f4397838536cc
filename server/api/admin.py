"""The skill library over HTTP: upload, list, show, download, delete, and stored compositions."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from adapter_store.skill_info import SkillInfo
from adapter_store.validation import check_name, check_text, validate_files
from composer.spec import Composition
from lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from lora.errors import InvalidRequestError, UnavailableError
from server.core.compose_budget import check_composition
from server.core.state import Service
from server.edge import auth
from server.edge.auth import require_scope
from server.edge.disconnect import ClientGone, unless_disconnected
from server.edge.uploads import pack_tar_gz, unpack
from server.jobs import learn_api, optimize_api
from server.jobs.learn_composition import LearnOptions
from server.jobs.learned_weights import OptimizeOptions
from server.jobs.library import PageAfter, PageLimit, create_and_store, page
from server.jobs.optimize_api import OptimizeJob
from server.jobs.quality import engine_answerer

router = APIRouter(tags=["skills"])
admin = [Depends(require_scope("admin"))]
read = [Depends(require_scope("read"))]


def _state(request: Request) -> Service:
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
    has_more: bool = False  # more skills after ``last_id`` (ask again with ``after=last_id``)
    first_id: str | None = None
    last_id: str | None = None


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
    service = _state(request)
    auth.check_names(request, [name])
    limit = service.settings.max_upload_mb * 1024 * 1024  # the body as a whole is capped by limits.BodySizeLimit
    example_list, tag_list = _json_list(examples, "examples"), _json_list(tags, "tags")
    check_text(service.settings.text_limits(), description=description, examples=example_list, tags=tag_list)
    raw = [(f.filename or "", await f.read()) for f in files]
    for f in files:  # python-multipart's spooled copy goes now, not when the response is sent
        await f.close()
    payload = await asyncio.to_thread(unpack, raw, limit)
    del raw  # an archive's bytes, once unpacked (loose files live on in payload)
    adapter = await asyncio.to_thread(validate_files, payload, service.base_spec, max_rank=service.settings.max_adapter_rank,
                                      name=name, max_tensors=service.settings.max_tensors)
    return await asyncio.to_thread(
        service.registry.add, name, adapter, description=description, examples=example_list, tags=tag_list
    )


@router.get("/v1/adapters", response_model=SkillList, dependencies=read)
async def list_adapters(request: Request, limit: PageLimit = None, after: PageAfter = None) -> SkillList:
    """The latest version of every skill, by name; ``limit`` and ``after`` page through them."""
    skills, more = await page(_state(request).registry, auth.namespace(request), after, limit)
    return SkillList(data=skills, has_more=more, first_id=skills[0].name if skills else None,
                     last_id=skills[-1].name if skills else None)


@router.get("/v1/adapters/{name:path}/download", response_class=Response, dependencies=read,
            responses={200: {"content": {"application/gzip": {}}}})
async def download_adapter(name: str, request: Request) -> Response:
    auth.check_names(request, [name])
    info, adapter = await asyncio.to_thread(_state(request).registry.load, name)
    flat = info.name.replace("/", "_")  # team/name -> team_name: one folder, one file name
    data = pack_tar_gz({CONFIG_FILE: adapter.config_bytes(), WEIGHTS_FILE: adapter.weights_bytes()}, flat)
    return Response(
        data, media_type="application/gzip",
        headers={"content-disposition": f'attachment; filename="{flat}-v{info.version}.tar.gz"'},
    )


@router.get("/v1/adapters/{name:path}", response_model=SkillDetail, dependencies=read)
async def show_adapter(name: str, request: Request) -> SkillDetail:
    auth.check_names(request, [name])
    reg = _state(request).registry
    info = await asyncio.to_thread(reg.info, name)
    versions = await asyncio.to_thread(reg.versions, info.name)
    return SkillDetail(**info.model_dump(), versions=[v.version for v in versions])


@router.delete("/v1/adapters/{name:path}", response_model=Deleted, dependencies=admin)
async def delete_adapter(name: str, request: Request) -> Deleted:
    auth.check_names(request, [name])
    service = _state(request)
    gone = await asyncio.to_thread(service.registry.delete, name)
    await service.cache.forget(gone)
    return Deleted(deleted=[g.ref for g in gone])


class CompositionRequest(Composition):
    name: str = Field(description="the new skill's name")
    description: str = ""
    examples: list[str] = Field(default_factory=list)
    quality_prompts: int = Field(default=8, ge=0, le=64, description="example prompts per input skill for the quality "
                                 "report (0: no report)")
    min_agreement: float | None = Field(default=None, ge=0.0, le=1.0, description="refuse to store the composition if it "
                                        "gives some input skill's own answer on less than this share of its examples")
    optimize: OptimizeOptions | None = Field(default=None, description="learn the weights from examples (LoraHub) in a "
                                             "background job: the answer is 202 with the job (GET /v1/compositions/jobs/{id})")
    learn: LearnOptions | None = Field(default=None, description=(
        "learn fusion weights per skill, layer or module from prompt/answer examples of a task that needs these skills "
        "together (and optionally a residual LoRA on top), with a report against baselines: 202 with the job"))


@router.post("/v1/compositions", status_code=201, response_model=SkillInfo, dependencies=admin,
             responses={202: {"model": OptimizeJob, "description": "with optimize or learn: the job started"}})
async def create_composition(body: CompositionRequest, request: Request):
    """Compose and store as a new skill, with a quality report (agreement with each input skill's own
    answers on its example prompts); ``weights: "auto"`` stores a context-aware template; ``optimize``
    learns the weights from examples in a background job (202)."""
    service = _state(request)
    if problems := check_name(body.name, reserved=(service.base_id,)):
        raise InvalidRequestError("; ".join(problems), param="name")
    check_text(service.settings.text_limits(), description=body.description, examples=body.examples)
    auth.check_names(request, [body.name])
    auth.check_names(request, body.skills, param="skills")
    comp = Composition(**body.model_dump(include=set(Composition.model_fields)))
    check_composition(service.settings, comp, param="skills")
    if body.learn is not None:
        if body.optimize is not None:
            raise InvalidRequestError("optimize searches per-skill weights and learn learns them by gradient: send one "
                                      "of the two", param="learn")
        learn_api.check_request(comp, body.model_fields_set, body.min_agreement)
        job = await learn_api.start(request, service, comp, body.learn, name=body.name, description=body.description,
                                    examples=body.examples)
        return JSONResponse(job.model_dump(mode="json"), status_code=202)
    if (body.quality_prompts or body.min_agreement is not None) and not service.engine.ready():
        raise UnavailableError("the engine is not ready yet: the quality report needs it (or send quality_prompts 0)")
    if body.optimize is not None:
        if comp.context_aware:
            raise InvalidRequestError("optimize learns fixed weights and 'auto' chooses them per prompt: send one of "
                                      "the two", param="optimize")
        job = await optimize_api.start(request, service, comp, body.optimize, name=body.name, description=body.description,
                                       examples=body.examples, quality_prompts=body.quality_prompts,
                                       min_agreement=body.min_agreement)
        return JSONResponse(job.model_dump(mode="json"), status_code=202)
    try:  # the client gone, the composition (and its quality report) stops and nothing is stored
        return await unless_disconnected(request, create_and_store(
            service.registry, service.base_spec, comp, body.name, body.description, body.examples,
            max_rank=service.settings.max_adapter_rank, answer=engine_answerer(service),
            weigh=lambda c: (lambda text: service.route_within(text, c)), engine=service.settings.engine,
            quality_prompts=body.quality_prompts, min_agreement=body.min_agreement, composer=service.cache.composer,
            text=service.settings.text_limits()))
    except ClientGone:
        return Response(status_code=499)


# what a client can do with a skill it has just stored (upload or composition): OpenAPI links, so that
# generated clients and stateful testers (schemathesis) can follow upload -> show -> compose -> chat -> delete
NEXT_STEPS = {
    "ShowSkill": ("/v1/adapters/{name}", "get", {"parameters": {"name": "$response.body#/name"}}),
    "DownloadSkill": ("/v1/adapters/{name}/download", "get", {"parameters": {"name": "$response.body#/name"}}),
    # (stored as the skill's next version: a composition needs a name)
    "ComposeWithSkill": ("/v1/compositions", "post",
                         {"requestBody": {"name": "$response.body#/name", "skills": ["$response.body#/name"]}}),
    "ChatWithSkill": ("/v1/chat/completions", "post", {"requestBody": {"model": "$response.body#/name"}}),
    "CompleteWithSkill": ("/v1/completions", "post", {"requestBody": {"model": "$response.body#/name"}}),
    "DeleteSkill": ("/v1/adapters/{name}", "delete", {"parameters": {"name": "$response.body#/name"}}),
}


def publish_links(spec: dict) -> None:
    """Add ``NEXT_STEPS`` as links on the 201 answers of upload and compose."""
    paths = spec["paths"]
    links = {name: {"operationId": paths[path][method]["operationId"], **how}
             for name, (path, method, how) in NEXT_STEPS.items() if method in paths.get(path, {})}
    for path in ("/v1/adapters", "/v1/compositions"):
        paths[path]["post"]["responses"]["201"]["links"] = links
