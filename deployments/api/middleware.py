"""ASGI middleware in front of every route."""

from __future__ import annotations

from deployments.api.errors import json_error


class BodyGuard:
    """ASGI middleware in front of every route: the body cap holds for chunked uploads too (the
    body is read here, up to the cap, before any route sees it: 413 beyond), and request bodies
    must have the content type their route parses (415 otherwise)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    FORM = ("multipart/form-data", "application/x-www-form-urlencoded")

    @classmethod
    def expected_types(cls, method: str, path: str) -> tuple[str, ...]:
        if method != "POST":
            return ()
        return cls.FORM if path.rstrip("/") == "/v1/images/edits" else ("application/json",)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit_mb = self.max_bytes // 2**20
        too_large = json_error(413, f"request body must be at most {limit_mb} MB", path=scope["path"])
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        expected = self.expected_types(scope["method"], scope["path"])
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if expected and ctype not in expected:
            msg = f"Content-Type must be {' or '.join(expected)}, got {ctype or 'none'}"
            return await json_error(415, msg, path=scope["path"])(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notifications

        return await self.app(scope, replay, send)
