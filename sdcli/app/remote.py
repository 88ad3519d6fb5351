"""`generate --server URL` / `img2img --server URL` (or SDCLI_SERVER): the images are rendered by a warm
`sdcli serve` and written here.

Everything but the rendering stays in this process, as with `--ray` (app/cluster.py): the jobs are read and
checked, every output named and checked, every seed drawn before anything is sent. Each job goes to the server's
`/sdcli/v1/render` with its resolved config; the server renders it with the local path's own functions and
streams back, per image, the PNG file's bytes, which are written here atomically (save.write_png), so a file is
the same bytes as a local run's on the server's device and dtype. The stream also carries the sampling steps (the
progress bar and `--progress json` work as usual) and the job's error, whose exit code becomes this run's.

Standard library only (http.client): the client needs no server extra.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import time
import urllib.parse
from pathlib import Path

from sdcli import __version__
from sdcli.runtime import console
from sdcli.runtime.errors import ModelNotFoundError, SdcliError, UsageError, quote
from sdcli.app import save
from sdcli.app.progress import Progress

PROTOCOL = 1  # app/serve.py's PROTOCOL
_HASH_SUFFIX = re.compile(r" \[[0-9a-fA-F]{8,64}\]$")  # A1111's checkpoint title: "NAME [shorthash]"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0  # the server sends a heartbeat every few seconds, even while the job waits its turn


def check_request(req, base) -> None:
    """What the server cannot do for this client, refused before anything is sent."""
    refused = {"--cond": getattr(req, "cond", None), "--latent-in": getattr(req, "latent_in", None),
               "--latent-out": getattr(req, "latent_out", None), "--preview": getattr(req, "preview", None),
               "--ray": base.ray, "--refiner": base.refiner, "--controlnet": base.controlnets}
    for flag, value in refused.items():
        if value:
            raise UsageError(f"{flag} cannot be used with --server yet")


def with_server_model(url: str, base):
    """`base` with the model the server at `url` has loaded, when the run names none (-m left out): A1111's rule
    for a request without a checkpoint. Asked once, before the jobs are read, so every job of a prompts file is
    rendered with that one model (another client switching the server's model meanwhile changes nothing here),
    and --skip-existing compares its name with the one the images record."""
    from sdcli.jobs import with_values

    name = Server(url).loaded_model()
    console.info(f"--server: no --model given: rendering with the server's model {name}")
    return with_values(base, model=name)


def render_on_server(url: str, targets: list, req, init=None) -> None:
    """Render `targets` (planned and checked) on the server at `url`, writing each image as it arrives;
    `init`: img2img's (picture, notes, mask, mask name) as loaded here."""
    server = Server(url)
    started = time.perf_counter()
    by_job: dict[int, list] = {}
    for t in targets:
        by_job.setdefault(id(t.job), []).append(t)
    saved = []
    for group in by_job.values():
        saved += server.render(group, req, init)
    if getattr(req, "grid", None):
        save.save_grid(saved, req, targets[0].job.cfg.batch_size)
    took = time.perf_counter() - started
    console.info(f"done: {len(targets)} image{'s' if len(targets) != 1 else ''} in {took:.1f} s ({server.name})")


class Server:
    """A `sdcli serve` reached over HTTP(S): http://[user:pass@]host:port[/prefix]."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--server {quote(repr(url))}: expected http://HOST:PORT")
        self.scheme, self.host, self.prefix = parts.scheme, parts.hostname, parts.path.rstrip("/")
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise UsageError(f"--server {quote(repr(url))}: bad port") from None
        self.name = f"{parts.scheme}://{parts.hostname}:{self.port}{self.prefix}"
        self.headers = {"Content-Type": "application/json"}
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def render(self, targets: list, req, init) -> list:
        """One job's images: sent, streamed back, written; the Saved pictures (for --grid)."""
        job = targets[0].job
        body = {"protocol": PROTOCOL, "sdcli_version": __version__, "prompt": job.prompt, "source": job.source,
                "config": job.cfg.to_dict(), "targets": [{"index": t.index, "seed": t.seed, "subseed": t.subseed} for t in targets],
                "loras": [list(_lora_name(spec)) for spec in getattr(req, "loras", [])]}
        if init is not None:
            body.update(_init_body(*init))
        conn = self._connect()
        try:
            conn.request("POST", f"{self.prefix}/sdcli/v1/render", body=json.dumps(body).encode(),
                         headers=self.headers)
            response = conn.getresponse()
            if response.status != 200:
                raise self._refused(response)
            return _Reader(targets, req).read(response)
        except (OSError, http.client.HTTPException) as e:
            raise UsageError(f"--server {self.name}: the connection failed ({e})") from None
        finally:
            conn.close()  # also when this run is interrupted: the server then cancels the job

    def loaded_model(self) -> str:
        """The checkpoint the server renders a request that names none with: A1111's option
        `sd_model_checkpoint` (GET /sdapi/v1/options), its " [hash]" dropped. ModelNotFoundError (exit 4) when the
        server has none loaded."""
        conn = self._connect()
        try:
            conn.request("GET", f"{self.prefix}/sdapi/v1/options", headers=self.headers)
            response = conn.getresponse()
            if response.status != 200:
                raise self._refused(response)
            options = json.loads(response.read(1 << 20))
        except (OSError, http.client.HTTPException) as e:
            raise UsageError(f"--server {self.name}: the connection failed ({e})") from None
        except ValueError:
            raise UsageError(f"--server {self.name}: /sdapi/v1/options did not answer JSON") from None
        finally:
            conn.close()
        title = options.get("sd_model_checkpoint") if isinstance(options, dict) else None
        if not isinstance(title, str) or not title.strip():
            raise ModelNotFoundError(f"--server {self.name}: the server has no model loaded; pass -m NAME (a "
                                     "model it serves), or load one there (POST /sdapi/v1/options "
                                     "sd_model_checkpoint)")
        return _HASH_SUFFIX.sub("", title.strip())

    def _connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = kind(self.host, self.port, timeout=CONNECT_TIMEOUT_S)
        try:
            conn.connect()
        except OSError as e:
            raise UsageError(f"--server {self.name}: cannot connect ({e.strerror or e}); start one with "
                             "`sdcli serve --model FILE`") from None
        conn.sock.settimeout(READ_TIMEOUT_S)
        return conn

    def _refused(self, response) -> SdcliError:
        text = response.read(1 << 16).decode("utf-8", "replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = {}
        if response.status == 401:
            return UsageError(f"--server {self.name}: the server asks for a user and password "
                              "(http://USER:PASS@HOST:PORT)")
        message = body.get("error") or body.get("detail") or text.strip() or response.reason
        return _error(f"--server {self.name}: {message}", body.get("exit_code", UsageError.exit_code))


class _Reader:
    """The stream of one job: steps drive the progress, each image is written as it arrives."""

    def __init__(self, targets: list, req):
        self.targets, self.req = {t.index: t for t in targets}, req
        self.order = targets
        self.batch_size = targets[0].job.cfg.batch_size
        self.progress = self.step = None
        self.batch = -1
        self.saved: list = []

    def read(self, response) -> list:
        try:
            for line in response:
                if self._event(json.loads(line)):
                    return self.saved
        finally:
            self._close_progress()
        raise UsageError("--server: the server closed the stream before the job ended")

    def _event(self, event: dict) -> bool:
        """Handle one event; True when the job is over."""
        kind = event.get("event")
        if kind == "step":
            self._on_step(event)
        elif kind == "image":
            self._close_progress()
            self._write(event)
        elif kind == "error":
            raise _error(event.get("message", "the server failed"), event.get("exit_code", 1))
        elif kind == "end":
            if event.get("interrupted"):
                raise _error("the job was interrupted on the server; finished images were kept", 130)
            return True
        elif kind == "queued" and event.get("sdcli_version") != __version__:
            console.info(f"--server: the server runs sdcli {event.get('sdcli_version')}, this is {__version__}: "
                         "its version is what the images record")
        return False

    def _on_step(self, event: dict) -> None:
        batch = int(event.get("batch", 0))
        if batch != self.batch:
            self._close_progress()
            seeds = [t.seed for t in self.order[batch * self.batch_size:(batch + 1) * self.batch_size]]
            self.progress, self.batch = Progress(seeds or [0], event.get("total"), self.req.progress), batch
            self.step = self.progress.__enter__()
        if self.step is not None:
            self.step(int(event["step"]) - 1, int(event["total"]), None, None)

    def _close_progress(self) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)
            self.progress = self.step = None

    def _write(self, event: dict) -> None:
        target = self.targets[event["index"]]
        png = base64.b64decode(event["png"])
        if getattr(self.req, "grid", None):
            self.saved.append(_picture(png, target.seed))
        if getattr(self.req, "grid_only", False):
            return
        path = save.write_png(target, png, self.req)
        save.announce(self.req, target, path, event.get("timings", {}), event.get("fallbacks", []))


def _picture(png: bytes, seed: int) -> save.Saved:
    """A received PNG as save.Saved, for --grid: its pixels, infotext and sdcli record read back."""
    from PIL import Image

    from sdcli.output.metadata import PARAMETERS_KEY, SDCLI_JSON_KEY

    img = Image.open(io.BytesIO(png))
    img.load()
    return save.Saved(img.convert("RGB"), seed, img.text.get(PARAMETERS_KEY, ""),
                      json.loads(img.text.get(SDCLI_JSON_KEY, "{}")))


def _init_body(image, notes: list, mask, mask_name: str | None) -> dict:
    """img2img's picture and mask (grayscale) as they were loaded here (PNG keeps the pixels), and the notes."""
    out = {"image": _png_b64(image), "notes": list(notes)}
    if mask is not None:
        out.update(mask=_png_b64(mask), mask_name=Path(mask_name).name)
    return out


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


def _lora_name(spec: str) -> tuple[str, float]:
    """--lora FILE[:WEIGHT] as (file name, weight): the server finds the file by name in its lora_dir."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return Path(head).name, float(tail)
        except ValueError:
            pass
    return Path(spec).name, 1.0


def _error(message: str, exit_code: int) -> SdcliError:
    e = SdcliError(message)
    e.exit_code = int(exit_code) if isinstance(exit_code, int) else 1
    return e
