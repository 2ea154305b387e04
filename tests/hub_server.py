"""A small, offline stand-in for the Hugging Face Hub, for tests.

It speaks the part of the Hub HTTP API that ``huggingface_hub`` (2.x, Xet disabled) uses for model
repos: repo creation, README metadata validation, preupload, the git-LFS batch API and the signed
``PUT`` it hands out, NDJSON commits (optionally as a pull request), branches, refs, repo info,
tree listings, whoami and ``HEAD``/``GET`` on ``/resolve``.  Repos live in a temp folder; every
branch (and ``refs/pr/N``) keeps its own chain of commits, so a branch and ``main`` can differ.

Authorization mimics the real Hub: write endpoints need ``Authorization: Bearer <token>`` equal to
the server's token, a wrong token is rejected everywhere with 401 ("Invalid credentials in
Authorization header"), and a private or missing repo answers 401 (anonymous) or 404
(authenticated) with ``X-Error-Code: RepoNotFound``.  The read-only token (``READ_TOKEN``) reads but
gets 403 on writes; repos can be created and written only under the user's name and its ``ORGS``
(403 elsewhere); ``/api/models/<repo>/auth-check[/write]`` answers as the Hub does.

``fail_next(pattern, status, count=1)`` makes the next ``count`` requests whose path matches a
regex answer ``status``, so tests can break an upload in the middle.

The ``hub_server`` pytest fixture starts the server on a free port of 127.0.0.1, points
``huggingface_hub`` at it (environment *and* the constants it copies at import time), gives it a
temporary ``HF_HOME`` and refuses any HTTP request made through ``huggingface_hub`` to another host.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

USER = "test-user"
DEFAULT_TOKEN = "hf_testtoken_0123456789abcdef"
READ_TOKEN = "hf_readonly_0123456789abcdef"  # valid, but only for reading (whoami says role "read")
#: Organisations the test user belongs to: it may create and write repos there and under its own name.
ORGS = ("org", "me")

#: Files the Hub stores with git-LFS whatever their size (subset of the default .gitattributes).
LFS_PATTERNS = (
    "*.7z",
    "*.arrow",
    "*.bin",
    "*.bz2",
    "*.ckpt",
    "*.ftz",
    "*.gguf",
    "*.gz",
    "*.h5",
    "*.joblib",
    "*.lfs.*",
    "*.mlmodel",
    "*.model",
    "*.msgpack",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.ot",
    "*.parquet",
    "*.pb",
    "*.pickle",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.rar",
    "*.safetensors",
    "*.tar.*",
    "*.tar",
    "*.tflite",
    "*.tgz",
    "*.wasm",
    "*.xz",
    "*.zip",
    "*.zst",
    "*tfevents*",
)
#: Above this size a file must go through LFS even if it is text.
REGULAR_MAX_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()

_NAME_RE = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def _wants_lfs(path: str, size: int, sample: bytes) -> bool:
    name = PurePosixPath(path).name
    if any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS):
        return True
    return size > REGULAR_MAX_SIZE or b"\0" in sample


def _valid_repo_path(path: str) -> bool:
    if not path or path.startswith("/") or "\\" in path or path.endswith("/"):
        return False
    parts = path.split("/")
    return all(p not in ("", ".", "..") for p in parts) and parts[0] != ".git"


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str  # content address in the repo's object store
    blob_oid: str  # git oid (of the content, or of the LFS pointer)
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_oid

    def lfs_json(self) -> dict[str, Any] | None:
        if not self.lfs:
            return None
        return {"oid": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256, self.size))}


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, FileEntry]
    title: str
    description: str
    date: str


@dataclass
class Repo:
    repo_id: str
    root: Path
    private: bool
    created_at: str = field(default_factory=_now)
    branches: dict[str, str] = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    next_pr: int = 1

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        p = self.object_path(sha256)
        return p.is_file() and (size is None or p.stat().st_size == size)

    def store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        p = self.object_path(sha)
        if not p.exists():
            self.objects.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f"{sha}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, p)
        return sha

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev in self.commits:
            return self.commits[rev]
        if re.fullmatch(r"[0-9a-f]{7,39}", rev):
            hits = [c for oid, c in self.commits.items() if oid.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        return None

    def history(self, branch: str = "main") -> list[str]:
        """Commit oids reachable from ``branch``, newest first."""
        out: list[str] = []
        oid = self.branches.get(branch)
        while oid is not None:
            out.append(oid)
            oid = self.commits[oid].parent
        return out

    def save(self) -> None:
        meta = {
            "repo_id": self.repo_id,
            "private": self.private,
            "branches": self.branches,
            "commits": {
                oid: {
                    "parent": c.parent,
                    "title": c.title,
                    "date": c.date,
                    "files": {p: {"size": e.size, "sha256": e.sha256, "lfs": e.lfs} for p, e in c.files.items()},
                }
                for oid, c in self.commits.items()
            },
        }
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "meta.json").write_text(json.dumps(meta, indent=1))


class HubError(Exception):
    """An error answer of the fake Hub: status, message and optional X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class _Fault:
    pattern: re.Pattern[str]
    status: int
    remaining: int
    method: str | None
    code: str | None
    message: str


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    status: int
    authorized: bool
    injected: bool = False


