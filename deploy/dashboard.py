"""`fedrad dashboard`: a small read-only web app on the coordinator host over its run directories.

Pages (one HTML page, hash-routed, polling the JSON API every 2 s): runs (status, round, elapsed, sites
answered/aggregated, last losses, ETA), one run (loss, held-out loss, alignment/uniformity, probe-monitor AUC
per round and per site, the round-time split, capped or rejected sites with their reason code, ε per site,
checkpoints and releases) and sites (enrolled at the coordinator, connected or not, images reported,
refusals). Run directories are read incrementally (fedrad.server.run_watch); the plots render in the browser
with the plotly.js that the pinned `plotly` package ships, served from here: no page loads anything from
elsewhere (the Content-Security-Policy says so to the browser too).

Access: bound to 127.0.0.1 unless TLS (certificate + key) and a token are both configured. The token comes from
a file (--token-file) or FEDRAD_DASHBOARD_TOKEN, never the command line (it would show in `ps`). With a token,
every page and API route answers 401 without it (a sign-in form at the pages); it is taken as
`Authorization: Bearer TOKEN` or the HttpOnly cookie that signing in sets. Only GET (and POST to /login)
exist; long paths and bodies are refused before any handler runs, and so is a Host header that names this
host by another name than loopback, --host or --allow-host (a DNS-rebinding page elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import ipaddress
import os
import re
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from fedrad.server.run_watch import RunWatch, site_activity

PathLike = str | os.PathLike[str]
TOKEN_ENV = "FEDRAD_DASHBOARD_TOKEN"
COOKIE = "fedrad_dashboard"
MAX_PATH = 512  # bytes of path + query
MAX_BODY = 4096  # bytes of a request body (only the sign-in form has one)
RESCAN_SECONDS = 5.0  # how often the runs folder is listed again
FLOWER_SECONDS = 10.0  # how often the coordinator is asked for its runs and nodes
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ASSETS = Path(__file__).with_name("dashboard_assets")
SECURITY_HEADERS = {
    # plotly sets inline styles on its SVG; nothing else is allowed, and nothing from another origin.
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def plotly_js() -> Path:
    """plotly.min.js as the pinned `plotly` package ships it (its package_data)."""
    try:
        path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    except ModuleNotFoundError:
        raise FileNotFoundError("the dashboard needs the `plotly` package: pip install 'fedrad[dashboard]'") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: plotly.min.js missing from the installed plotly package")
    return path


class Runs:
    """The run directories under one folder (and the folder itself, if it is one), each watched incrementally."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = Path(runs_dir)
        self.watches: dict[str, RunWatch] = {}
        self._scanned = 0.0

    def scan(self) -> dict[str, RunWatch]:
        if time.monotonic() - self._scanned < RESCAN_SECONDS and self.watches:
            return self.watches
        self._scanned = time.monotonic()
        found = {}
        try:
            candidates = [self.runs_dir, *sorted(p for p in self.runs_dir.iterdir() if p.is_dir())]
        except OSError:
            candidates = []
        for folder in candidates:
            if RUN_NAME.match(folder.name) and (folder / "run.json").is_file():
                found[folder.name] = self.watches.get(folder.name) or RunWatch(folder)
        self.watches = found
        return found

    def get(self, name: str) -> RunWatch | None:
        """A run by its folder name; anything that is not one of the listed names (`..`, slashes) is None."""
        if not RUN_NAME.match(name):
            return None
        return self.scan().get(name)


class Coordinator:
    """Flower's view (`flwr ls`, `flwr supernode list`), refreshed in the background: pages never wait on it."""

    def __init__(self, superlink: str | None, ca: Path | None) -> None:
        self.superlink, self.ca = superlink, ca
        self.status: dict[str, str] = {}
        self.nodes: list[dict[str, Any]] = []
        self.error: str | None = None

    def refresh(self) -> None:
        from fedrad.deploy.flower_cli import CoordinatorError, flwr_json

        if not self.superlink:
            return
        try:
            runs = flwr_json(["ls"], self.superlink, self.ca, timeout=60).get("runs") or []
            self.status = {str(r.get("run-id")): str(r.get("status") or "") for r in runs}
            self.nodes = list(flwr_json(["supernode", "list"], self.superlink, self.ca, timeout=60).get("nodes") or [])
            self.error = None
        except CoordinatorError as exc:
            self.error = str(exc)

    async def loop(self) -> None:
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(FLOWER_SECONDS)


def session_value(token: str) -> str:
    """The sign-in cookie: an HMAC of the token (the token itself is never stored in the browser)."""
    return hmac.new(token.encode("utf-8"), b"fedrad-dashboard-session", hashlib.sha256).hexdigest()


