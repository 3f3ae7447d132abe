"""``GET /v1/models`` and ``POST /v1/converse`` (Kalpa error envelope)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from handler.deps import (
    CatalogDep,
    ContextDep,
    DeadlineDep,
    SettingsDep,
    parse_body,
    require_api_key,
    run_admitted,
)
from handler.routes.openapi import json_body
from handler.schemas.converse import ConverseRequest, ConverseResponse, ModelCard, ModelList
from handler.services.converse import converse
from handler.services.deadline import within_deadline

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/models", response_model=ModelList)
async def list_models(catalog: CatalogDep, deadline: DeadlineDep) -> ModelList:
    """Models Triton serves, with modes, speaker labels and voices."""
    models = await within_deadline(catalog.models(), deadline)
    return ModelList(data=[ModelCard(**m.public()) for m in models.values()])


@router.post(
    "/converse",
    response_model=ConverseResponse,
    openapi_extra=json_body(ConverseRequest),
)
async def post_converse(
    request: Request, settings: SettingsDep, ctx: ContextDep
) -> ConverseResponse:
    """Complete the open (last) turn of a conversation."""
    body = await parse_body(request, ConverseRequest, settings.max_request_bytes)
    return await run_admitted(request, ctx, lambda: converse(body, ctx))
