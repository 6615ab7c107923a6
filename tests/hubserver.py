"""A stand-in for huggingface.co on 127.0.0.1, for tests that drive the REAL `huggingface_hub` client.

It speaks the few endpoints `snapshot_download` and `hf_hub_download` use (checked against
huggingface_hub 2.4.0):

    GET  /api/models/{repo}[/revision/{rev}]   repo_info / model_info (`?blobs=true`, `?expand=...`)
    GET  /api/models/{repo}/tree/{rev}[/{dir}] list_repo_tree (`?recursive=true`), one page
    HEAD /{repo}/resolve/{rev}/{file}          file metadata: X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{file}          the bytes (Range requests answered with 206)
    GET  /api/agent-harnesses                  an empty registry (the client's user-agent asks for it)

Every file is served as a plain git file (ETag = its git blob sha1, no LFS, no redirect) and no
`X-Xet-*` header is ever sent, so the client never takes its Xet path: it does plain HTTP GETs.
Errors carry the hub's `X-Error-Code` header, which is what the client maps to its exceptions
(over http:// a bare 401/404 would only be a generic HfHubHTTPError):

    unknown repository             404 RepoNotFound     -> RepositoryNotFoundError
    gated repository, no/bad token 401 GatedRepo        -> GatedRepoError (a RepositoryNotFoundError)
    unknown revision               404 RevisionNotFound -> RevisionNotFoundError
    unknown file (hf_hub_download) 404 EntryNotFound    -> RemoteEntryNotFoundError (an EntryNotFoundError)

A gated repository answers 401 on every endpoint (its info and listing included, which the real
hub shows to anyone) unless the request carries `Authorization: Bearer <server.token>`.

Pointing the client at it. `huggingface_hub.constants` reads its environment ONCE, at import:
`HF_ENDPOINT` -> `ENDPOINT` and `HUGGINGFACE_CO_URL_TEMPLATE`, `HF_HOME` -> `HF_HUB_CACHE` (and
the token file path), `HF_HUB_OFFLINE` -> `HF_HUB_OFFLINE`. So either set the environment before
`huggingface_hub` is imported (a subprocess), or, in-process, patch the constants (the client
reads them at call time)::

    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)   # tests/conftest.py sets HF_HUB_OFFLINE=1
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))  # no stored token
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # no agent-registry request
    monkeypatch.delenv("HF_TOKEN", raising=False)              # read at call time

(`snapshot_download(..., endpoint=hub.url)` also works per call, but code under test does not
pass it. The module-level helpers such as `huggingface_hub.model_info` belong to an `HfApi`
built at import and keep the endpoint of that moment; `HfApi(endpoint=...)` does not.)

Usage::

    with HubServer() as hub:
        sha = hub.add_repo("org/model", folder)           # branch "main"
        path = snapshot_download("org/model", allow_patterns=["*.json"])
        assert len(hub.downloads) == 1                     # GETs of file bytes
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_CHUNK = 1 << 20
_DATE = "2025-01-01T00:00:00.000Z"  # lastModified / createdAt of every repo (the client parses them)


@dataclass(frozen=True)
class _File:
    disk: Path  # where the bytes are (read at request time: do not change a folder once added)
    size: int
    oid: str  # git blob sha1, as the hub gives it: the ETag and the cache's blob name


@dataclass(frozen=True)
class _Revision:
    sha: str
    files: dict[str, _File]  # path in the repo ("a/b.json") -> file


@dataclass
class _Repo:
    gated: bool
    branches: dict[str, _Revision]

    def revision(self, rev: str) -> _Revision | None:
        """A branch name, or the full commit sha of one of the branches."""
        if rev in self.branches:
            return self.branches[rev]
        return next((r for r in self.branches.values() if r.sha == rev), None)


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HubServer:
    """A stand-in for huggingface.co on 127.0.0.1 serving repositories from folders."""

    def __init__(self) -> None:
        self.token: str = "hf_" + secrets.token_hex(16)  # the one token accepted for gated repos
        self.requests: list[tuple[str, str]] = []  # (method, path without query) of every request
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        # Bound now (port chosen by the OS), so `url` is known before start().
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url: str = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- repositories ------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: Path, *, revision: str = "main", gated: bool = False) -> str:
        """Serve `folder`'s files as `repo_id` at `revision` (a branch name; several revisions of
        one repo may be added, each with its own folder); returns the commit sha (40 hex) of that
        revision. A gated repo answers 401 (as the hub does: the client must raise GatedRepoError)
        unless the request carries `Authorization: Bearer <self.token>`. A repo is gated if any of
        its add_repo calls said so. The sha is deterministic (repo, revision, file contents)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(folder)
        files = {
            p.relative_to(folder).as_posix(): _File(p, p.stat().st_size, _git_blob_sha1(p))
            for p in sorted(folder.rglob("*"))
            if p.is_file() and ".git" not in p.relative_to(folder).parts
        }
        h = hashlib.sha1(f"{repo_id}\0{revision}\0".encode())
        for name, f in files.items():
            h.update(f"{name}\0{f.oid}\0".encode())
        sha = h.hexdigest()
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(gated=False, branches={}))
            repo.gated = repo.gated or gated
            repo.branches[revision] = _Revision(sha, files)
        return sha

    @property
    def downloads(self) -> list[str]:
        """Paths of the GETs of file bytes (`/{repo}/resolve/...`): what a cache hit must not do."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()  # every response closes its connection: nothing lingers

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # with `Connection: close` on every response (no keep-alive)
    server: ThreadingHTTPServer

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    # -- routing -----------------------------------------------------------------------------

    def _handle(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        hub.requests.append((self.command, url.path))
        query = parse_qs(url.query)
        # split before unquoting: a revision like "refs/pr/1" comes as one segment, refs%2Fpr%2F1
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        try:
            if url.path == "/api/agent-harnesses":
                return self._json({"standardEnvVars": [], "harnesses": {}})
            if parts[:2] == ["api", "models"]:
                return self._api(hub, parts[2:], query)
            return self._resolve(hub, parts)
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-body
            pass

    def _find_repo(self, hub: HubServer, parts: list[str]) -> tuple[str | None, _Repo | None, list[str]]:
        """(repo_id, repo, the rest of the path): `org/name` (or a one-part `name`) first."""
        for n in (2, 1):
            repo_id = "/".join(parts[:n])
            if len(parts) >= n and repo_id in hub._repos:
                return repo_id, hub._repos[repo_id], parts[n:]
        return None, None, parts

    def _allowed(self, hub: HubServer, repo_id: str, repo: _Repo) -> bool:
        if not repo.gated or self.headers.get("Authorization") == f"Bearer {hub.token}":
            return True
        self._error(
            401,
            "GatedRepo",
            f"Access to model {repo_id} is restricted. You must have access to it "
            "and be authenticated to access it. Please log in.",
        )
        return False

    def _api(self, hub: HubServer, parts: list[str], query: dict[str, list[str]]) -> None:
        repo_id, repo, rest = self._find_repo(hub, parts)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if not self._allowed(hub, repo_id, repo):
            return
        if rest and rest[0] in ("revision", "tree") and len(rest) >= 2:
            kind, rev, sub = rest[0], rest[1], "/".join(rest[2:])
        elif not rest:
            kind, rev, sub = "revision", "main", ""
        else:
            return self._error(404, None, "Not found")
        revision = repo.revision(rev)
        if revision is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if kind == "tree":
            return self._tree(revision, sub, _true(query.get("recursive")))
        blobs = _true(query.get("blobs"))
        siblings = [
            {"rfilename": name, **({"size": f.size, "blobId": f.oid} if blobs else {})}
            for name, f in revision.files.items()
        ]
        info = {
            "_id": revision.sha[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": revision.sha,
            "lastModified": _DATE,
            "createdAt": _DATE,
            "private": False,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if "expand" in query:  # only the properties asked for (and the id), as the hub does
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in query["expand"]}
        self._json(info)

    def _tree(self, revision: _Revision, sub: str, recursive: bool) -> None:
        """One page of `list_repo_tree`: the files (and folders) under `sub`."""
        prefix = f"{sub.strip('/')}/" if sub.strip("/") else ""
        entries: dict[str, dict] = {}
        for name, f in revision.files.items():
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix) :].split("/")
            depth = len(rel) if recursive else 1
            for i in range(1, min(depth, len(rel) - 1) + 1):  # the folders on the way
                folder = prefix + "/".join(rel[:i])
                oid = hashlib.sha1(f"{revision.sha}\0{folder}".encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0, "path": folder})
            if len(rel) == 1 or recursive:
                entries[name] = {"type": "file", "oid": f.oid, "size": f.size, "path": name}
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{sub} does not exist on {revision.sha}")
        self._json(sorted(entries.values(), key=lambda e: e["path"]))

    def _resolve(self, hub: HubServer, parts: list[str]) -> None:
        repo_id, repo, rest = self._find_repo(hub, parts)
        if repo is None:
            if "resolve" in parts[1:3]:
                return self._error(404, "RepoNotFound", "Repository not found")
            return self._error(404, None, "Not found")
        if len(rest) < 3 or rest[0] != "resolve":
            return self._error(404, None, "Not found")
        if not self._allowed(hub, repo_id, repo):
            return
        rev, name = rest[1], "/".join(rest[2:])
        revision = repo.revision(rev)
        if revision is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        f = revision.files.get(name)
        commit = {"X-Repo-Commit": revision.sha}  # on a missing entry too: the client caches .no_exist
        if f is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist on {rev}", commit)
        self._send_file(f, commit)

    # -- responses ---------------------------------------------------------------------------

    def _send_file(self, f: _File, headers: dict[str, str]) -> None:
        start, end = 0, f.size - 1  # inclusive byte range
        status, extra = 200, {}
        rng = self.headers.get("Range")
        if rng and self.command == "GET":
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m and m[1]:
                start, end = int(m[1]), min(int(m[2]), f.size - 1) if m[2] else f.size - 1
            elif m and m[2]:  # a suffix: the last N bytes
                start = max(f.size - int(m[2]), 0)
            if not m or start > end:
                return self._error(416, None, "Range not satisfiable", {"Content-Range": f"bytes */{f.size}"})
            status, extra = 206, {"Content-Range": f"bytes {start}-{end}/{f.size}"}
        self.send_response(status)
        for k, v in {
            **headers,
            **extra,
            "ETag": f'"{f.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Length": str(end - start + 1),
            "Connection": "close",
        }.items():
            self.send_header(k, v)
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            return
        with f.disk.open("rb") as fh:
            fh.seek(start)
            left = end - start + 1
            while left > 0 and (chunk := fh.read(min(_CHUNK, left))):
                self.wfile.write(chunk)
                left -= len(chunk)

    def _json(self, data, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        for k, v in {
            **(headers or {}),
            "Content-Type": "application/json; charset=utf-8",
            "Content-Length": str(len(body)),
            "Connection": "close",
        }.items():
            self.send_header(k, v)
        self.end_headers()
        self.close_connection = True
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(
        self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None
    ) -> None:
        """The hub's error shape: X-Error-Code (what the client maps to its exceptions),
        X-Error-Message, and a JSON body {"error": message}."""
        h = {**(headers or {}), "X-Error-Message": message}
        if code:
            h["X-Error-Code"] = code
        self._json({"error": message}, status, h)


def _true(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes")
