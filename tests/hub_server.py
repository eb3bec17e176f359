""" A Hugging Face Hub stand-in for tests: an in-memory HTTP server on 127.0.0.1.

It implements only what ``huggingface_hub`` (2.4) calls to publish a model with
``HfApi.create_repo`` + ``HfApi.create_commit`` and to fetch it with ``hf_hub_download``:

    GET  /api/agent-harnesses                             the client's best-effort registry read (empty)
    GET  /api/whoami-v2                                   who the token belongs to
    POST /api/repos/create                                create a model repo (409 if it exists)
    GET  /api/models/{org}/{name}[/revision/{rev}]        model_info / repo_info
    POST /api/validate-yaml                               README front matter check (accepts all)
    POST /api/models/{org}/{name}/preupload/{rev}         upload modes: always "regular"
    POST /api/models/{org}/{name}/commit/{rev}            ndjson commit, files inline as base64
    HEAD/GET /{org}/{name}/resolve/{rev}/{path}           file download, with the Hub's headers

Answering "regular" to the preupload call keeps the client off the LFS / Xet upload paths, so
every file arrives inline in the commit. Errors carry the ``X-Error-Code`` header the client
maps to its exceptions (RepoNotFound, RevisionNotFound, EntryNotFound). Every request is
recorded in ``requests`` so tests can assert what was, or was not, sent.
"""
import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

__all__ = ['FakeHub']

_REPO = r'(?P<repo>[\w.\-]+/[\w.\-]+)'
_ROUTES = [
    ('GET', re.compile(r'/api/agent-harnesses'), 'agent_harnesses'),
    ('GET', re.compile(r'/api/whoami-v2'), 'whoami'),
    ('POST', re.compile(r'/api/repos/create'), 'create_repo'),
    ('POST', re.compile(r'/api/validate-yaml'), 'validate_yaml'),
    ('GET', re.compile(rf'/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?'), 'repo_info'),
    ('POST', re.compile(rf'/api/models/{_REPO}/preupload/(?P<rev>[^/]+)'), 'preupload'),
    ('POST', re.compile(rf'/api/models/{_REPO}/commit/(?P<rev>[^/]+)'), 'commit'),
    ('GET', re.compile(rf'/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)'), 'resolve'),
    ('HEAD', re.compile(rf'/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)'), 'resolve'),
]


class _Repo:
    """Commits as full snapshots: sha -> {path: bytes}; 'main' names the latest."""

    def __init__(self):
        self.snapshots: Dict[str, Dict[str, bytes]] = {}
        self.main: Optional[str] = None

    def files(self, revision: str) -> Optional[Dict[str, bytes]]:
        sha = self.main if revision == 'main' else revision
        return self.snapshots.get(sha) if sha else ({} if revision == 'main' else None)