def authorized(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    header = request.headers.get("authorization", "")
    if header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_value(token).encode())


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fedrad dashboard: sign in</title>
</head><body style="font-family: sans-serif"><main><h1>fedrad dashboard</h1>
<form method="post" action="/login"><label>token <input type="password" name="token" id="token"
autocomplete="current-password"></label> <button type="submit" id="sign-in">sign in</button></form>
<p class="muted">{note}</p></main></body></html>"""


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def build_app(runs_dir: Path, token: str | None = None, superlink: str | None = None, ca: Path | None = None,
              secure_cookie: bool = False, hosts: tuple[str, ...] = LOOPBACK_NAMES) -> Starlette:
    """The ASGI app (uvicorn serves it; tests use Starlette's TestClient on it). `hosts`: the names the
    browser may call it by (the Host header), so a web page elsewhere cannot reach it by DNS rebinding."""
    runs = Runs(runs_dir)
    coordinator = Coordinator(superlink, ca)
    plotly = plotly_js()

    def status_of(watch: RunWatch) -> str | None:
        run_id = (watch.run.poll() or {}).get("run_id")
        return coordinator.status.get(str(run_id)) if run_id is not None else None

    async def index(request: Request) -> Response:
        return FileResponse(ASSETS / "index.html", media_type="text/html")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        files = {"dashboard.js": ASSETS / "dashboard.js", "dashboard.css": ASSETS / "dashboard.css",
                 "plotly.min.js": plotly}
        if name not in files:
            return JSONResponse({"error": "not found"}, status_code=404)
        media = "text/css" if name.endswith(".css") else "text/javascript"
        return FileResponse(files[name], media_type=media)

    async def api_runs(request: Request) -> Response:
        watches = runs.scan()
        rows = [w.summary(status_of(w)) for w in watches.values()]
        rows.sort(key=lambda r: r.get("started") or 0, reverse=True)
        return JSONResponse({"runs_dir": str(runs.runs_dir), "runs": rows})

    async def api_run(request: Request) -> Response:
        watch = runs.get(request.path_params["name"])
        if watch is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        return JSONResponse(watch.detail(status_of(watch)))

    async def api_sites(request: Request) -> Response:
        watches = list(runs.scan().values())
        for watch in watches:
            watch.poll()
        activity = site_activity(watches)
        sites = []
        from fedrad.deploy.runs_command import iso_time

        for node in coordinator.nodes:
            node_id = str(node.get("node-id"))
            seen = activity.pop(node_id, {})
            status = str(node.get("status") or "?")
            sites.append({"node_id": node_id, "status": status, "connected": status == "online",
                          "last_seen": iso_time(node.get("offline-at")) if status != "online" else "now",
                          "enrolled_at": iso_time(node.get("created-at")), **_site_fields(seen)})
        for node_id, seen in activity.items():  # seen in a run, not (or no longer) listed by the coordinator
            sites.append({"node_id": node_id, "status": "unknown" if superlink else "-", "connected": False,
                          "last_seen": None, "enrolled_at": None, **_site_fields(seen)})
        return JSONResponse({"flower": superlink, "flower_error": coordinator.error, "sites": sites})

    async def login(request: Request) -> Response:
        if request.method == "GET" or token is None:
            return _login_form(401 if token else 404)
        body = await request.body()
        given = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
        if not hmac.compare_digest(given.encode(), token.encode()):
            return _login_form(403, "wrong token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, session_value(token), httponly=True, samesite="strict", secure=secure_cookie,
                            path="/")
        return response

    routes = [Route("/", index), Route("/static/{name}", static), Route("/api/runs", api_runs),
              Route("/api/runs/{name}", api_run), Route("/api/sites", api_sites),
              Route("/login", login, methods=["GET", "POST"])]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(coordinator.loop()) if superlink else None
        yield
        if task:
            task.cancel()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.coordinator = coordinator
    return Guard(app, token, hosts)


def _site_fields(seen: dict[str, Any]) -> dict[str, Any]:
    return {"name": seen.get("name"), "label": seen.get("label"), "images_reported": seen.get("images_reported"),
            "last_round": seen.get("last_round"), "refusals": seen.get("refusals") or {}}


def _login_form(status: int, note: str = "this dashboard asks for its access token") -> Response:
    return HTMLResponse(LOGIN_PAGE.replace("{note}", html.escape(note)), status_code=status,
                        headers=SECURITY_HEADERS)


class Guard:
    """ASGI middleware in front of every route: request limits, the token, security headers."""

    def __init__(self, app, token: str | None, hosts: tuple[str, ...] = LOOPBACK_NAMES) -> None:
        self.app, self.token, self.hosts = app, token, {h.strip("[]").lower() for h in hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        path = scope.get("raw_path") or scope["path"].encode()
        refusal = self._refuse(request, path, scope.get("query_string", b""))
        if refusal is None and _host_name(request.headers.get("host", "")) not in self.hosts:
            refusal = JSONResponse({"error": "unknown Host"}, status_code=400)  # DNS rebinding
        if refusal is not None:
            return await _with_headers(refusal)(scope, receive, send)
        if scope["path"] != "/login" and not authorized(request, self.token):
            if scope["path"].startswith("/api/") or scope["path"].startswith("/static/"):
                response: Response = JSONResponse({"error": "token required"}, status_code=401)
            else:
                response = _login_form(401)
            return await _with_headers(response)(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *[(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                                        if k.encode() not in present]]
            await send(message)

        body_seen = 0

        async def bounded_receive():
            nonlocal body_seen
            message = await receive()
            if message["type"] == "http.request":
                body_seen += len(message.get("body", b""))
                if body_seen > MAX_BODY:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, bounded_receive, send_with_headers)
        except _TooLarge:
            await _with_headers(JSONResponse({"error": "request too large"}, status_code=413))(scope, receive, send)

    @staticmethod
    def _refuse(request: Request, path: bytes, query: bytes) -> Response | None:
        if len(path) + len(query) > MAX_PATH:
            return JSONResponse({"error": "request line too long"}, status_code=414)
        lowered = path.lower()
        if b".." in path or b"%2e%2e" in lowered or b"%2f" in lowered or b"\\" in path or b"%5c" in lowered \
                or b"\x00" in path or b"%00" in lowered:
            return JSONResponse({"error": "bad path"}, status_code=400)
        if request.method not in ("GET", "HEAD", "POST") or (request.method == "POST" and request.url.path != "/login"):
            return JSONResponse({"error": "read-only"}, status_code=405)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return JSONResponse({"error": "request too large"}, status_code=413)
        if request.headers.get("transfer-encoding") and request.method != "POST":
            return JSONResponse({"error": "request too large"}, status_code=413)
        return None


def _host_name(header: str) -> str:
    """The host of a Host header, without its port: `127.0.0.1:8050` -> 127.0.0.1, `[::1]:8050` -> ::1."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _TooLarge(Exception):
    pass


def _with_headers(response: Response) -> Response:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


def read_token(token_file: str | None) -> str | None:
    """The access token: --token-file (first line), else $FEDRAD_DASHBOARD_TOKEN, else None (no token)."""
    if token_file:
        path = Path(token_file)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise FileNotFoundError(f"--token-file {path}: cannot read ({exc.strerror})") from None
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"--token-file {path}: readable by others (chmod 600 it)")
        token = text.splitlines()[0].strip() if text else ""
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            return None
    if len(token) < 16:
        raise ValueError(f"{'--token-file ' + token_file if token_file else TOKEN_ENV}: the token must have at "
                         "least 16 characters")
    return token


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """Anything but loopback needs TLS and a token (ValueError, exit 2, otherwise)."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    for flag, value in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"{flag} {value}: no such file")
    if not _loopback(host) and not (tls_cert and token):
        raise ValueError(f"--host {host}: the dashboard binds beyond 127.0.0.1 only with TLS (--tls-cert, "
                         f"--tls-key) and a token (--token-file or {TOKEN_ENV})")


def dashboard_main(*, runs_dir: PathLike = "runs", host: str = "127.0.0.1", port: int = 8050,
                   superlink: str | None = None, certs: PathLike | None = None, token_file: PathLike | None = None,
                   allow_host: list[str] | None = None, tls_cert: PathLike | None = None,
                   tls_key: PathLike | None = None) -> int:
    """`fedrad dashboard`: serve the read-only dashboard over `runs_dir` until Ctrl-C; returns 0."""
    import uvicorn

    from fedrad.deploy.flower_cli import ca_from
    from fedrad.deploy.processes import with_default_port

    cert, key = (os.fspath(tls_cert) if tls_cert else None), (os.fspath(tls_key) if tls_key else None)
    token = read_token(os.fspath(token_file) if token_file else None)
    check_exposure(host, token, cert, key)
    folder = Path(runs_dir).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"--runs-dir {folder}: no such folder (where `fedrad run` writes its runs)")
    address = with_default_port(superlink) if superlink else None
    hosts = tuple(dict.fromkeys([*LOOPBACK_NAMES, host, *(allow_host or [])]))
    app = build_app(folder, token, address, ca_from(certs), secure_cookie=bool(cert), hosts=hosts)
    scheme = "https" if cert else "http"
    print(f"fedrad dashboard: {scheme}://{host}:{port}/ over {folder}"
          + (" (token required)" if token else " (no token: loopback only)"), file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", ssl_certfile=cert, ssl_keyfile=key,
                server_header=False, h11_max_incomplete_event_size=16 * 1024)
    return 0


__all__ = ["COOKIE", "TOKEN_ENV", "build_app", "check_exposure", "dashboard_main", "plotly_js", "read_token",
           "session_value"]
