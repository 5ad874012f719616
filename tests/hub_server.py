"""A loopback, in-memory, Hugging Face Hub-compatible HTTP server for tests.

The machine that runs the test suite has no access to the real Hub, and nothing installable accepts
uploads offline. This module implements the part of the Hub HTTP API that pgp_peft's own calls need (through the
*real* ``huggingface_hub`` client, 2.x, httpx2-based): create repositories, push files and download
them back, so ``push_to_hub`` / ``from_pretrained`` / ``hf_hub_download`` / ``snapshot_download`` can be
tested end to end without mocking the client.

Scope (each endpoint was written against the client source, not guessed):

* ``POST /api/repos/create``, ``GET /api/whoami-v2``
* ``POST /api/validate-yaml`` (model card metadata: invalid YAML -> 400, otherwise accepted)
* ``GET /api/{type}s/{repo}`` and ``GET /api/{type}s/{repo}/revision/{rev}`` (``model_info``)
* ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]`` (``list_repo_tree``/``list_repo_files``/snapshots)
* ``POST /api/{type}s/{repo}/preupload/{rev}``: every file is answered ``"regular"``, which keeps
  Git LFS and Xet out of scope (the client then inlines files in the commit as base64)
* ``POST /api/{type}s/{repo}/commit/{rev}``: NDJSON ``header``/``file``/``deletedFile``/
  ``deletedFolder`` operations; ``lfsFile`` and pull requests are rejected with a 400
* ``GET``/``HEAD /[{type}s/]{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (the git
  blob id, as the Hub serves regular files), ``Content-Length`` and ``Range`` support. Files are
  served directly (200, no ``Location`` header), so the client downloads from the resolve URL itself.

Errors follow the Hub's conventions, which is what ``huggingface_hub.utils.hf_raise_for_status``
maps to exception classes: ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``
headers, an ``X-Error-Message`` header and a ``{"error": ...}`` JSON body.

Every repository starts, as on the Hub, with an ``"initial commit"`` holding a ``.gitattributes``
file. Each commit gets a fresh 40-hex id and a full snapshot of the files, so any older commit stays
downloadable by its id; branches (``main`` first) point at commits.

Use :func:`local_hub` (a context manager that also points the client at the server and restores
everything afterwards) or the :func:`local_hub_server` pytest fixture.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import tempfile
import threading
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = ["DEFAULT_USER", "HubCommit", "HubRepo", "LocalHub", "local_hub", "local_hub_server"]

DEFAULT_USER = "test-user"
"""User name that tokens given as a plain sequence authenticate as (and the default namespace)."""

DEFAULT_BRANCH = "main"

_REPO_TYPES_BY_PLURAL: dict[str, str] = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES: dict[str, str] = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Path segments that follow a repo id in /api/{type}s/{repo}/... URLs (used to tell a canonical,
# single-segment repo id such as "gpt2" from a "namespace/name" id).
_REPO_ACTIONS = frozenset({"revision", "tree", "preupload", "commit"})
_COMMIT_OID = re.compile(r"[0-9a-f]{40}")
# Same pattern huggingface_hub.repocard uses to find the YAML block of a card.
_YAML_BLOCK = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")

INITIAL_GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""
"""Content of the ``.gitattributes`` file of every new repository's initial commit."""


