"""How refusals become HTTP answers: one table from the service's exceptions to a status, the
422 body that names the field, the OpenAI error envelope, and each route's documented errors."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from deployments.jobs.errors import FieldError, IdempotencyConflict, Overloaded, TooManyJobs
from deployments.storage import StorageError

DESCRIPTIONS = {
    400: "malformed body, or the request was moderated (OpenAI routes)",
    401: "missing or unknown API key",
    404: "unknown model or job",
    409: "Idempotency-Key reused with another body, or the job already finished",
    413: "body or input image over its cap",
    415: "wrong Content-Type",
    422: "a field out of its bounds: `detail[].loc` names it, `msg` says the bound",
    429: "too many jobs in flight for this key (Retry-After)",
    500: "the job failed after its retries (OpenAI routes)",
    503: "overloaded, or storage unavailable (Retry-After)",
    504: "no result within sync_timeout_s (OpenAI routes)",
}


def documented(*codes: int) -> dict:
    """OpenAPI entries for a route's error answers (FastAPI adds 422 itself where it parses a body)."""
    return {code: {"description": DESCRIPTIONS[code]} for code in codes}


def json_error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def field_error(status: int, field: str, message: str) -> JSONResponse:
    """The 422 body FastAPI gives, with `loc` in pydantic's form: "loras[1].path" (or "loras.1.path")
    is ["body", "loras", 1, "path"], as a schema's own refusal of loras[1].scale would say it."""
    loc = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", field)]
    return JSONResponse({"detail": [{"loc": ["body", *loc], "msg": message, "type": "value_error"}]}, status)


def openai_error(status: int, message: str, type_: str, **extra) -> JSONResponse:
    """The OpenAI API's error envelope: {"error": {"message", "type", ...}}."""
    return JSONResponse({"error": {"message": message, "type": type_, **extra}}, status_code=status)


def validation_error(e: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without echoing the input back: it can be megabytes, or text that cannot be
    encoded as UTF-8 (an unpaired surrogate), which would turn a 422 into a 500."""
    detail = [
        {"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
        | ({"ctx": {k: str(v)[:200] for k, v in err["ctx"].items()}} if err.get("ctx") else {})
        for err in e.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


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
        return json_error(status, text, retry if retryable else None)

    for exc in STATUS:
        app.add_exception_handler(exc, answer)
    app.add_exception_handler(FieldError, lambda _r, e: field_error(e.status, e.field, e.message))
    app.add_exception_handler(RequestValidationError, lambda _r, e: validation_error(e))
