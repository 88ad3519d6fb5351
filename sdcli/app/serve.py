"""`sdcli serve`: one warm process that answers AUTOMATIC1111's web API (`/sdapi/v1/...`), OpenAI's
`/v1/images/generations` and sdcli's own `/sdcli/v1/render` (what `generate --server` talks to).

The stack is Starlette on uvicorn (the optional extra `serve`, imported only by these modules): what FastAPI is
built on, without pydantic, since requests are checked by a1111_api's tables and config.check_value. Work goes to
the one render thread of serve_device.py, in arrival order; handlers only parse, wait and answer, so /progress,
/interrupt and the listings answer while a job runs. A client that disconnects cancels its job.

Safe by default: loopback only unless --api-auth is given (or --insecure); HTTP basic auth as A1111's --api-auth;
a request-size limit; files named by a request are looked up in the configured folders only; a bad request is a
422 with FastAPI's body (A1111's), an error while rendering a JSON body with A1111's fields, never a traceback.

The modules: serve.py (this: start, exposure rules, bind, the auth and size guard), serve_routes.py (A1111's and
OpenAI's handlers), serve_remote.py (the endpoint of `--server`), serve_http.py (what the handlers share),
serve_device.py (the render thread and the loaded model, no HTTP), a1111_api.py (the API's mapping, as data).
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from sdcli import config as cfgmod
from sdcli.app.serve_device import Device, Folders, Service, Ticket, log
from sdcli.app.serve_http import JSONResponse, State
from sdcli.runtime.errors import Terminated, UsageError



@dataclass(frozen=True)
class ServeRequest:
    flags: dict  # config keys from the command line (model, vae, dtype, device, lora_dir, ...)
    config_file: Path | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    models_dir: str | None = None
    api_auth: str | None = None
    insecure: bool = False
    max_request_mb: float = 64.0


def run_serve(req: ServeRequest) -> None:
    """Check the exposure, bind (a taken port fails before the slow load), load the model, serve until Ctrl-C or
    SIGTERM, which end it cleanly (exit 0): the running job is interrupted, waiting ones are cancelled."""
    check_exposure(req.host, req.api_auth, req.insecure)
    credentials = parse_auth(req.api_auth)
    uvicorn = _import_stack()
    if not req.max_request_mb > 0:
        raise UsageError(f"option --max-request-mb: must be a positive number, got {req.max_request_mb}")
    with _bind(req.host, req.port) as sock:
        state = _start(req)
        app = build_app(state, credentials, int(req.max_request_mb * (1 << 20)))
        host, port = sock.getsockname()[:2]
        if not _is_loopback(req.host):
            log("WARNING: reachable from other machines" + (" without a password (--insecure)" if not credentials
                else "; basic auth sends the password in clear: put TLS in front"))
        log(f"listening on http://{_url_host(host)}:{port} (model {Path(state.service.current[0]).name}; "
            f"{'basic auth' if credentials else 'no auth'})")
        server = _server_class(uvicorn)(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                       timeout_graceful_shutdown=10), state.device)
        try:
            server.run(sockets=[sock])
        except (KeyboardInterrupt, Terminated):  # uvicorn raises the signal again once it has shut down
            log("stopped")
        finally:
            state.device.stop()
            state.cleanup()


def check_exposure(host: str, api_auth: str | None, insecure: bool) -> None:
    """Loopback only unless the API asks for a password (--api-auth) or the risk is taken (--insecure)."""
    if _is_loopback(host) or api_auth or insecure:
        return
    raise UsageError(f"--host {host} is reachable from other machines: anyone there could run jobs on this one. "
                     "Set --api-auth USER:PASS (and put TLS in front), or pass --insecure if that is what you want")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> dict[str, str]:
    """A1111's --api-auth: USER:PASS[,USER:PASS...] -> {user: password}."""
    if not text:
        return {}
    out = {}
    for pair in text.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise UsageError("option --api-auth: expected USER:PASS[,USER:PASS...]")
        out[user] = password
    return out


def _import_stack():
    """uvicorn (and the check that Starlette is there): the optional extra, imported only by `sdcli serve`."""
    try:
        __import__("starlette")
        import uvicorn
    except ImportError:
        from sdcli.runtime.extras import install_hint

        raise UsageError(f"sdcli serve needs the server extra: {install_hint('serve')}") from None
    return uvicorn


def _start(req: ServeRequest) -> State:
    """The server's configuration resolved and its model loaded (on the device thread, as every job is)."""
    base = cfgmod.resolve(req.flags, req.config_file)
    if not base.model:
        raise UsageError("sdcli serve needs --model FILE (or 'model:' in a config)")
    if base.ray:
        raise UsageError("sdcli serve renders in this process; 'ray' cannot be set for it")
    base = dataclasses.replace(base, model=_absolute(base.model), vae=_absolute(base.vae))
    folders = Folders(base.model, _folder(req.models_dir, "--models-dir"), _folder(base.vae_dir, "vae_dir"),
                      _folder(base.lora_dir, "lora_dir"))
    state = State(base, folders, Service(base, folders), Device())
    state.device.submit(Ticket(lambda _t: state.service.ensure(None), "load")).future.result()
    return state


def _absolute(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path


def _folder(path: str | None, what: str) -> Path | None:
    if not path:
        return None
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise UsageError(f"{what} {path}: no such folder")
    return folder


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(128)  # connections queue from now on, before uvicorn starts accepting them
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _server_class(uvicorn):
    class Server(uvicorn.Server):
        """uvicorn's server; at Ctrl-C / SIGTERM the running job is interrupted so the shutdown is prompt."""

        def __init__(self, config, device: Device):
            super().__init__(config)
            self.device = device

        def handle_exit(self, sig, frame) -> None:
            self.device.stop()
            super().handle_exit(sig, frame)

    return Server


# --- the app -------------------------------------------------------------------------------------------------

def build_app(state: State, credentials: dict[str, str], max_bytes: int):
    """The Starlette app: A1111's routes, OpenAI's, sdcli's; behind the auth and size guard."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    from sdcli.app import serve_routes as routes

    async def http_error(_request, exc: HTTPException):  # FastAPI's shape: {"detail": ...}
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    table = routes.table(state)
    app = Starlette(routes=[Route(path, fn, methods=[method]) for (method, path), fn in table.items()],
                    exception_handlers={HTTPException: http_error})
    return Guard(app, credentials, max_bytes)


class Guard:
    """Pure ASGI middleware in front of the app: HTTP basic auth (A1111's --api-auth: 401 with
    WWW-Authenticate) and the request-size limit (413), both before a byte of the body reaches a handler."""

    def __init__(self, app, credentials: dict[str, str], max_bytes: int):
        self.app, self.credentials, self.max_bytes = app, credentials, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.credentials and not self._authorized(headers.get(b"authorization", b"")):
            return await _send_json(send, 401, {"detail": "Incorrect username or password"},
                                    [(b"www-authenticate", b"Basic")])
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, 413, {"detail": f"request body over {self.max_bytes} bytes"})
        await self.app(scope, self._limited(receive), send)

    def _authorized(self, header: bytes) -> bool:
        kind, _, value = header.partition(b" ")
        if kind.lower() != b"basic":
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        known = self.credentials.get(user)
        return known is not None and secrets.compare_digest(password.encode(), known.encode())

    def _limited(self, receive):
        """Counts the body as it arrives (a chunked body has no Content-Length): past the limit, a 413."""
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        return limited


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