def git_blob_oid(content: bytes) -> str:
    """Return the git blob id (SHA-1 of ``"blob <size>\\0" + content``) of ``content``.

    The Hub serves this id as the ``ETag`` of regular (non-LFS) files and as their tree ``oid``; the
    client compares it with its own ``git_hash`` to skip unchanged files when committing.
    """
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _iso(moment: datetime) -> str:
    """Format ``moment`` the way the Hub does (``2024-01-31T12:00:00.000Z``)."""
    return (
        moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _card_metadata(readme: bytes | None) -> dict[str, Any] | None:
    """Parse the YAML metadata block of a README (``None`` if absent or unparsable).

    ``pyyaml`` is a hard dependency of ``huggingface_hub`` (and of this project); it is imported
    lazily so the server itself keeps to the standard library when metadata is not needed.
    """
    if readme is None:
        return None
    match = _YAML_BLOCK.search(readme.decode("utf-8", errors="replace"))
    if match is None:
        return None
    try:
        import yaml

        data = yaml.safe_load(match.group(2))
    except Exception:  # noqa: BLE001 - a broken card is reported as "no metadata"
        return None
    return data if isinstance(data, dict) else None


@dataclass
class HubCommit:
    """One commit: a full snapshot of the repository's files after the commit."""

    oid: str
    parent: str | None
    title: str
    description: str
    author: str
    created_at: datetime
    files: dict[str, bytes]
    changed_paths: frozenset[str] = frozenset()
    """Paths the commit wrote or deleted (files the client skipped as unchanged are not in it)."""


@dataclass
class HubRepo:
    """In-memory state of one repository (inspect it from tests via :attr:`LocalHub.repos`)."""

    repo_id: str
    repo_type: str
    private: bool
    created_at: datetime
    commits: dict[str, HubCommit] = field(default_factory=dict)
    """All commits of the repository by id (on any branch)."""
    branches: dict[str, str] = field(default_factory=dict)
    """Branch name -> id of the commit the branch points at."""

    def resolve(self, revision: str) -> HubCommit | None:
        """Return the commit a branch name or a full 40-hex commit id points at (``None`` if unknown)."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision.lower())

    def files(self, revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        """Return a copy of ``{path: content}`` at ``revision`` (a branch name or a commit id)."""
        commit = self.resolve(revision)
        if commit is None:
            raise KeyError(f"Unknown revision {revision!r} in {self.repo_id!r}")
        return dict(commit.files)

    def history(self, revision: str = DEFAULT_BRANCH) -> list[HubCommit]:
        """Return the commits reachable from ``revision``, newest first."""
        commit = self.resolve(revision)
        if commit is None:
            raise KeyError(f"Unknown revision {revision!r} in {self.repo_id!r}")
        chain: list[HubCommit] = []
        current: HubCommit | None = commit
        while current is not None:
            chain.append(current)
            current = self.commits[current.parent] if current.parent is not None else None
        return chain

    @property
    def head(self) -> str:
        """Id of the commit ``main`` points at."""
        return self.branches[DEFAULT_BRANCH]

    @property
    def commit_messages(self) -> list[str]:
        """Commit titles on ``main``, oldest first (the first one is ``"initial commit"``)."""
        return [commit.title for commit in reversed(self.history())]

    @property
    def commit_count(self) -> int:
        """Number of commits on ``main``, including the initial commit."""
        return len(self.history())


class _HubError(Exception):
    """An error answered to the client in the Hub's format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
        all_headers = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        return cls(status=status, body=json.dumps(payload).encode("utf-8"), headers=all_headers)

    @classmethod
    def from_error(cls, error: _HubError) -> _Response:
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.error_code is not None:
            headers["X-Error-Code"] = error.error_code
        return cls.json({"error": error.message, **error.extra}, status=error.status, headers=headers)


@dataclass
class _Request:
    method: str
    segments: list[str]
    params: dict[str, list[str]]
    headers: Message
    body: bytes

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.params.get(name)
        return values[0] if values else default

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in ("1", "true")

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise _HubError(400, f"Invalid JSON body: {err}") from err


class LocalHub:
    """An in-memory Hub served over HTTP on 127.0.0.1 (an ephemeral port).

    Args:
        tokens: valid access tokens. A sequence authenticates every token as :data:`DEFAULT_USER`; a
            mapping gives ``{token: user_name}``. Any valid token may write to any repository.
        refuse_pushes: when true, commits are answered ``403 Forbidden`` (see :attr:`refuse_pushes`).

    Attributes:
        url: base URL of the server, e.g. ``http://127.0.0.1:54321`` (set by :meth:`start`).
        request_log: ``(method, path, status)`` of every request served, in order.
        errors: tracebacks of unexpected server-side exceptions (answered with a 500). Should stay empty.
    """

    def __init__(
        self, tokens: Iterable[str] | Mapping[str, str] = ("hf_test_token",), refuse_pushes: bool = False
    ) -> None:
        if isinstance(tokens, Mapping):
            self._tokens: dict[str, str] = {str(token): str(user) for token, user in tokens.items()}
        else:
            self._tokens = {str(token): DEFAULT_USER for token in tokens}
        self._refuse_pushes = bool(refuse_pushes)
        self._lock = threading.RLock()
        self._repos: dict[str, HubRepo] = {}
        self._oid_counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.request_log: list[tuple[str, str, int]] = []
        self.errors: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHub:
        """Bind 127.0.0.1 on a free port and serve in a daemon thread; return ``self``."""
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.block_on_close = False
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection / seeding

    @property
    def token(self) -> str:
        """The first valid token (what :func:`local_hub` logs in with)."""
        return next(iter(self._tokens))

    @property
    def refuse_pushes(self) -> bool:
        """When true, every commit is refused with ``403`` (to test error handling). Settable."""
        return self._refuse_pushes

    @refuse_pushes.setter
    def refuse_pushes(self, value: bool) -> None:
        self._refuse_pushes = bool(value)

    def set_refuse_pushes(self, value: bool) -> None:
        """Same as assigning :attr:`refuse_pushes`."""
        self.refuse_pushes = value

    @property
    def repos(self) -> dict[str, HubRepo]:
        """Repositories by key: ``"ns/name"`` for models, ``"datasets/ns/name"``/``"spaces/ns/name"`` otherwise."""
        with self._lock:
            return dict(self._repos)

    def repo(self, repo_id: str, repo_type: str = "model") -> HubRepo:
        """Return the state of one repository (``KeyError`` if it does not exist)."""
        with self._lock:
            return self._repos[self._key(repo_type, repo_id)]

    def create_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | None = None,
        *,
        private: bool = False,
        repo_type: str = "model",
        author: str = DEFAULT_USER,
    ) -> HubRepo:
        """Seed a repository directly (no HTTP), e.g. a backbone for ``from_pretrained`` to fetch.

        Unlike the API, ``repo_id`` may be a canonical single-segment id such as ``"gpt2"``.
        ``files`` (if any) are committed on top of the initial commit. ``ValueError`` if it exists.
        """
        with self._lock:
            try:
                repo = self._new_repo(repo_type, repo_id, private=private, author=author)
            except _HubError as error:
                raise ValueError(error.message) from None
            if files:
                self.commit(repo_id, files, message="Add files", repo_type=repo_type, author=author)
            return repo

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | None = None,
        *,
        message: str = "Update files",
        deletions: Iterable[str] = (),
        branch: str = DEFAULT_BRANCH,
        repo_type: str = "model",
        author: str = DEFAULT_USER,
    ) -> str:
        """Commit ``files`` (str is UTF-8 encoded) and ``deletions`` directly; return the commit id."""
        with self._lock:
            repo = self._repos[self._key(repo_type, repo_id)]
            snapshot = dict(repo.resolve(branch).files)  # type: ignore[union-attr]
            changed: set[str] = set()
            for path in deletions:
                if snapshot.pop(path, None) is not None:
                    changed.add(path)
            for path, content in (files or {}).items():
                snapshot[path] = content.encode("utf-8") if isinstance(content, str) else bytes(content)
                changed.add(path)
            return self._record_commit(
                repo, branch, snapshot, title=message, description="", author=author, changed=changed
            )

    # ------------------------------------------------------------------ state helpers (lock held)

    @staticmethod
    def _key(repo_type: str, repo_id: str) -> str:
        return f"{_URL_PREFIXES[repo_type]}{repo_id}"

    def _repo_url(self, repo: HubRepo) -> str:
        return f"{self.url}/{self._key(repo.repo_type, repo.repo_id)}"

    def _new_oid(self, *parts: str) -> str:
        seed = "\n".join((*parts, str(next(self._oid_counter)), str(os.getpid())))
        return hashlib.sha1(seed.encode("utf-8")).hexdigest()

    def _new_repo(self, repo_type: str, repo_id: str, *, private: bool, author: str) -> HubRepo:
        if repo_type not in _URL_PREFIXES:
            raise _HubError(400, f"Invalid repo type {repo_type!r}")
        key = self._key(repo_type, repo_id)
        if key in self._repos:
            raise _HubError(
                409, f"You already created this {repo_type} repo", extra={"url": f"{self.url}/{key}"}
            )
        repo = HubRepo(repo_id=repo_id, repo_type=repo_type, private=private, created_at=_now())
        self._repos[key] = repo
        self._record_commit(
            repo,
            DEFAULT_BRANCH,
            {".gitattributes": INITIAL_GITATTRIBUTES},
            title="initial commit",
            description="",
            author=author,
            changed={".gitattributes"},
        )
        return repo

    def _record_commit(
        self,
        repo: HubRepo,
        branch: str,
        files: dict[str, bytes],
        *,
        title: str,
        description: str,
        author: str,
        changed: Iterable[str],
    ) -> str:
        parent = repo.branches.get(branch)
        oid = self._new_oid(repo.repo_type, repo.repo_id, parent or "", title, *sorted(files))
        repo.commits[oid] = HubCommit(
            oid=oid,
            parent=parent,
            title=title,
            description=description,
            author=author,
            created_at=_now(),
            files=files,
            changed_paths=frozenset(changed),
        )
        repo.branches[branch] = oid
        return oid

    # ------------------------------------------------------------------ auth

    def _user(self, request: _Request) -> str | None:
        """Return the user of a valid bearer token, ``None`` without one; 401 for a bad token.

        As on the Hub, an invalid token is refused even on public repositories, with the exact
        message the client recognises as "not a missing repo but bad credentials".
        """
        authorization = request.headers.get("Authorization")
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        user = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return user

    def _require_user(self, request: _Request) -> str:
        user = self._user(request)
        if user is None:
            raise _HubError(401, "Invalid username or password.")
        return user

    def _get_repo(self, repo_type: str, repo_id: str, user: str | None) -> HubRepo:
        repo = self._repos.get(self._key(repo_type, repo_id))
        if repo is None:
            raise _HubError(404, "Repository not found", error_code="RepoNotFound")
        if repo.private and user is None:
            # The Hub does not reveal that a private repo exists: 401 + RepoNotFound.
            raise _HubError(401, "Repository not found", error_code="RepoNotFound")
        return repo

    @staticmethod
    def _get_commit(repo: HubRepo, revision: str) -> HubCommit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ routing

    def handle(self, request: _Request) -> _Response:
        """Answer one HTTP request (called from the handler threads)."""
        with self._lock:
            try:
                segments = request.segments
                if segments[:1] == ["api"]:
                    return self._route_api(request, segments[1:])
                return self._route_resolve(request, segments)
            except _HubError as error:
                return _Response.from_error(error)

    def _route_api(self, request: _Request, segments: list[str]) -> _Response:
        method = request.method
        if segments == ["repos", "create"] and method == "POST":
            return self._create_repo(request)
        if segments == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(request)
        if segments == ["whoami-v2"] and method in ("GET", "HEAD"):
            return self._whoami(request)
        if len(segments) >= 2 and segments[0] in _REPO_TYPES_BY_PLURAL:
            repo_type = _REPO_TYPES_BY_PLURAL[segments[0]]
            repo_id, action, args = self._split_repo(repo_type, segments[1:])
            routes = {
                (None, "GET"): self._repo_info,
                ("revision", "GET"): self._repo_info,
                ("tree", "GET"): self._tree,
                ("preupload", "POST"): self._preupload,
                ("commit", "POST"): self._commit,
            }
            route = routes.get((action, "GET" if method == "HEAD" else method))
            if route is not None:
                return route(request, repo_type, repo_id, args)
        raise _HubError(404, f"Not implemented by the local test Hub: {method} /api/{'/'.join(segments)}")

    def _split_repo(self, repo_type: str, rest: list[str]) -> tuple[str, str | None, list[str]]:
        """Split ``[ns, name, action, *args]`` or ``[name, action, *args]`` into its parts."""
        if len(rest) >= 2:
            two_segments = f"{rest[0]}/{rest[1]}"
            if self._key(repo_type, two_segments) in self._repos or rest[1] not in _REPO_ACTIONS:
                return two_segments, (rest[2] if len(rest) > 2 else None), rest[3:]
        return rest[0], (rest[1] if len(rest) > 1 else None), rest[2:]

    # ------------------------------------------------------------------ endpoints: account / repos

    def _whoami(self, request: _Request) -> _Response:
        user = self._require_user(request)
        return _Response.json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "local-hub", "role": "write"},
                },
            }
        )

    def _create_repo(self, request: _Request) -> _Response:
        user = self._require_user(request)
        payload = request.json()
        name = payload.get("name")
        if not name:
            raise _HubError(400, "Missing repository name")
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        # huggingface_hub 2.x sends "visibility"; older clients sent a "private" boolean.
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = self._new_repo(repo_type, f"{namespace}/{name}", private=private, author=user)
        return _Response.json(
            {"url": self._repo_url(repo), "name": repo.repo_id, "id": self._new_oid(repo.repo_id)[:24]}
        )

    def _validate_yaml(self, request: _Request) -> _Response:
        content = str(request.json().get("content", ""))
        match = _YAML_BLOCK.search(content)
        if match is not None:
            try:
                import yaml

                metadata = yaml.safe_load(match.group(2))
            except Exception as err:  # noqa: BLE001 - any YAML error is a validation error
                return _Response.json({"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []}, 400)
            if metadata is not None and not isinstance(metadata, dict):
                return _Response.json(
                    {"errors": [{"message": "Metadata must be a YAML mapping"}], "warnings": []}, 400
                )
        return _Response.json({"errors": [], "warnings": []})

    # ------------------------------------------------------------------ endpoints: reading

    def _repo_info(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        repo = self._get_repo(repo_type, repo_id, self._user(request))
        commit = self._get_commit(repo, "/".join(args) if args else DEFAULT_BRANCH)
        card = _card_metadata(commit.files.get("README.md")) or {}
        with_blobs = request.flag("blobs")
        siblings = [
            {"rfilename": path, **({"size": len(data), "blobId": git_blob_oid(data)} if with_blobs else {})}
            for path, data in sorted(commit.files.items())
        ]
        payload: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.oid,
            "lastModified": _iso(commit.created_at),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card.get("tags") or []),
            "cardData": card or None,
            "siblings": siblings,
            "usedStorage": sum(len(data) for data in commit.files.values()),
        }
        if repo_type == "model":
            payload["library_name"] = card.get("library_name")
            payload["pipeline_tag"] = card.get("pipeline_tag")
            payload["spaces"] = []
            if "model-index" in card:
                payload["model-index"] = card["model-index"]
        return _Response.json(payload)

    @staticmethod
    def _directories(files: Iterable[str]) -> set[str]:
        return {"/".join(parts[:i]) for parts in (p.split("/") for p in files) for i in range(1, len(parts))}

    @staticmethod
    def _entry(files: Mapping[str, bytes], path: str) -> dict[str, Any]:
        if path in files:
            return {"type": "file", "oid": git_blob_oid(files[path]), "size": len(files[path]), "path": path}
        listing = "\n".join(
            f"{name}:{git_blob_oid(data)}"
            for name, data in sorted(files.items())
            if name.startswith(path + "/")
        )
        return {
            "type": "directory",
            "oid": hashlib.sha1(listing.encode()).hexdigest(),
            "size": 0,
            "path": path,
        }

    def _tree(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        repo = self._get_repo(repo_type, repo_id, self._user(request))
        if not args:
            raise _HubError(400, "Missing revision")
        commit = self._get_commit(repo, args[0])
        files = commit.files
        directories = self._directories(files)
        root = "/".join(args[1:]).strip("/")
        if root and root not in directories:
            raise _HubError(
                404,
                f"Entry not found: {root!r} is not a folder",
                error_code="EntryNotFound",
                headers={"X-Repo-Commit": commit.oid},
            )
        prefix = f"{root}/" if root else ""
        recursive = request.flag("recursive")
        paths: set[str] = set()
        for path in [*files, *directories]:
            if not path.startswith(prefix) or path == root:
                continue
            relative = path[len(prefix) :]
            if recursive or "/" not in relative:
                paths.add(path)
        # Folders first, then files, each sorted (like the Hub).
        ordered = sorted(paths, key=lambda p: (p in files, p))
        return _Response.json([self._entry(files, path) for path in ordered])

    def _route_resolve(self, request: _Request, segments: list[str]) -> _Response:
        """``GET``/``HEAD /[{datasets,spaces}/]{repo_id}/resolve/{revision}/{path}``."""
        repo_type = "model"
        if segments and segments[0] in ("datasets", "spaces", "models"):
            repo_type = _REPO_TYPES_BY_PLURAL[segments[0]]
            segments = segments[1:]
        if request.method not in ("GET", "HEAD") or "resolve" not in segments[1:3]:
            raise _HubError(
                404, f"Not implemented by the local test Hub: {request.method} /{'/'.join(segments)}"
            )
        index = segments.index("resolve", 1)
        repo_id = "/".join(segments[:index])
        if len(segments) < index + 3:
            raise _HubError(400, "Expected /{repo_id}/resolve/{revision}/{filename}")
        revision, path = segments[index + 1], "/".join(segments[index + 2 :])

        repo = self._get_repo(repo_type, repo_id, self._user(request))
        commit = self._get_commit(repo, revision)
        headers = {"X-Repo-Commit": commit.oid}
        if path not in commit.files:
            raise _HubError(404, "Entry not found", error_code="EntryNotFound", headers=headers)
        content = commit.files[path]
        headers.update(
            {
                "ETag": f'"{git_blob_oid(content)}"',
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
                "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
            }
        )
        byte_range = self._parse_range(request.headers.get("Range"), len(content))
        if byte_range is None:
            return _Response(status=200, body=content, headers=headers)
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        return _Response(status=206, body=content[start : end + 1], headers=headers)

    @staticmethod
    def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
        """Parse a single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range (``None``: whole file)."""
        if not header or not header.startswith("bytes=") or "," in header:
            return None
        first, _, last = header[len("bytes=") :].strip().partition("-")
        try:
            if first == "":
                start, end = max(size - int(last), 0), size - 1
            else:
                start, end = int(first), (int(last) if last else size - 1)
        except ValueError:
            return None
        if start >= size or start > end:
            raise _HubError(
                416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
            )
        return start, min(end, size - 1)

    # ------------------------------------------------------------------ endpoints: writing

    def _writable_branch(self, repo: HubRepo, revision: str) -> str:
        if revision in repo.branches:
            return revision
        if _COMMIT_OID.fullmatch(revision) and revision in repo.commits:
            raise _HubError(400, f"Cannot commit to a commit id ({revision}): use a branch")
        raise _HubError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")

    def _preupload(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        user = self._require_user(request)
        repo = self._get_repo(repo_type, repo_id, user)
        commit = self._get_commit(repo, self._writable_branch(repo, "/".join(args) or DEFAULT_BRANCH))
        files = []
        for item in request.json().get("files", []):
            existing = commit.files.get(item["path"])
            files.append(
                {
                    "path": item["path"],
                    # Always "regular": the client then inlines the file in the commit (base64).
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    # Git blob id of the file already on the branch: lets the client skip unchanged files.
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        return _Response.json({"files": files, "commitOid": commit.oid})

    def _commit(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        user = self._require_user(request)
        repo = self._get_repo(repo_type, repo_id, user)
        if self._refuse_pushes:
            raise _HubError(403, "You don't have the rights to push to this repository (refuse_pushes is on)")
        if request.flag("create_pr"):
            raise _HubError(400, "Pull requests are not supported by the local test Hub")
        branch = self._writable_branch(repo, "/".join(args) or DEFAULT_BRANCH)
        head = repo.branches[branch]

        header: dict[str, Any] | None = None
        snapshot = dict(repo.commits[head].files)
        changed: set[str] = set()
        for number, line in enumerate(request.body.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise _HubError(400, f"Invalid NDJSON commit payload at line {number}: {err}") from err
            if key == "header":
                header = value
            elif key == "file":
                encoding = value.get("encoding", "utf-8")
                raw = value["content"]
                snapshot[value["path"]] = (
                    base64.b64decode(raw) if encoding == "base64" else raw.encode(encoding)
                )
                changed.add(value["path"])
            elif key == "deletedFile":
                if value["path"] not in snapshot:
                    raise _HubError(
                        404,
                        "A file with this name doesn't exist",
                        error_code="EntryNotFound",
                        headers={"X-Repo-Commit": head},
                    )
                del snapshot[value["path"]]
                changed.add(value["path"])
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                doomed = [path for path in snapshot if path.startswith(prefix)]
                if not doomed:
                    raise _HubError(
                        404,
                        "A folder with this name doesn't exist",
                        error_code="EntryNotFound",
                        headers={"X-Repo-Commit": head},
                    )
                for path in doomed:
                    del snapshot[path]
                changed.update(doomed)
            elif key == "lfsFile":
                raise _HubError(
                    400, "LFS files are not supported by the local test Hub (preupload answers 'regular')"
                )
            else:
                raise _HubError(400, f"Unknown commit operation {key!r}")
        if header is None or not header.get("summary"):
            raise _HubError(400, "The commit header (with a summary) is missing")
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != head:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")

        oid = self._record_commit(
            repo,
            branch,
            snapshot,
            title=str(header["summary"]),
            description=str(header.get("description") or ""),
            author=user,
            changed=changed,
        )
        return _Response.json(
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{oid}",
                "commitMessage": header["summary"],
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP/1.1 adapter between ``http.server`` and :meth:`LocalHub.handle`."""

    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms delayed-ACK stalls

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        """Silence the default stderr access log (requests are kept in ``LocalHub.request_log``)."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        split = urlsplit(self.path)
        body = self._read_body() if self.command in ("POST", "PUT", "PATCH", "DELETE") else b""
        segments = [unquote(segment) for segment in split.path.split("/")[1:]]
        if segments and segments[-1] == "":
            segments.pop()
        request = _Request(
            method=self.command,
            segments=segments,
            params=parse_qs(split.query, keep_blank_values=True),
            headers=self.headers,
            body=body,
        )
        try:
            response = self.hub.handle(request)
        except Exception:  # noqa: BLE001 - report server bugs to the test instead of hanging the client
            self.hub.errors.append(traceback.format_exc())
            response = _Response.json({"error": "Local test Hub internal error (see LocalHub.errors)"}, 500)
        self.hub.request_log.append((self.command, split.path, response.status))

        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


# ---------------------------------------------------------------------- client patching


def _set_attr(stack: ExitStack, obj: object, name: str, value: object) -> None:
    """Set ``obj.name = value`` and register its restoration on ``stack``."""
    missing = object()
    old = getattr(obj, name, missing)
    setattr(obj, name, value)
    if old is missing:
        stack.callback(delattr, obj, name)
    else:
        stack.callback(setattr, obj, name, old)


def _set_env(stack: ExitStack, name: str, value: str | None) -> None:
    """Set (or unset, for ``None``) an environment variable and register its restoration on ``stack``."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value

    def restore() -> None:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old

    stack.callback(restore)


@contextmanager
def _client_pointed_at(hub: LocalHub, *, cache_dir: Path, token: str | None) -> Iterator[None]:
    """Point the installed ``huggingface_hub`` at ``hub`` and restore everything on exit.

    ``huggingface_hub`` reads ``HF_ENDPOINT`` and friends once, at import, into module constants
    that the client then reads *at call time*; so patching the constants (not the environment) is
    what takes effect. Copies that were frozen at import time are patched too:

    * ``huggingface_hub.hf_api.api``: the module-level ``HfApi()`` behind the top-level functions
      (``huggingface_hub.create_repo``, ``upload_folder``, ``model_info``...) captured ``endpoint``.
    * ``constants.HF_URL_HOSTS`` / ``utils._http._HUB_ORIGINS``: hosts derived from the endpoint
      (URL parsing, which redirects keep the ``Authorization`` header).
    * ``HF_HUB_OFFLINE`` is forced off (the loopback server is the point) and telemetry is disabled
      (with it on, building headers may try to fetch an agent registry from the endpoint).
    * Tokens: the stored-token paths move to a temporary folder so a developer's real token is never
      picked up; ``HF_TOKEN`` is set to ``token`` (or unset when ``None``).
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http, close_session

    url = hub.url
    with ExitStack() as stack:
        token_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="local-hub-home-")))
        stack.callback(close_session)  # drop keep-alive connections to the (soon stopped) server
        _set_attr(stack, constants, "ENDPOINT", url)
        _set_attr(
            stack, constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        _set_attr(stack, constants, "HF_URL_HOSTS", frozenset({*constants.HF_URL_HOSTS, "127.0.0.1"}))
        if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
            _set_attr(stack, _http, "_HUB_ORIGINS", frozenset({*_http._HUB_ORIGINS, _http._url_origin(url)}))
        _set_attr(stack, hf_api.api, "endpoint", url)
        _set_attr(stack, constants, "HF_HUB_CACHE", str(cache_dir))
        _set_attr(stack, constants, "HF_HUB_OFFLINE", False)
        _set_attr(stack, constants, "HF_HUB_DISABLE_TELEMETRY", True)
        _set_attr(stack, constants, "HF_TOKEN_PATH", str(token_dir / "token"))
        _set_attr(stack, constants, "HF_STORED_TOKENS_PATH", str(token_dir / "stored_tokens"))
        for name, value in {
            "HF_ENDPOINT": url,
            "HF_HUB_CACHE": str(cache_dir),
            "HF_HUB_OFFLINE": None,
            "TRANSFORMERS_OFFLINE": None,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_TOKEN": token,
            "HUGGING_FACE_HUB_TOKEN": None,
            "HF_OIDC_RESOURCE": None,
            "HF_TOKEN_PATH": str(token_dir / "token"),
        }.items():
            _set_env(stack, name, value)
        close_session()  # start from fresh connections
        yield


@contextmanager
def local_hub(
    tokens: Iterable[str] | Mapping[str, str] = ("hf_test_token",),
    refuse_pushes: bool = False,
    *,
    cache_dir: str | Path | None = None,
    login: bool = True,
) -> Iterator[LocalHub]:
    """Start a :class:`LocalHub` and point the real ``huggingface_hub`` client at it.

    Patches ``huggingface_hub.constants.ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE`` (plus the
    copies listed in :func:`_client_pointed_at`), sets ``HF_HUB_CACHE`` to ``cache_dir`` (a
    temporary folder by default), disables telemetry and offline mode, and restores all of it on
    exit, even on error.

    Args:
        tokens: valid tokens (see :class:`LocalHub`).
        refuse_pushes: start with commits refused (403); can be toggled later on the hub.
        cache_dir: Hub cache folder for downloads; a temporary folder (deleted on exit) if ``None``.
        login: if true, ``HF_TOKEN`` is the first valid token, so calls without ``token=`` are
            authenticated (as a logged-in user's would be). Pass ``token=False`` to a client call to
            send no token at all.
    """
    with ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="local-hub-cache-"))
        hub = stack.enter_context(LocalHub(tokens=tokens, refuse_pushes=refuse_pushes))
        stack.enter_context(
            _client_pointed_at(hub, cache_dir=Path(cache_dir), token=hub.token if login else None)
        )
        yield hub


@pytest.fixture(name="local_hub_server")
def local_hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """A fresh :class:`LocalHub` for one test, with the client pointed at it and logged in.

    Token: ``hub.token`` (``"hf_test_token"``, user :data:`DEFAULT_USER`). The Hub cache is a
    per-test temporary folder. Fails the test if the server hit an internal error.
    """
    with local_hub(cache_dir=tmp_path_factory.mktemp("hf-hub-cache")) as hub:
        yield hub
    assert not hub.errors, "Local test Hub internal errors:\n" + "\n".join(hub.errors)
