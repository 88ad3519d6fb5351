"""What the server's handlers share: the State (configuration, folders, the loaded model's service, the render
thread), JSON answers that are always strict JSON, errors as A1111-shaped bodies, and waiting for a ticket while
watching for the client to go away."""

from __future__ import annotations

import asyncio
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sdcli import config as cfgmod
from sdcli.app import a1111_api as api
from sdcli.app.serve_device import Device, Folders, Service, Ticket, log, status_of
from sdcli.runtime.errors import SdcliError

PROTOCOL = 1  # /sdcli/v1/render's wire format (app/remote.py speaks it)
HEARTBEAT_S = 5.0  # a streaming client hears from the server at least this often while its job waits
DISCONNECT_POLL_S = 0.25


@dataclass
class State:
    base: cfgmod.RunConfig
    folders: Folders
    service: Service
    device: Device

    def __post_init__(self):
        self.options: dict = {}  # POST /options settings (clip skip) applied below every request's own
        self.scratch = Path(tempfile.mkdtemp(prefix="sdcli-serve-"))  # uploads are decoded through files here

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)

    def submit(self, work, name: str, listener=None) -> Ticket:
        return self.device.submit(Ticket(work, name, listener))


async def wait_for(request, ticket: Ticket):
    """The ticket's result, or None when the client disconnected first (the ticket is then cancelled)."""
    future = asyncio.wrap_future(ticket.future)
    while True:
        done, _ = await asyncio.wait([future], timeout=DISCONNECT_POLL_S)
        if done:
            return future.result()
        if await request.is_disconnected():
            ticket.cancelled.set()
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
            log(f"{ticket.name}: the client went away; job cancelled")
            return None


def JSONResponse(content, status_code: int = 200, headers=None):
    """Starlette's JSONResponse of `content` made strict JSON first: a NaN or Infinity a client sent (Python's
    json reads them) comes back as text instead of failing the response."""
    from starlette.responses import JSONResponse as Response

    return Response(_finite(content), status_code=status_code, headers=headers)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def error_response(e: BaseException):
    """A JSON response for an error raised while handling a request (never a traceback to the client)."""

    from starlette.exceptions import HTTPException

    if isinstance(e, api.Invalid):
        return JSONResponse(e.body(), status_code=422)
    if isinstance(e, HTTPException):  # the size guard's 413 for a chunked body, met while reading it
        return JSONResponse({"detail": e.detail}, status_code=e.status_code)
    if isinstance(e, SdcliError):
        status = status_of(e)
        return JSONResponse(api.failure(status, e, str(e)), status_code=status)
    import traceback

    log(f"unexpected {type(e).__name__}: {e}\n{traceback.format_exc()}")
    return JSONResponse(api.failure(500, e, f"unexpected {type(e).__name__}: {e}"), status_code=500)
