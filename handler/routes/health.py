"""Operations routes, no key needed: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics``.

Load balancers: point the liveness check (restart when failing) at
``/health`` and the readiness check (send traffic when passing) at ``/ready``.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from handler.deps import CatalogDep, SettingsDep, TritonDep
from handler.errors import ApiError, NotFound, ServiceUnavailable
from handler.schemas.errors import Liveness, Readiness

router = APIRouter()


@router.get("/health", response_model=Liveness)
async def health() -> Liveness:
    """Liveness: always 200 while the process runs (asks nothing of Triton)."""
    return Liveness(status="ok")


@router.get("/ready", response_model=Readiness)
async def ready(triton: TritonDep, catalog: CatalogDep, settings: SettingsDep) -> Readiness:
    """Readiness: 200 when Triton is ready and serves the default model.

    A Triton that serves none of the API's models, or not ``default_model`` (what
    a request that names no model gets), would fail requests that are fine: such
    an instance is not ready, and the message says which.

    Raises:
        ServiceUnavailable: Triton not ready or unreachable, the catalogue did
            not load within ``ready_timeout_s``, or it lacks the default model
            (503 with ``Retry-After``).
    """
    retry = {"Retry-After": str(settings.retry_after_s)}
    try:
        async with asyncio.timeout(settings.ready_timeout_s):
            if not await triton.is_ready():
                raise ServiceUnavailable("the inference server is not ready", headers=retry)
            models = await catalog.models()
    except TimeoutError as error:
        raise ServiceUnavailable(
            "the inference server did not answer in time", headers=retry
        ) from error
    except ServiceUnavailable:
        raise
    except ApiError as error:
        raise ServiceUnavailable(
            "the model catalogue did not load", headers=retry, detail=error.detail or error.message
        ) from error
    if settings.default_model not in models:
        raise ServiceUnavailable(
            f"the default model {settings.default_model!r} is not served "
            f"(CONVERSE_DEFAULT_MODEL; served: {', '.join(sorted(models)) or 'none'})",
            headers=retry,
        )
    return Readiness(status="ready", models=sorted(models))


@router.get("/metrics", response_class=Response, include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the request metrics (404 unless ``metrics_enabled``).

    Raises:
        NotFound: metrics are disabled.
    """
    collected = request.app.state.metrics
    if collected is None:
        raise NotFound(f"no route {request.url.path}")
    return Response(collected.exposition(), media_type="text/plain; version=0.0.4")
