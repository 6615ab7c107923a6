"""The playground: a static page at `/` (HTML, CSS and JavaScript shipped in the package, no build
step, nothing fetched from elsewhere) that calls this API from the browser with the key a person
pastes into it. The page itself needs no key and holds no secret."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from deployments.api.errors import json_error

router = APIRouter()
FILES = Path(__file__).parent / "playground"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
# the page may run its own script and styles, load images from here and data: URIs, and nothing else
POLICY = "default-src 'self'; img-src 'self' data: blob: https: http:; frame-ancestors 'none'"


def _file(name: str):
    path = FILES / name
    if path.suffix not in TYPES or not path.is_file():
        return json_error(404, "not found")
    headers = {"Content-Security-Policy": POLICY, "Cache-Control": "no-cache"}
    return FileResponse(path, media_type=TYPES[path.suffix], headers=headers)


@router.get("/", include_in_schema=False)
async def index():
    return _file("index.html")


@router.get("/playground/{name}", include_in_schema=False)
async def asset(name: str):
    return _file(name)
