"""``GET /playground``: the static page for talking to a live session from a browser."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()
PAGE = resources.files("handler").joinpath("static/playground.html")


@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    """The playground page: API key, voice and persona, press to talk (docs/sessions.md)."""
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