# --------------------------------------------------------------------------- server


class HubServer:
    """The fake Hub.  ``start()`` it, use ``.endpoint``, ``stop()`` it."""

    def __init__(self, repos_dir: str | Path, token: str = DEFAULT_TOKEN, user: str = USER) -> None:
        self.repos_dir = Path(repos_dir)
        self.repos_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.read_token = READ_TOKEN
        self.user = user
        self.orgs = ORGS
        self.repos: dict[str, Repo] = {}
        self.requests: list[RequestRecord] = []
        self.foreign_requests: list[str] = []  # filled by the fixture's guard
        self.lock = threading.RLock()
        self._faults: list[_Fault] = []
        self._secret = secrets.token_bytes(16)
        self._counter = itertools.count()
        self._conns: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ---- lifecycle

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop the kept-alive connections, so clients really see a dead server."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self.lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- test helpers

    def fail_next(
        self,
        pattern: str,
        status: int,
        count: int = 1,
        *,
        method: str | None = None,
        error_code: str | None = None,
        message: str = "Injected failure",
    ) -> None:
        """Make the next ``count`` requests whose path (no query) matches ``pattern`` answer ``status``."""
        with self.lock:
            self._faults.append(
                _Fault(re.compile(pattern), status, count, method.upper() if method else None, error_code, message)
            )

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self.lock:
            for f in self._faults:
                if f.remaining > 0 and (f.method is None or f.method == method) and f.pattern.search(path):
                    f.remaining -= 1
                    return f
        return None

    def repo(self, repo_id: str) -> Repo | None:
        with self.lock:
            return self.repos.get(repo_id)

    def head(self, repo_id: str, branch: str = "main") -> str | None:
        with self.lock:
            repo = self.repos.get(repo_id)
            return None if repo is None else repo.branches.get(branch)

    def history(self, repo_id: str, branch: str = "main") -> list[str]:
        with self.lock:
            repo = self.repos.get(repo_id)
            return [] if repo is None else repo.history(branch)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """Path -> content of every file of ``repo_id`` at ``rev``, read from the server's storage."""
        with self.lock:
            repo = self.repos[repo_id]
            commit = repo.resolve(rev)
            assert commit is not None, f"no revision {rev} in {repo_id}"
            return {p: repo.object_path(e.sha256).read_bytes() for p, e in commit.files.items()}

    def entry(self, repo_id: str, path: str, rev: str = "main") -> FileEntry | None:
        with self.lock:
            commit = self.repos[repo_id].resolve(rev)
            return None if commit is None else commit.files.get(path)

    def seed(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        private: bool = False,
        branch: str = "main",
        message: str = "Seed",
    ) -> str:
        """Create (if needed) ``repo_id`` and commit ``files`` to ``branch`` directly; returns the commit oid."""
        with self.lock:
            repo = self.repos.get(repo_id) or self._create_repo(repo_id, private)
            if branch not in repo.branches:
                repo.branches[branch] = repo.branches["main"]
            base = repo.commits[repo.branches[branch]]
            tree = dict(base.files)
            for path, data in files.items():
                tree[path] = self._entry(repo, path, data, lfs=_wants_lfs(path, len(data), data[:512]))
            oid = self._commit(repo, branch, base.oid, tree, message, "")
            repo.save()
            return oid

    # ---- internals (all called with the lock held)

    def _create_repo(self, repo_id: str, private: bool) -> Repo:
        ns, name = repo_id.split("/")
        repo = Repo(repo_id=repo_id, root=self.repos_dir / ns / name, private=private)
        self.repos[repo_id] = repo
        tree = {".gitattributes": self._entry(repo, ".gitattributes", GITATTRIBUTES, lfs=False)}
        self._commit(repo, "main", None, tree, "initial commit", "")
        repo.save()
        return repo

    def _entry(self, repo: Repo, path: str, data: bytes, *, lfs: bool) -> FileEntry:
        sha = repo.store(data)
        oid = git_blob_oid(lfs_pointer(sha, len(data)) if lfs else data)
        return FileEntry(path=path, size=len(data), sha256=sha, blob_oid=oid, lfs=lfs)

    def _commit(
        self, repo: Repo, ref: str, parent: str | None, tree: dict[str, FileEntry], title: str, desc: str
    ) -> str:
        seed = json.dumps(
            [parent, sorted((p, e.blob_oid) for p, e in tree.items()), title, desc, next(self._counter), _now()]
        )
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, dict(tree), title, desc, _now())
        repo.branches[ref] = oid
        return oid

    def _sign(self, repo_id: str, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{repo_id}:{oid}:{size}".encode(), hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- request handling

_REPO_API = re.compile(r"^/api/(?P<kind>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)(?P<rest>/.*)?$")
_LFS_BATCH = re.compile(r"^/(?P<ns>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects/(?P<op>batch|verify)$")
_LFS_PUT = re.compile(r"^/_lfs/(?P<ns>[^/]+)/(?P<name>[^/]+)/(?P<oid>[0-9a-f]{64})$")
_RESOLVE = re.compile(r"^/(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 30
    disable_nagle_algorithm = True  # headers and body go out in two writes: avoid 40 ms delayed-ACK stalls

    def setup(self) -> None:
        super().setup()
        with self.hub.lock:
            self.hub._conns.add(self.connection)

    def finish(self) -> None:
        with self.hub.lock:
            self.hub._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    # silence the default stderr access log
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # ---- plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline().strip()
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            ctype = "application/json; charset=utf-8"
        elif body is None:
            data, ctype = b"", "text/plain"
        else:
            data, ctype = body, "application/octet-stream"
        self._status = status
        with self.hub.lock:  # record before answering, so a test sees it as soon as the client returns
            self.hub.requests.append(RequestRecord(self.command, self._path, status, self.authorized, self._injected))
        self.send_response(status)
        hdrs = {"Content-Type": ctype, "Content-Length": str(len(data))}
        hdrs.update(headers or {})
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, {"error": err.message}, headers)

    def _handle(self) -> None:
        hub = self.hub
        self._status = 0
        self._injected = False
        split = urlsplit(self.path)
        path, self.query = split.path, {k: v[-1] for k, v in parse_qs(split.query).items()}
        self._path = path
        self.body = self._read_body()  # always drain the body: connections are kept alive
        auth = self.headers.get("Authorization")
        self.can_write = auth is not None and hmac.compare_digest(auth, f"Bearer {hub.token}")
        self.authorized = self.can_write or (auth is not None and hmac.compare_digest(auth, f"Bearer {hub.read_token}"))
        try:
            fault = hub._take_fault(self.command, path)
            if fault is not None:
                self._injected = True
                raise HubError(fault.status, fault.message, fault.code)
            if auth is not None and not self.authorized:
                raise HubError(401, "Invalid credentials in Authorization header")
            self._route(path)
        except HubError as err:
            self._error(err)
        except Exception as exc:  # a bug in the fake Hub: answer 500 rather than hang the client
            import traceback

            traceback.print_exc()
            self._error(HubError(500, f"fake hub crashed: {exc!r}"))

    def _route(self, path: str) -> None:
        m = self.command
        if path == "/api/whoami-v2" and m == "GET":
            return self._whoami()
        if path == "/api/repos/create" and m == "POST":
            return self._create_repo()
        if path == "/api/validate-yaml" and m == "POST":
            return self._validate_yaml()
        if mt := _REPO_API.match(path):
            return self._repo_api(mt)
        if (mt := _LFS_BATCH.match(path)) and m == "POST":
            return self._lfs(mt)
        if (mt := _LFS_PUT.match(path)) and m == "PUT":
            return self._lfs_put(mt)
        if (mt := _RESOLVE.match(path)) and m in ("GET", "HEAD"):
            return self._resolve(mt)
        raise HubError(404, f"no route for {m} {path}")

    # ---- access control

    def _need_write(self) -> None:
        if not self.authorized:
            raise HubError(401, "You must be authenticated to access this resource (missing Authorization header)")
        if not self.can_write:
            raise HubError(403, "This token has read access only; it cannot write")

    def _need_namespace(self, namespace: object) -> None:
        if namespace not in (self.hub.user, *self.hub.orgs):
            raise HubError(403, f"You don't have the rights to write a model under the namespace '{namespace}'")

    def _readable_repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self.authorized):
            raise HubError(404 if self.authorized else 401, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str) -> Repo:
        self._need_write()
        repo = self._readable_repo(repo_id)
        self._need_namespace(repo_id.split("/")[0])
        return repo

    def _commit_for(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None

    # ---- endpoints

    def _whoami(self) -> None:
        if not self.authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send(
            200,
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.hub.user,
                "fullname": "Test User",
                "orgs": [{"type": "org", "name": o} for o in self.hub.orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "tests", "role": "write" if self.can_write else "read"},
                },
            },
        )

    def _create_repo(self) -> None:
        body = self._json_body()
        name, org = body.get("name"), body.get("organization") or self.hub.user
        self._need_write()
        self._need_namespace(org)
        rtype = body.get("type") or "model"
        if rtype != "model":
            raise HubError(400, f"this fake Hub only stores model repos, not {rtype!r}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(org):
            raise HubError(400, f"Invalid repo name: {org}/{name}")
        visibility = body.get("visibility")
        private = visibility in ("private", "protected") if visibility is not None else bool(body.get("private"))
        repo_id = f"{org}/{name}"
        url = f"{self.hub.endpoint}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self._send(
                    409,
                    {"error": "You already created this model repo", "url": url},
                    {"X-Error-Message": "You already created this model repo"},
                )
            self.hub._create_repo(repo_id, private)
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        content = self._json_body().get("content", "")
        errors = []
        if content.startswith("---"):
            if not re.search(r"^---\s*$", content[3:], re.M):
                errors.append({"message": "metadata block is not closed by '---'"})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _repo_api(self, mt: re.Match[str]) -> None:
        if mt["kind"] != "models":
            raise HubError(404 if self.authorized else 401, "Repository not found", "RepoNotFound")
        repo_id = f"{unquote(mt['ns'])}/{unquote(mt['name'])}"
        rest = mt["rest"] or ""
        m = self.command
        with self.hub.lock:
            if rest in ("", "/") and m == "GET":
                return self._info(self._readable_repo(repo_id), "main")
            if (r := re.fullmatch(r"/revision/([^/]+)", rest)) and m == "GET":
                return self._info(self._readable_repo(repo_id), unquote(r[1]))
            if (r := re.fullmatch(r"/tree/([^/]+)(/.*)?", rest)) and m == "GET":
                return self._tree(self._readable_repo(repo_id), unquote(r[1]), unquote(r[2] or "").strip("/"))
            if rest == "/refs" and m == "GET":
                return self._refs(self._readable_repo(repo_id))
            if rest in ("/auth-check", "/auth-check/write") and m == "GET":
                if not self.authorized:
                    raise HubError(401, "You must be authenticated to access this resource")
                self._readable_repo(repo_id)  # a missing repo is 404 whatever the token may do
                if rest.endswith("/write"):
                    self._writable_repo(repo_id)
                return self._send(200, {})
            if (r := re.fullmatch(r"/preupload/([^/]+)", rest)) and m == "POST":
                return self._preupload(self._writable_repo(repo_id), unquote(r[1]))
            if (r := re.fullmatch(r"/commit/([^/]+)", rest)) and m == "POST":
                return self._do_commit(self._writable_repo(repo_id), unquote(r[1]))
            if (r := re.fullmatch(r"/branch/([^/]+)", rest)) and m == "POST":
                return self._create_branch(self._writable_repo(repo_id), unquote(r[1]))
        raise HubError(404, f"no route for {m} {mt.group(0)}")

    def _info(self, repo: Repo, rev: str) -> None:
        commit = self._commit_for(repo, rev)
        blobs = _truthy(self.query.get("blobs"))
        siblings = []
        for p, e in sorted(commit.files.items()):
            s: dict[str, Any] = {"rfilename": p}
            if blobs:
                s.update(size=e.size, blobId=e.blob_oid)
                if e.lfs:
                    lj = e.lfs_json()
                    s["lfs"] = {"size": lj["size"], "sha256": lj["oid"], "pointerSize": lj["pointerSize"]}
            siblings.append(s)
        ns = repo.repo_id.split("/")[0]
        self._send(
            200,
            {
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": ns,
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "spaces": [],
                "usedStorage": sum(e.size for e in commit.files.values()),
            },
        )

    def _tree(self, repo: Repo, rev: str, sub: str) -> None:
        commit = self._commit_for(repo, rev)
        recursive = _truthy(self.query.get("recursive"))
        expand = _truthy(self.query.get("expand"))
        prefix = f"{sub}/" if sub else ""
        if sub and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{sub} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        dirs: set[str] = set()
        files: list[FileEntry] = []
        for p, e in commit.files.items():
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                files.append(e)
        last = {"id": commit.oid, "title": commit.title, "date": commit.date}
        out: list[dict[str, Any]] = []
        for d in sorted(dirs):
            entry = {
                "type": "directory",
                "oid": hashlib.sha1(f"{commit.oid}:{d}".encode()).hexdigest(),
                "size": 0,
                "path": d,
            }
            if expand:
                entry["lastCommit"] = last
            out.append(entry)
        for e in sorted(files, key=lambda e: e.path):
            entry = {"type": "file", "oid": e.blob_oid, "size": e.size, "path": e.path}
            if e.lfs:
                entry["lfs"] = e.lfs_json()
            if expand:
                entry["lastCommit"] = last
            out.append(entry)
        self._send(200, out)

    def _refs(self, repo: Repo) -> None:
        def ref(name: str, oid: str) -> dict[str, str]:
            full = name if name.startswith("refs/") else f"refs/heads/{name}"
            return {"name": name, "ref": full, "targetCommit": oid}

        branches = [ref(n, o) for n, o in sorted(repo.branches.items()) if not n.startswith("refs/")]
        prs = [ref(n, o) for n, o in sorted(repo.branches.items()) if n.startswith("refs/pr/")]
        body: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if _truthy(self.query.get("include_prs")):
            body["pullRequests"] = prs
        self._send(200, body)

    def _preupload(self, repo: Repo, rev: str) -> None:
        commit = self._commit_for(repo, rev)
        files = self._json_body().get("files")
        if not isinstance(files, list):
            raise HubError(400, "'files' must be a list")
        out = []
        for f in files:
            path, size = f.get("path"), f.get("size")
            if not isinstance(path, str) or not _valid_repo_path(path) or not isinstance(size, int):
                raise HubError(400, f"invalid file entry: {f!r}")
            sample = base64.b64decode(f.get("sample") or "")
            existing = commit.files.get(path)
            out.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if _wants_lfs(path, size, sample) else "regular",
                    "shouldIgnore": False,
                    "oid": None if existing is None else (existing.sha256 if existing.lfs else existing.blob_oid),
                }
            )
        self._send(200, {"files": out, "commitOid": commit.oid})

    def _do_commit(self, repo: Repo, rev: str) -> None:
        hub = self.hub
        create_pr = _truthy(self.query.get("create_pr"))
        base = self._commit_for(repo, rev)
        if not create_pr and rev not in repo.branches:
            raise HubError(400, f"Cannot commit to {rev}: not a branch")
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "commit payload is not NDJSON") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0].get("value") or {}
        title = header.get("summary")
        if not isinstance(title, str) or not title.strip():
            raise HubError(400, "commit summary is required")
        parent = header.get("parentCommit")
        if parent is not None and not base.oid.startswith(parent):
            raise HubError(412, f"parentCommit {parent} is not the head of {rev}")

        tree = dict(base.files)
        pending: list[tuple[str, bytes | None, str | None]] = []  # (path, content, lfs sha)
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value") or {}
            path = value.get("path")
            if not isinstance(path, str) or not _valid_repo_path(path):
                raise HubError(400, f"invalid path in commit: {path!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 encoding is supported")
                data = base64.b64decode(value.get("content") or "", validate=True)
                if data and _wants_lfs(path, len(data), data[:512]):
                    raise HubError(400, f"{path} must be uploaded with git-LFS (preupload said so)")
                pending.append((path, data, None))
            elif key == "lfsFile":
                oid, size = value.get("oid"), value.get("size")
                if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not _HEX64.match(oid):
                    raise HubError(400, f"invalid LFS oid for {path}")
                if not repo.has_object(oid, size if isinstance(size, int) else None):
                    raise HubError(422, f"LFS object {oid} for {path} was not uploaded")
                pending.append((path, None, oid))
            elif key == "deletedFile":
                if path not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del tree[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                gone = [p for p in tree if p.startswith(prefix)]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del tree[p]
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        # everything validated: now write
        for path, data, lfs_oid in pending:
            if lfs_oid is not None:
                size = repo.object_path(lfs_oid).stat().st_size
                ptr = lfs_pointer(lfs_oid, size)
                tree[path] = FileEntry(path, size, lfs_oid, git_blob_oid(ptr), True)
            else:
                assert data is not None
                tree[path] = hub._entry(repo, path, data, lfs=False)
        if create_pr:
            ref = f"refs/pr/{repo.next_pr}"
            repo.next_pr += 1
        else:
            ref = rev
        oid = hub._commit(repo, ref, base.oid, tree, title, header.get("description") or "")
        repo.save()
        reply: dict[str, Any] = {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{oid}",
            "commitMessage": title,
        }
        if create_pr:
            reply["pullRequestUrl"] = f"{hub.endpoint}/{repo.repo_id}/discussions/{ref.rsplit('/', 1)[1]}"
        self._send(200, reply)

    def _create_branch(self, repo: Repo, branch: str) -> None:
        if branch.startswith("refs/") or not re.fullmatch(r"[A-Za-z0-9._/-]+", branch) or _HEX40.match(branch):
            raise HubError(400, f"Invalid branch name: {branch}")
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._json_body().get("startingPoint") or "main"
        commit = self._commit_for(repo, start)
        repo.branches[branch] = commit.oid
        repo.save()
        self._send(200, {})

    def _lfs(self, mt: re.Match[str]) -> None:
        hub = self.hub
        repo_id = f"{unquote(mt['ns'])}/{unquote(mt['name'])}"
        with hub.lock:
            repo = self._writable_repo(repo_id)
            body = self._json_body()
            if mt["op"] == "verify":
                if not repo.has_object(str(body.get("oid")), body.get("size")):
                    raise HubError(404, "LFS object not found")
                return self._send(200, {})
            if body.get("operation") != "upload":
                raise HubError(400, "only the upload operation is supported")
            out = []
            for obj in body.get("objects") or []:
                oid, size = obj.get("oid"), obj.get("size")
                if not isinstance(oid, str) or not _HEX64.match(oid) or not isinstance(size, int) or size < 0:
                    out.append(
                        {
                            "oid": str(oid),
                            "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "invalid oid or size"},
                        }
                    )
                    continue
                entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if not repo.has_object(oid, size):
                    sig = hub._sign(repo_id, oid, size)
                    entry["actions"] = {
                        "upload": {"href": f"{hub.endpoint}/_lfs/{mt['ns']}/{mt['name']}/{oid}?size={size}&sig={sig}"},
                        "verify": {"href": f"{hub.endpoint}/{mt['ns']}/{mt['name']}.git/info/lfs/objects/verify"},
                    }
                out.append(entry)
        self._send(200, {"transfer": "basic", "objects": out}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, mt: re.Match[str]) -> None:
        hub = self.hub
        repo_id = f"{unquote(mt['ns'])}/{unquote(mt['name'])}"
        oid = mt["oid"]
        try:
            size = int(self.query.get("size", ""))
        except ValueError:
            raise HubError(400, "missing size") from None
        if not hmac.compare_digest(self.query.get("sig", ""), hub._sign(repo_id, oid, size)):
            raise HubError(403, "bad upload signature")
        if len(self.body) != size:
            raise HubError(400, f"size mismatch: got {len(self.body)} bytes, expected {size}")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "sha256 mismatch: uploaded content does not match the oid")
        with hub.lock:
            repo = hub.repos.get(repo_id)
            if repo is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            repo.store(self.body)
        self._send(200, None, {"ETag": f'"{oid}"'})

    def _resolve(self, mt: re.Match[str]) -> None:
        repo_id = f"{unquote(mt['ns'])}/{unquote(mt['name'])}"
        rev, path = unquote(mt["rev"]), unquote(mt["path"])
        with self.hub.lock:
            repo = self._readable_repo(repo_id)
            commit = self._commit_for(repo, rev)
            entry = commit.files.get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            data = repo.object_path(entry.sha256).read_bytes()
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        status = 200
        rng = self.headers.get("Range")
        if rng and (r := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
            start = int(r[1])
            end = int(r[2]) if r[2] else len(data) - 1
            if start >= len(data):
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers)


