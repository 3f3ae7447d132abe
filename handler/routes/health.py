"""``GET /health`` (no auth)."""

from __future__ import annotations

from fastapi import APIRouter

from handler.deps import TritonDep

router = APIRouter()


@router.get("/health")
async def health(triton: TritonDep) -> dict[str, object]:
    """Always 200: ``status`` is "ok" when Triton is ready, else "degraded"."""
    ready = await triton.is_ready()
    return {"status": "ok" if ready else "degraded", "triton_ready": ready}
