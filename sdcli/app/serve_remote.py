"""The server side of `generate --server` / `img2img --server` (app/remote.py is the client): `/sdcli/v1/render`
takes one job with its resolved config, seeds, LoRA names and init image, and answers with an NDJSON stream of
events (queued, wait heartbeats, step, image with the PNG file's bytes, then end or error with an exit code).

The request is untrusted like any other: its config goes through config.check_mapping, its files are the server's,
found by name in the configured folders; a dtype, device or prediction the server does not run is refused, since
the bytes would not be those of the client's local run."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

from sdcli import __version__
from sdcli.app import a1111_api as api
from sdcli.app.serve_http import HEARTBEAT_S, PROTOCOL, JSONResponse, State, error_response
from sdcli.app.serve_device import Init, RenderSpec, check_sampler, log, lora_specs, named, scratch_file
from sdcli.runtime.errors import BadInputError, SdcliError, UsageError

PER_RUN = ("model", "vae", "dtype", "device", "prediction")  # what the client may ask of the loaded model
SERVERS_OWN = ("lora_dir", "embeddings_dir", "vae_dir", "ray", "offload", "threads", "output")  # the server's folders and ways


async def render(state: State, request):
    """One job of a `generate --server` / `img2img --server` run, answered as an NDJSON stream of events:
    queued, wait (heartbeats), step, image (the PNG file's bytes), then end or error."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import StreamingResponse

    try:
        spec = await run_in_threadpool(spec_from_client, state, api.parse_body(await request.body()))
    except (api.Invalid, SdcliError) as e:
        code = getattr(e, "exit_code", UsageError.exit_code)
        return JSONResponse({"error": str(e), "exit_code": code}, status_code=422)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    ticket = state.submit(lambda t: state.service.render(t, spec), "sdcli",
                          listener=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    ticket.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(events.put_nowait, {"event": "_done"}))
    return StreamingResponse(_stream(state, ticket, events), media_type="application/x-ndjson")


async def _stream(state: State, ticket, events: asyncio.Queue):
    try:
        yield _line({"event": "queued", "ahead": state.device.ahead_of(ticket), "sdcli_version": __version__})
        while True:
            try:
                event = await asyncio.wait_for(events.get(), HEARTBEAT_S)
            except asyncio.TimeoutError:
                yield _line({"event": "wait", "ahead": state.device.ahead_of(ticket)})
                continue
            if event["event"] == "_done":
                break
            if event["event"] == "image":
                r = event["rendered"]
                event = {"event": "image", "index": r.target.index, "png": api.b64(r.png), "timings": r.timings,
                         "fallbacks": r.fallbacks}
            yield _line(event)
        yield _line(_ending(ticket))
    finally:
        if not ticket.future.done():  # the client went away mid-job: the job ends at its next step
            ticket.cancelled.set()
            log("sdcli: the client went away; job cancelled")


def _ending(ticket) -> dict:
    error = ticket.future.exception()
    if error is None:
        return {"event": "end", "interrupted": ticket.future.result().interrupted}
    if not isinstance(error, SdcliError):
        error_response(error)  # logs the traceback
    return {"event": "error", "message": str(error) or type(error).__name__,
            "exit_code": getattr(error, "exit_code", 1)}


def _line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def spec_from_client(state: State, body: dict) -> RenderSpec:
    """A `--server` client's job: its resolved config (checked again here: the request is untrusted), its seeds,
    its LoRA names and init image. Files are the server's: the model by name among the served ones."""
    from sdcli.config import check_mapping
    from sdcli.jobs import single_job

    if body.get("protocol") != PROTOCOL:
        raise UsageError(f"this server speaks protocol {PROTOCOL} (sdcli {__version__}); the client sent "
                         f"{body.get('protocol')!r}: use the same sdcli version on both sides")
    config = body.get("config")
    if not isinstance(config, dict) or not isinstance(body.get("prompt"), str):
        raise BadInputError("request: 'config' (an object) and 'prompt' (text) are required")
    model, vae = _client_model(state, {k: config.pop(k, None) for k in PER_RUN})
    for key in SERVERS_OWN:
        config.pop(key, None)
    if config.pop("refiner", None) or config.pop("controlnets", None):
        raise UsageError("--refiner and ControlNet units are not available with --server yet")
    cfg = dataclasses.replace(state.base, **check_mapping(config, "request"))
    job = dataclasses.replace(single_job(body["prompt"], cfg), source=str(body.get("source", "request")))
    check_sampler(job)
    targets = _client_targets(body.get("targets"))
    try:
        flags = [(str(name), float(w)) for name, w in _pairs(body.get("loras") or [])]
    except (TypeError, ValueError):
        raise BadInputError("request: a LoRA weight must be a number") from None
    init = _client_init(state, body) if body.get("image") else None
    return RenderSpec(job, [t[1] for t in targets], [t[2] for t in targets], [t[0] for t in targets],
                      lora_specs(state.folders, flags, job), init, model, vae)


def _client_model(state: State, asked: dict) -> tuple:
    """The client's model, VAE, dtype, device and prediction against what this server runs: files by name among
    the served ones; a dtype or device it does not run is refused (the bytes would differ)."""
    model = state.folders.find_model(_served_name(state, asked["model"]), state.service.titles()) if asked["model"] else None
    vae = None  # no --vae on the client: the checkpoint's own, as its local run would use
    if asked["vae"]:
        name = Path(asked["vae"]).name
        vae = state.base.vae if state.base.vae and Path(state.base.vae).name == name else state.folders.find_vae(name)
    placement = state.service.placement
    runs = {"dtype": placement.dtype_name, "device": placement.device, "prediction": state.base.prediction}
    for key in ("dtype", "device", "prediction"):
        value = asked[key] or "auto"
        if value != "auto" and not str(runs[key]).startswith(value):
            raise UsageError(f"--{key} {value}: the server runs {runs[key]}; drop the option, or start the "
                             f"server with --{key} {value}")
    return model, vae


def _served_name(state: State, asked: str) -> str:
    """The client's -m as a name among the served models: a name this server gave it (/options'
    `sd_model_checkpoint`, maybe in a subfolder of --models-dir) as it is, else the file name of its path."""
    return asked if asked in state.folders.models() else Path(asked).name


def _client_targets(value) -> list[tuple[int, int, int | None]]:
    """(index, seed, variation seed or None) of each image the client planned (render.plan_outputs' numbering)."""
    from sdcli.config import SEED_MAX

    if not isinstance(value, list) or not value:
        raise BadInputError("request: 'targets' must be a list of {index, seed, subseed}")

    def whole(v, optional=False) -> bool:
        return (optional and v is None) or isinstance(v, int) and not isinstance(v, bool)

    out = []
    for t in value:
        if not isinstance(t, dict) or not (whole(t.get("index")) and whole(t.get("seed"))
                                           and whole(t.get("subseed"), optional=True)):
            raise BadInputError("request: each target is {index, seed, subseed} (integers; subseed may be null)")
        if not all(-1 <= s <= SEED_MAX + 100000 for s in (t["seed"], t.get("subseed") or 0)):
            raise BadInputError(f"request: seed {t['seed']} / {t.get('subseed')} out of range")
        out.append((t["index"], t["seed"], t.get("subseed")))
    return out


def _pairs(value) -> list:
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
        raise BadInputError("request: 'loras' must be a list of [file name, weight]")
    return value


def _client_init(state: State, body: dict) -> Init:
    """The client's image as it loaded it (PNG: the same pixels), its notes, the binarised mask and its name."""
    from sdcli.formats import images

    errors: list[dict] = []
    data = api._image_bytes("image", body["image"], errors)
    mask = api._image_bytes("mask", body["mask"], errors) if body.get("mask") else None
    if errors:
        raise api.Invalid(errors)
    with scratch_file(state.scratch, "init.png", data) as path:
        img, _ = named(lambda: images.load_image(path), path, "image")
    notes = [str(n) for n in body.get("notes") or []]
    if mask is None:
        return Init(img, notes)
    name = Path(str(body.get("mask_name") or "mask.png")).name
    with scratch_file(state.scratch, name, mask) as path:
        mask, _ = named(lambda: images.load_mask_image(path, img.size), path, "mask")
    return Init(img, notes, mask, name)
