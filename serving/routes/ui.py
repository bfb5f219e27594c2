"""``/ui``: a web page to send a series and see its slices with the predicted mask.

Plain HTML, CSS and JavaScript from :mod:`serving`'s ``static`` folder: no build step, nothing
loaded from another site. The page itself is open; its call to ``/v1/predict`` carries the API
key typed into it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

__all__ = ["router", "STATIC_DIR"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_ASSETS = {"ui.js": "text/javascript", "ui.css": "text/css"}
# the page's own files only; it never loads or sends anything to another origin
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(tags=["ui"])


@router.get("/ui", response_class=FileResponse, include_in_schema=False)
def page() -> FileResponse:
    """The upload page."""
    return FileResponse(STATIC_DIR / "ui.html", media_type="text/html", headers=_HEADERS)


@router.get("/ui/{asset}", response_class=FileResponse, include_in_schema=False)
def asset(asset: str) -> FileResponse:
    """The page's script and style sheet."""
    media_type = _ASSETS.get(asset)
    if media_type is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no such file: {asset}")
    return FileResponse(STATIC_DIR / asset, media_type=media_type, headers=_HEADERS)
