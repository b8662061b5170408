"""A local stand-in for the Hugging Face Hub, served over real HTTP on localhost.

It implements what huggingface_hub's upload and download paths call: create-repo, branch,
validate-yaml, preupload (every file "regular"), commit (NDJSON, base64 files), pull
requests (discussions), and HEAD/GET of files (resolve). Repositories live in memory;
every request and commit is recorded for the tests to assert on. Tokens map to users; a
user may write to their own namespace and to the organisations listed for them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    branches: dict[str, dict[str, bytes]] = field(
        default_factory=lambda: {"main": {".gitattributes": GITATTRIBUTES}})
    vanishing: bool = False  # "exists" for create-repo, 404 for everything else


@dataclass
class Commit:
    repo_id: str
    revision: str
    message: str
    description: str
    files: dict[str, bytes]
    create_pr_param: bool
    authorization: str | None
    user_agent: str


class FakeHub:
    """The Hub's state, and the server that exposes it."""

    def __init__(self, users: dict[str, str] | None = None,
                 orgs: dict[str, list[str]] | None = None) -> None:
        self.users = users or {"hf_test_write_token": "me"}  # token -> user name
        self.orgs = orgs or {}  # user -> extra namespaces they may write to
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []  # create-repo payloads
        self.pulls: list[dict] = []  # pull requests opened
        self.echo_token_in_errors = False  # a careless server: the 401 body repeats the token
        self.broken_commits = False  # answer commits with a 500 that repeats the token
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, **kwargs) -> Repo:
        repo = Repo(**kwargs)
        repo.branches["main"].update(files or {})
        self.repos[repo_id] = repo
        return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[revision]

    def user(self, authorization: str | None) -> str | None:
        token = (authorization or "").removeprefix("Bearer ").strip()
        return self.users.get(token)

    def may_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.orgs.get(user, []))


def _sha(files: dict[str, bytes]) -> str:
    h = hashlib.sha1()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name])
    return h.hexdigest()


