"""How refusals become HTTP answers: one table from the service's exceptions to a status, the
422 body that names the field, the OpenAI error envelope, and each route's documented errors."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.jobs.errors import FieldError, IdempotencyConflict, Overloaded, TooManyJobs
from deployments.storage import StorageError

DESCRIPTIONS = {
    400: "malformed body, or the request was moderated (OpenAI routes)",
    401: "missing or unknown API key",
    404: "unknown model or job",
    409: "Idempotency-Key reused with another body, or the job already finished",
    413: "body or input image over its cap",
    415: "wrong Content-Type",
    422: "a field out of its bounds: `detail[].loc` names it, `msg` says the bound (the OpenAI routes "
    "also answer OpenAI's `error` object: `param` names the field)",
    429: "too many jobs in flight for this key (Retry-After)",
    500: "the job failed after its retries (OpenAI routes)",
    503: "overloaded, or storage unavailable (Retry-After)",
    504: "no result within sync_timeout_s (OpenAI routes)",
}


def documented(*codes: int) -> dict:
    """OpenAPI entries for a route's error answers (FastAPI adds 422 itself where it parses a body)."""
    return {code: {"description": DESCRIPTIONS[code]} for code in codes}


OPENAI_PREFIX = "/v1/images/"
OPENAI_CODES = {
    401: "invalid_api_key", 409: "idempotency_key_reused", 413: "request_too_large",
    415: "unsupported_media_type", 422: "invalid_value", 429: "rate_limit_exceeded", 503: "overloaded",
}  # fmt: skip


def envelope(path: str, status: int, message: str, param: str | None = None) -> dict:
    """On the OpenAI routes, a refusal also carries OpenAI's error object (beside FastAPI's
    `detail`, so that either kind of client reads it): {"error": {message, type, param, code}}.
    Elsewhere, nothing."""
    if not path.startswith(OPENAI_PREFIX):
        return {}
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": OPENAI_CODES.get(status)}}


def json_error(status: int, detail: str, headers: dict | None = None, path: str = "") -> JSONResponse:
    return JSONResponse(
        {"detail": detail} | envelope(path, status, detail), status_code=status, headers=headers
    )


def field_error(status: int, field: str, message: str, path: str = "") -> JSONResponse:
    """The 422 body FastAPI gives, with `loc` in pydantic's form: "loras[1].path" (or "loras.1.path")
    is ["body", "loras", 1, "path"], as a schema's own refusal of loras[1].scale would say it."""
    loc = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", field)]
    body = {"detail": [{"loc": ["body", *loc], "msg": message, "type": "value_error"}]}
    return JSONResponse(body | envelope(path, status, f"{field}: {message}", field), status)


def openai_error(status: int, message: str, type_: str, **extra) -> JSONResponse:
    """The OpenAI API's error envelope: {"error": {"message", "type", ...}}."""
    return JSONResponse({"error": {"message": message, "type": type_, **extra}}, status_code=status)


def validation_error(e: RequestValidationError, path: str = "") -> JSONResponse:
    """FastAPI's 422 without echoing the input back: it can be megabytes, or text that cannot be
    encoded as UTF-8 (an unpaired surrogate), which would turn a 422 into a 500."""
    detail = [
        {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
        | ({"ctx": {k: str(v)[:200] for k, v in err["ctx"].items()}} if err.get("ctx") else {})
        for err in e.errors()
    ]
    first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"][1:]) or None  # past "body" / "query"
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return JSONResponse({"detail": detail} | envelope(path, 422, message, param), status_code=422)


# The service's refusals: (status, body detail; None: the exception's own message), and whether the
# client should retry after `retry_after_s`.
STATUS: dict[type[Exception], tuple[int, str | None, bool]] = {
    TooManyJobs: (429, None, True),
    Overloaded: (503, "overloaded: {e}; retry later", True),
    StorageError: (503, "storage is unavailable; retry later", True),
    IdempotencyConflict: (409, "Idempotency-Key was already used with a different request body", False),
}


def install(app: FastAPI, retry_after_s: int) -> None:
    """Register the handlers that map exceptions to answers."""
    retry = {"Retry-After": str(retry_after_s)}

    def answer(_request: Request, e: Exception) -> JSONResponse:
        status, detail, retryable = next(v for t, v in STATUS.items() if isinstance(e, t))
        text = str(e) if detail is None else detail.format(e=e)
        return json_error(status, text, retry if retryable else None, _request.url.path)

    async def http_error(request: Request, e: StarletteHTTPException):
        if request.url.path.startswith(OPENAI_PREFIX) and isinstance(e.detail, str):
            return json_error(e.status_code, e.detail, e.headers, request.url.path)
        return await http_exception_handler(request, e)

    for exc in STATUS:
        app.add_exception_handler(exc, answer)
    app.add_exception_handler(FieldError, lambda r, e: field_error(e.status, e.field, e.message, r.url.path))
    app.add_exception_handler(RequestValidationError, lambda r, e: validation_error(e, r.url.path))
    app.add_exception_handler(StarletteHTTPException, http_error)