# --------------------------------------------------------------------------- pytest fixture

#: huggingface_hub constants the fixture overrides (name -> value factory taking the server + HF_HOME).
_CONSTANT_NAMES = (
    "ENDPOINT",
    "HUGGINGFACE_CO_URL_TEMPLATE",
    "HF_URL_HOSTS",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_TOKEN_PATH",
    "HF_STORED_TOKENS_PATH",
    "CHECK_FOR_UPDATE_DONE_PATH",
    "CHECK_FOR_SKILL_UPDATE_DONE_PATH",
    "AGENT_HARNESSES_PATH",
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_XET",
    "HF_HUB_DISABLE_TELEMETRY",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_HUB_DISABLE_SHARED_BLOBS",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    "HF_HUB_DISABLE_UPDATE_CHECK",
)


class HubFixture:
    """What the ``hub_server`` fixture yields: the server plus the patched environment."""

    def __init__(self, server: HubServer, monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> None:
        self.server = server
        self.hf_home = hf_home
        self.cache_dir = hf_home / "hub"
        self._mp = monkeypatch
        self.patched: list[str] = []  # "module.NAME" of every huggingface_hub value patched

    # the interface the brief asks for
    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def token(self) -> str:
        return self.server.token

    @property
    def repos_dir(self) -> Path:
        return self.server.repos_dir

    def fail_next(self, pattern: str, status: int, count: int = 1, **kw: Any) -> None:
        self.server.fail_next(pattern, status, count, **kw)

    def __getattr__(self, name: str) -> Any:  # head(), history(), files(), seed(), requests...
        return getattr(self.server, name)

    # ---- environment switches usable inside a test (undone at teardown)

    def set_offline(self, offline: bool = True) -> None:
        """Turn ``HF_HUB_OFFLINE`` on or off, in the environment and in huggingface_hub's constants."""
        self._mp.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        self._patch_constant("HF_HUB_OFFLINE", offline)

    def set_token(self, token: str | None) -> None:
        """Set or remove ``HF_TOKEN`` for the rest of the test."""
        if token is None:
            self._mp.delenv("HF_TOKEN", raising=False)
            self._mp.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        else:
            self._mp.setenv("HF_TOKEN", token)

    # ---- internals

    def _patch_constant(self, name: str, value: Any) -> None:
        """Patch ``huggingface_hub.constants.NAME`` and every module-level copy of it."""
        import huggingface_hub.constants as constants

        if not hasattr(constants, name):
            return
        original = getattr(constants, name)
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not (mod_name == "huggingface_hub" or mod_name.startswith("huggingface_hub.")):
                continue
            if name in vars(mod):
                current = vars(mod)[name]
                if mod is constants or current is original or (type(current) is type(original) and current == original):
                    self._mp.setattr(mod, name, value)
                    if f"{mod_name}.{name}" not in self.patched:
                        self.patched.append(f"{mod_name}.{name}")


#: Modules that copy constants at import time (``from ..constants import X``): imported before
#: patching so that their copies are found and patched too.
_EAGER_MODULES = (
    "huggingface_hub.hf_api",
    "huggingface_hub.file_download",
    "huggingface_hub._snapshot_download",
    "huggingface_hub.utils._cache_manager",
    "huggingface_hub.utils._cache_assets",
    "huggingface_hub.utils._git_credential",
    "huggingface_hub.utils.tqdm",
    "huggingface_hub.utils._http",
)


def _install(fx: HubFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    for mod in _EAGER_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    import huggingface_hub.constants as constants
    from huggingface_hub import HfApi
    from huggingface_hub.utils import _http as hf_http

    server, home = fx.server, fx.hf_home
    old_endpoint = constants.ENDPOINT
    env = {
        "HF_ENDPOINT": server.endpoint,
        "HF_TOKEN": server.token,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "0",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in (
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_ASSETS_CACHE",
        "HF_XET_CACHE",
        "HF_TOKEN_PATH",
        "HUGGING_FACE_HUB_TOKEN",
        "TRANSFORMERS_OFFLINE",
        "HUGGINGFACE_CO_STAGING",
        "HF_OIDC_RESOURCE",
        "HF_HUB_ENABLE_HF_TRANSFER",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    ):
        monkeypatch.delenv(k, raising=False)

    host = urlsplit(server.endpoint).hostname
    values = {
        "ENDPOINT": server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(getattr(constants, "HF_URL_HOSTS", frozenset()) | {host}),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_PROGRESS_BARS": True,
        "HF_HUB_DISABLE_SHARED_BLOBS": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
    }
    assert set(values) == set(_CONSTANT_NAMES)
    for name, value in values.items():
        fx._patch_constant(name, value)

    # Hub origins that keep the auth header on redirects (computed at import from ENDPOINT).
    if hasattr(hf_http, "_HUB_ORIGINS") and hasattr(hf_http, "_url_origin"):
        monkeypatch.setattr(
            hf_http, "_HUB_ORIGINS", frozenset(hf_http._HUB_ORIGINS | {hf_http._url_origin(server.endpoint)})
        )
        fx.patched.append("huggingface_hub.utils._http._HUB_ORIGINS")
    # HfApi singletons built at import time (huggingface_hub.hf_api.api backs create_repo(), upload_folder()...).
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith("huggingface_hub"):
            continue
        for attr, val in list(vars(mod).items()):
            if isinstance(val, HfApi) and val.endpoint == old_endpoint:
                monkeypatch.setattr(val, "endpoint", server.endpoint)
                fx.patched.append(f"{mod_name}.{attr}.endpoint")

    # Guard: every request huggingface_hub sends must go to our server.
    original_factory = hf_http._GLOBAL_CLIENT_FACTORY

    def _guard(request: Any) -> None:
        if request.url.host not in ("127.0.0.1", "localhost"):
            server.foreign_requests.append(str(request.url))
            raise RuntimeError(f"test tried to reach {request.url.host}: only the fake Hub may be contacted")

    def guarded_factory() -> Any:
        client = original_factory()
        hooks = client.event_hooks
        hooks.setdefault("request", []).append(_guard)
        client.event_hooks = hooks
        return client

    monkeypatch.setattr(hf_http, "_GLOBAL_CLIENT_FACTORY", guarded_factory)  # restored at teardown
    hf_http.close_session()  # the next get_session() builds a guarded client with the patched environment


@pytest.fixture
def hub_server(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """A running fake Hub on 127.0.0.1, with huggingface_hub pointed at it and a temporary HF_HOME.

    Yields a :class:`HubFixture`: ``.endpoint``, ``.token``, ``.repos_dir``, ``.fail_next(pattern,
    status, count=1)``, plus ``.hf_home``/``.cache_dir``, ``.set_offline()``, ``.set_token()`` and the
    server's helpers (``.head()``, ``.history()``, ``.files()``, ``.entry()``, ``.seed()``, ``.requests``).
    """
    from huggingface_hub.utils import _http as hf_http

    server = HubServer(tmp_path_factory.mktemp("hub_repos")).start()
    home = tmp_path_factory.mktemp("hf_home")
    fx = HubFixture(server, monkeypatch, home)
    try:
        _install(fx, monkeypatch)
        yield fx
    finally:
        monkeypatch.undo()  # restore constants, env and the client factory before closing the client
        hf_http.close_session()
        server.stop()
    assert not server.foreign_requests, f"requests left 127.0.0.1: {server.foreign_requests}"