REPO = r"(?P<repo>[^/]+/[^/]+)"


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

        # ------------------------------------------------------------ plumbing
        def _send(self, status: int, body: object = None, headers: dict | None = None,
                  raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(body if body is not None
                                                          else {}).encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if raw is None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _user(self) -> str | None:
            return hub.user(self.headers.get("Authorization"))

        def _auth_required(self) -> str | None:
            user = self._user()
            if user is None:
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                extra = f" ({token})" if hub.echo_token_in_errors and token else ""
                self._error(401, f"Invalid credentials in Authorization header{extra}")
            return user

        def _repo(self, repo_id: str, write: bool) -> Repo | None:
            repo = hub.repos.get(repo_id)
            user = self._user()
            namespace = repo_id.split("/")[0]
            if repo is None or repo.vanishing or (
                    repo.private and not hub.may_write(user, namespace)):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            if repo.gated and not hub.may_write(user, namespace):
                self._error(403, "Access to this repository is restricted", "GatedRepo")
                return None
            if write and not hub.may_write(user, namespace):
                self._error(403, "You don't have the rights to write to this repository")
                return None
            return repo

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            path, query = url.path, parse_qs(url.query)
            with hub.lock:
                hub.requests.append((method, path))
            routes = [
                ("POST", r"/api/repos/create", self._create),
                ("POST", r"/api/validate-yaml", self._validate_yaml),
                ("POST", rf"/api/models/{REPO}/branch/(?P<rev>.+)", self._branch),
                ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>.+)", self._preupload),
                ("POST", rf"/api/models/{REPO}/commit/(?P<rev>.+)", self._commit),
                ("POST", rf"/api/models/{REPO}/discussions", self._open_pr),
                ("GET", rf"/api/models/{REPO}/discussions/(?P<num>\d+)", self._pr_details),
                ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", self._info),
                ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
                ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ]
            for verb, pattern, fn in routes:
                m = re.fullmatch(pattern, path)
                if verb == method and m:
                    args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                    return fn(query=query, **args)
            self._error(404, f"no route for {method} {path}")

        def do_GET(self) -> None:
            self._route("GET")

        def do_HEAD(self) -> None:
            self._route("HEAD")

        def do_POST(self) -> None:
            self._route("POST")

        # ------------------------------------------------------------ endpoints
        def _create(self, query) -> None:
            payload = json.loads(self._body() or b"{}")
            user = self._auth_required()
            if user is None:
                return
            namespace = payload.get("organization") or user
            repo_id = f"{namespace}/{payload['name']}"
            url = f"{hub.url}/{repo_id}"
            if not hub.may_write(user, namespace):
                return self._error(403, "You don't have the rights to create a model under "
                                        f"the namespace {namespace}")
            if repo_id in hub.repos:
                return self._send(409, {"error": "You already created this model repo",
                                        "url": url})
            with hub.lock:
                hub.created.append(payload)
                hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private"
                                          or payload.get("private") is True)
            self._send(200, {"url": url, "name": repo_id})

        def _validate_yaml(self, query) -> None:
            self._body()
            self._send(200, {"errors": [], "warnings": []})

        def _branch(self, query, repo, rev) -> None:
            self._body()
            r = self._repo(repo, write=True)
            if r is None:
                return
            if rev in r.branches:
                return self._error(409, f"Reference {rev} already exists")
            r.branches[rev] = dict(r.branches["main"])
            self._send(200, {})

        def _preupload(self, query, repo, rev) -> None:
            payload = json.loads(self._body() or b"{}")
            if self._repo(repo, write=True) is None:
                return
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                      "oid": None} for f in payload.get("files", [])]
            self._send(200, {"files": files, "commitOid": "0" * 40})

        def _commit(self, query, repo, rev) -> None:
            body = self._body()
            r = self._repo(repo, write=True)
            if r is None:
                return
            if hub.broken_commits:
                auth = self.headers.get("Authorization")
                return self._error(500, f"Internal error while committing for {auth}")
            header, files = {}, {}
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                elif item["key"] == "file":
                    v = item["value"]
                    files[v["path"]] = base64.b64decode(v["content"])
            create_pr = query.get("create_pr") == ["1"]
            pr_num = None
            if create_pr:  # the create_commit path: the commit opens the pull request
                pr_num = self._new_pr(repo, header.get("summary", ""), via="commit")
                rev = f"refs/pr/{pr_num}"
            base = r.branches.get(rev) or dict(r.branches["main"])
            r.branches[rev] = {**base, **files}
            with hub.lock:
                hub.commits.append(Commit(repo, rev, header.get("summary", ""),
                                          header.get("description", ""), files, create_pr,
                                          self.headers.get("Authorization"),
                                          self.headers.get("User-Agent", "")))
            oid = _sha(r.branches[rev])
            answer = {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid}
            if pr_num is not None:
                answer["pullRequestUrl"] = f"{hub.url}/{repo}/discussions/{pr_num}"
            self._send(200, answer)

        def _new_pr(self, repo: str, title: str, via: str) -> int:
            with hub.lock:
                hub.pulls.append({"repo": repo, "title": title, "via": via})
                num = len(hub.pulls)
            hub.repos[repo].branches[f"refs/pr/{num}"] = dict(hub.repos[repo].branches["main"])
            return num

        def _open_pr(self, query, repo) -> None:
            payload = json.loads(self._body() or b"{}")
            if self._repo(repo, write=True) is None:
                return
            if not payload.get("pullRequest"):
                return self._error(400, "only pull requests here")
            self._send(200, {"num": self._new_pr(repo, payload.get("title", ""), via="api")})

        def _pr_details(self, query, repo, num) -> None:
            pull = hub.pulls[int(num) - 1]
            self._send(200, {
                "title": pull["title"], "num": int(num), "author": {"name": "me"},
                "createdAt": "2024-01-01T00:00:00.000Z", "status": "draft",
                "repo": {"name": repo, "type": "model"}, "isPullRequest": True,
                "events": [], "changes": {"base": "refs/heads/main"},
                "filesWithConflicts": []})

        def _info(self, query, repo, rev=None) -> None:
            r = hub.repos.get(repo)  # a gated repository's page is public, its files are not
            if r is None or r.vanishing or (r.private and not hub.may_write(
                    self._user(), repo.split("/")[0])):
                return self._error(404, "Repository not found", "RepoNotFound")
            files = r.branches.get(rev or "main")
            if files is None:
                return self._error(404, "Revision not found", "RevisionNotFound")
            self._send(200, {"id": repo, "modelId": repo, "sha": _sha(files),
                             "private": r.private, "gated": "auto" if r.gated else False,
                             "siblings": [{"rfilename": f} for f in sorted(files)]})

        def _resolve(self, query, repo, rev, file) -> None:
            r = self._repo(repo, write=False)
            if r is None:
                return
            files = r.branches.get(rev)
            if files is None:
                return self._error(404, "Revision not found", "RevisionNotFound")
            if file not in files:
                return self._error(404, "Entry not found", "EntryNotFound")
            data = files[file]
            headers = {"X-Repo-Commit": _sha(files),
                       "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}
            self._send(200, headers=headers, raw=data)

    return Handler