class FakeHub:
    """Start with ``with FakeHub(token=...) as hub:``; ``hub.endpoint`` is the HF_ENDPOINT to use."""

    def __init__(self, token: str = 'hf_test_token', user: str = 'tester', orgs: Tuple[str, ...] = ('timm-ait',)):
        self.token = token
        self.user = user
        self.orgs = orgs
        self.repos: Dict[str, _Repo] = {}
        self.requests: List[Tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self._server.server_address[1]}'

    def __enter__(self) -> 'FakeHub':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def writes(self) -> List[Tuple[str, str]]:
        """The requests that could change the Hub (creating repos, uploading, committing)."""
        return [(method, path) for method, path in self.requests if method == 'POST' and path != '/api/validate-yaml']

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        """The files of a repo at a revision ({} when it does not exist)."""
        repo = self.repos.get(repo_id)
        return dict(repo.files(revision) or {}) if repo else {}

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):  # keep test output clean
                pass

            def _dispatch(self, method: str):
                path = unquote(urlsplit(self.path).path)
                with hub._lock:
                    hub.requests.append((method, path))
                body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
                for route_method, pattern, name in _ROUTES:
                    match = pattern.fullmatch(path)
                    if route_method == method and match:
                        with hub._lock:
                            return getattr(hub, f'_{name}')(self, body, **match.groupdict())
                return _reply(self, 404, {'error': f'no route for {method} {path}'})

            def do_GET(self):
                self._dispatch('GET')

            def do_HEAD(self):
                self._dispatch('HEAD')

            def do_POST(self):
                self._dispatch('POST')

        return Handler

    # --- endpoints; each gets the request handler, the body and the path's groups ---

    def _authorized(self, request) -> bool:
        return request.headers.get('Authorization') == f'Bearer {self.token}'

    def _agent_harnesses(self, request, body):
        return _reply(request, 200, {'standardEnvVars': [], 'harnesses': {}})

    def _whoami(self, request, body):
        if not self._authorized(request):
            return _reply(request, 401, {'error': 'Invalid credentials in Authorization header'},
                          error_message='Invalid credentials in Authorization header')
        return _reply(request, 200, {'type': 'user', 'name': self.user,
                                     'orgs': [{'type': 'org', 'name': org} for org in self.orgs]})

    def _create_repo(self, request, body):
        if not self._authorized(request):
            return _reply(request, 401, {'error': 'Invalid credentials in Authorization header'},
                          error_message='Invalid credentials in Authorization header')
        payload = json.loads(body)
        owner = payload.get('organization') or self.user
        if owner not in (self.user, *self.orgs):
            return _reply(request, 403, {'error': f'You cannot create repos in {owner}'})
        repo_id = f"{owner}/{payload['name']}"
        url = f'{self.endpoint}/{repo_id}'
        if repo_id in self.repos:
            return _reply(request, 409, {'error': 'You already created this model repo', 'url': url})
        self.repos[repo_id] = _Repo()
        return _reply(request, 200, {'url': url, 'name': repo_id})

    def _validate_yaml(self, request, body):
        return _reply(request, 200, {'errors': [], 'warnings': []})

    def _repo_info(self, request, body, repo: str, rev: Optional[str] = None):
        found = self._find(request, repo, rev or 'main')
        if found is None:
            return
        sha, files = found
        return _reply(request, 200, {
            'id': repo, 'modelId': repo, 'sha': sha, 'private': False, 'library_name': 'timm',
            'siblings': [{'rfilename': path} for path in sorted(files)]})

    def _preupload(self, request, body, repo: str, rev: str):
        if self._find(request, repo, rev) is None:
            return
        files = json.loads(body)['files']
        return _reply(request, 200, {'files': [
            {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False, 'oid': None} for f in files]})

    def _commit(self, request, body, repo: str, rev: str):
        if not self._authorized(request):
            return _reply(request, 401, {'error': 'Invalid credentials in Authorization header'},
                          error_message='Invalid credentials in Authorization header')
        found = self._find(request, repo, rev)
        if found is None:
            return
        files = dict(found[1])
        for line in body.splitlines():
            item = json.loads(line)
            value = item['value']
            if item['key'] == 'file':
                files[value['path']] = base64.b64decode(value['content'])
            elif item['key'] == 'deletedFile':
                files.pop(value['path'], None)
            elif item['key'] != 'header':  # lfsFile, deletedFolder, copies: never asked for here
                return _reply(request, 400, {'error': f"unsupported commit operation {item['key']!r}"})
        sha = hashlib.sha1(repr(sorted((p, hashlib.sha256(c).hexdigest()) for p, c in files.items())).encode()
                           + (found[0] or '').encode()).hexdigest()
        self.repos[repo].snapshots[sha] = files
        self.repos[repo].main = sha
        return _reply(request, 200, {'commitUrl': f'{self.endpoint}/{repo}/commit/{sha}', 'commitOid': sha,
                                     'pullRequestUrl': None})

    def _resolve(self, request, body, repo: str, rev: str, path: str):
        found = self._find(request, repo, rev)
        if found is None:
            return
        sha, files = found
        if path not in files:
            return _reply(request, 404, {'error': 'Entry not found'}, error_code='EntryNotFound',
                          headers={'X-Repo-Commit': sha or ''})
        content = files[path]
        etag = f'"{hashlib.sha256(content).hexdigest()}"'
        return _reply(request, 200, content, headers={
            'X-Repo-Commit': sha, 'ETag': etag, 'Content-Type': 'application/octet-stream'})

    def _find(self, request, repo: str, rev: str):
        """(commit sha, files) of a repo at a revision, or None after replying with the Hub's 404."""
        if repo not in self.repos:
            _reply(request, 404, {'error': 'Repository not found'}, error_code='RepoNotFound')
            return None
        files = self.repos[repo].files(rev)
        if files is None:
            _reply(request, 404, {'error': f'Invalid rev id: {rev}'}, error_code='RevisionNotFound')
            return None
        return (self.repos[repo].main if rev == 'main' else rev), files


def _reply(request, status: int, body, error_code: str = '', error_message: str = '',
           headers: Optional[Dict[str, str]] = None) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request.send_response(status)
    if not isinstance(body, bytes):
        request.send_header('Content-Type', 'application/json')
    request.send_header('Content-Length', str(len(data)))
    if error_code:
        request.send_header('X-Error-Code', error_code)
    if error_message:
        request.send_header('X-Error-Message', error_message)
    for key, value in (headers or {}).items():
        request.send_header(key, value)
    request.end_headers()
    if request.command != 'HEAD':
        request.wfile.write(data)
