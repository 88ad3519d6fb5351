"""The server's routes: A1111's `/sdapi/v1/...`, OpenAI's `/v1/images/generations` and sdcli's `/sdcli/v1/render`
(the NDJSON stream `generate --server` reads). Each handler parses (a1111_api), builds a RenderSpec (the job, its
seeds, its LoRAs and init image, files looked up in the server's folders only), hands it to the render thread
and answers with the response shape its API has."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

from sdcli import __version__
from sdcli.app import a1111_api as api
from sdcli.app import serve_remote
from sdcli.app.serve_http import PROTOCOL, JSONResponse, State, error_response, wait_for
from sdcli.app.serve_device import Init, RenderSpec, check_sampler, log, lora_specs, named, scratch_file
from sdcli.runtime.errors import BadInputError, SdcliError, UsageError

def _const(value):
    return lambda _state, _request, _body: value


def table(state: State) -> dict:
    """(method, path) -> endpoint: answers (a JSON value from `fn(state, request, body)`) and jobs (async
    handlers that wait for the render thread), each wrapped so that any error becomes a JSON answer."""
    answers = {
        ("GET", "/sdapi/v1/sd-models"): _sd_models, ("GET", "/sdapi/v1/loras"): _loras,
        ("GET", "/sdapi/v1/sd-vae"): _vaes, ("GET", "/sdapi/v1/embeddings"): _embeddings,
        ("GET", "/sdapi/v1/samplers"): lambda *_: api.samplers(),
        ("GET", "/sdapi/v1/schedulers"): lambda *_: api.schedulers(),
        ("GET", "/sdapi/v1/upscalers"): lambda *_: api.upscalers(),
        ("GET", "/sdapi/v1/latent-upscale-modes"): _const([{"name": "Latent"}]),
        ("GET", "/sdapi/v1/options"): _options, ("GET", "/sdapi/v1/memory"): _memory,
        ("GET", "/sdapi/v1/progress"): _progress, ("POST", "/sdapi/v1/png-info"): _png_info,
        ("POST", "/sdapi/v1/interrupt"): _interrupt, ("POST", "/sdapi/v1/skip"): _skip,
        # what sdcli has none of, answered as an A1111 without them answers
        ("GET", "/sdapi/v1/prompt-styles"): _const([]), ("GET", "/sdapi/v1/face-restorers"): _const([]),
        ("GET", "/sdapi/v1/scripts"): _const({"txt2img": [], "img2img": []}),
        ("GET", "/sdapi/v1/script-info"): _const([]), ("GET", "/sdapi/v1/extensions"): _const([]),
        # the folders are read on every listing: nothing to refresh
        ("POST", "/sdapi/v1/refresh-checkpoints"): _const(None), ("POST", "/sdapi/v1/refresh-loras"): _const(None),
        ("POST", "/sdapi/v1/refresh-vae"): _const(None),
        ("GET", "/sdcli/v1/info"): _info,
    }
    jobs = {("POST", "/sdapi/v1/txt2img"): _txt2img, ("POST", "/sdapi/v1/img2img"): _img2img,
            ("POST", "/sdapi/v1/options"): _set_options, ("POST", "/v1/images/generations"): _openai,
            ("POST", "/sdcli/v1/render"): serve_remote.render}
    out = {key: _answer(state, fn) for key, fn in answers.items()}
    out.update({key: functools.partial(_guarded, state, fn) for key, fn in jobs.items()})
    return out


def _answer(state: State, fn):
    """A handler `fn(state, request, body) -> JSON value` as an endpoint; it runs on a worker thread, so a slow
    listing (a large models folder) never holds the event loop."""
    from starlette.concurrency import run_in_threadpool

    async def endpoint(request):
        try:
            body = await request.body() if request.method == "POST" else b""
            value = await run_in_threadpool(fn, state, request, body)
        except Exception as e:  # noqa: BLE001 - answered as JSON, never a traceback
            return error_response(e)
        return JSONResponse(value)

    return endpoint


async def _guarded(state: State, fn, request):
    try:
        return await fn(state, request)
    except Exception as e:  # noqa: BLE001
        return error_response(e)


# --- listings ------------------------------------------------------------------------------------------------

def _sd_models(state: State, _request, _body) -> list[dict]:
    titles, hashes = state.service.titles(), state.service.hashes
    return [{"title": titles[name], "model_name": str(Path(name).with_suffix("")),
             "hash": hashes[name][:10] if name in hashes else None, "sha256": hashes.get(name), "filename": path,
             "config": None} for name, path in state.folders.models().items()]


def _loras(state: State, _request, _body) -> list[dict]:
    return [{"name": Path(name).stem, "alias": Path(name).stem, "path": path, "metadata": {}}
            for name, path in state.folders.loras().items()]


def _vaes(state: State, _request, _body) -> list[dict]:
    return [{"model_name": name, "filename": path} for name, path in state.folders.vaes().items()]


def _options(state: State, _request, _body) -> dict:
    service = state.service
    model, vae = service.current
    name = service.name_of(model)
    return {"sd_model_checkpoint": service.titles().get(name, name), "sd_checkpoint_hash": service.hashes.get(name),
            "sd_vae": Path(vae).name if vae else "Automatic",
            "CLIP_stop_at_last_layers": state.options.get("clip_skip", state.base.clip_skip),
            "samples_format": "png", "eta_noise_seed_delta": state.options.get("ensd", state.base.ensd),
            "randn_source": state.options.get("rng", state.base.rng).upper(),
            "sd_model_name": Path(name).stem, "sdcli_version": __version__}


def _info(state: State, _request, _body) -> dict:
    placement = state.service.placement
    return {"sdcli_version": __version__, "protocol": PROTOCOL, "model": Path(state.service.current[0]).name,
            "device": getattr(placement, "device", None), "dtype": getattr(placement, "dtype_name", None)}


def _memory(_state: State, _request, _body) -> dict:
    """A1111's /memory: this process's RAM and, on CUDA, the device's (torch's allocator counters)."""
    ram = {"error": "unavailable"}
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        ram = {"free": total - rss, "used": rss, "total": total}
    except (OSError, KeyError, ValueError) as e:
        ram = {"error": str(e)}
    return {"ram": ram, "cuda": _cuda_memory()}


def _cuda_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()

    def pair(name):
        return {"current": s.get(f"{name}.all.current", 0), "peak": s.get(f"{name}.all.peak", 0)}

    return {"system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}}


def _embeddings(state: State, _request, _body) -> dict:
    """Every embedding of the server's folder, split as A1111 does: loaded (fits the model) and skipped."""
    from sdcli.text.embeddings import Skipped, fit, read_embedding

    library = state.service.models.embeddings if state.service.models is not None else None
    loaded, skipped = {}, {}
    if library is not None:
        for name, path in library.folder.paths.items():
            try:
                emb = fit(read_embedding(path), library.widths)
            except SdcliError as e:
                log(f"embedding {path}: {e}")
                continue
            row = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                   "shape": int(next(iter(getattr(emb, "vectors", {}).values())).shape[-1]) if not isinstance(
                       emb, Skipped) else 0, "vectors": getattr(emb, "n_vectors", 0)}
            (skipped if isinstance(emb, Skipped) else loaded)[name] = row
    return {"loaded": loaded, "skipped": skipped}


# --- progress, interrupt, skip -------------------------------------------------------------------------------

def _progress(state: State, request, _body) -> dict:
    ticket = state.device.current
    if ticket is None or ticket.name in ("load", "options"):
        return api.progress(api.idle_state(), None, None)
    skip_image = request.query_params.get("skip_current_image", "false").lower() in ("true", "1")
    image = None
    if not skip_image:
        ticket.preview_wanted = time.time() + 2.0  # the sampler keeps a copy of its estimate while polled
        image = _preview(ticket)
    state_dict = ticket.state()
    state_dict["queued"] = len(state.device.waiting)
    return api.progress(state_dict, ticket.started, image)


def _preview(ticket) -> str | None:
    """The newest estimate as A1111's "Approx cheap" live preview: a base64 PNG (None before the first step)."""
    latest, latent = ticket.latest, ticket.latent
    if latest is None or latent is None:
        return None
    import io

    from PIL import Image

    from sdcli.formats.images import tensor_to_pil
    from sdcli.output.preview import cheap_rgb

    _, _, h, w = latest.shape
    img = tensor_to_pil(cheap_rgb(latest, latent.rgb_factors)[0]).resize((w * latent.downscale, h * latent.downscale),
                                                                          Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return api.b64(buf.getvalue())


def _interrupt(state: State, _request, _body) -> dict:
    state.device.interrupt()
    return {}


def _skip(state: State, _request, _body) -> None:
    state.device.skip()


# --- png-info ------------------------------------------------------------------------------------------------

def _png_info(state: State, _request, body: bytes) -> dict:
    """A1111's /png-info: the infotext, the other text chunks, and the infotext parsed with A1111's labels."""
    from sdcli.output.metadata import PARAMETERS_KEY, read_image_metadata

    ask = api.parse_body(body)
    errors: list[dict] = []
    data = api._image_bytes("image", ask.get("image"), errors)
    if errors:
        raise api.Invalid(errors)
    with scratch_file(state.scratch, "image.png", data) as path:
        try:
            meta = read_image_metadata(path)
        except SdcliError as e:
            raise BadInputError(str(e).replace(str(path), "image")) from None
    infotext = meta["raw"].get(PARAMETERS_KEY, "")
    items = {k: v for k, v in meta["raw"].items() if k != PARAMETERS_KEY}
    return {"info": infotext, "items": items, "parameters": api.infotext_parameters(infotext)}


# --- rendering: A1111 ----------------------------------------------------------------------------------------

async def _txt2img(state: State, request):
    return await _a1111_job(state, request, api.txt2img_request, "txt2img")


async def _img2img(state: State, request):
    return await _a1111_job(state, request, api.img2img_request, "img2img")


async def _a1111_job(state: State, request, parse, name: str):
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    ask = parse(api.parse_body(await request.body()))
    spec = await run_in_threadpool(spec_for, state, ask)
    ticket = state.submit(lambda t: state.service.render(t, spec), name)
    result = await wait_for(request, ticket)
    if result is None:
        return Response(status_code=499)  # nobody is listening any more
    for warning in ask.warnings:
        log(f"{name}: {warning}")
    return JSONResponse(a1111_response(ask, spec, result))


def a1111_response(ask: api.Ask, spec: RenderSpec, result) -> dict:
    done = result.images
    cfg = spec.job.cfg
    if done and not (cfg.width and cfg.height):  # the family's native size: A1111 reports the first pass's
        height, width = (round(side / cfg.hires_scale) for side in done[0].size)
        cfg = dataclasses.replace(cfg, width=width, height=height)
    extra = {"warnings": ask.warnings, "interrupted": result.interrupted, "job_started": result.started,
             "job_finished": result.finished, "inpainting": spec.init is not None and spec.init.mask is not None,
             "denoising_strength": cfg.strength if spec.init is not None else
             (cfg.hires_strength if cfg.hires_scale != 1.0 else None)}
    info = api.info(cfg, spec.job.prompt, [(r.target.seed, r.target.image_subseed) for r in done],
                    [r.picture.infotext for r in done], result.model, extra)
    images = [api.b64(r.png) for r in done] if ask.send_images else []
    return {"images": images, "parameters": api.parameters(ask.given, spec.job.cfg.to_dict() | ask.flags),
            "info": info}


def spec_for(state: State, ask: api.Ask) -> RenderSpec:
    """An A1111 request as one job on the server's configuration: seeds drawn, files found in its folders."""
    from sdcli.app.render import image_seeds
    from sdcli.jobs import single_job

    cfg = dataclasses.replace(state.base, **{**state.options, **ask.flags})
    if ask.hires_size is not None:
        cfg = dataclasses.replace(cfg, hires_scale=_hires_scale(cfg, *ask.hires_size))
    init = _decode_init(state, ask) if ask.images else None
    if init is not None:  # A1111's img2img has no hires fix: enable_hr (or the server's config) is not for it
        cfg = dataclasses.replace(cfg, width=init.image.width, height=init.image.height, hires_scale=1.0)
    job = single_job(ask.prompt, cfg)
    check_sampler(job)
    seeds, subseeds = image_seeds(job.cfg)  # A1111's numbering: seed+k, or with a variation subseed+k
    return RenderSpec(job, seeds, subseeds, list(range(ask.count)), lora_specs(state.folders, [], job), init,
                      *_model_choice(state, ask.options))


def _hires_scale(cfg, x: int, y: int) -> float:
    """hr_resize_x / hr_resize_y as sdcli's one hires scale (the aspect ratio is kept, as the Latent pass does)."""
    if not cfg.width or not cfg.height:
        raise UsageError("hr_resize_x / hr_resize_y need width and height in the request")
    scales = {round(v / size, 6) for v, size in ((x, cfg.width), (y, cfg.height)) if v}
    if len(scales) != 1:
        raise UsageError("hr_resize_x / hr_resize_y must keep the aspect ratio of width x height in sdcli")
    from sdcli.config import check_value

    return check_value("hires_scale", scales.pop(), "request", UsageError)


def _model_choice(state: State, options: dict) -> tuple:
    model = options.get("sd_model_checkpoint")
    vae = options.get("sd_vae")
    return (state.folders.find_model(model, state.service.titles()) if model else None,
            state.folders.find_vae(vae) if vae is not None else "current")


def _decode_init(state: State, ask: api.Ask) -> Init:
    """init_images[0] (resized to width x height when both are given and differ: A1111's "just resize") and the
    mask as a grayscale image (an RGBA mask with transparency is its alpha channel, as A1111 reads it)."""
    from PIL import Image

    from sdcli.formats import images

    with scratch_file(state.scratch, "init.png", ask.images[0]) as path:
        img, notes = named(lambda: images.load_image(path), path, "init_images[0]")
    width, height = ask.flags.get("width"), ask.flags.get("height")
    if width and height and (width, height) != img.size:
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    if ask.mask is None:
        return Init(img, notes)
    with scratch_file(state.scratch, "mask.png", _mask_png(ask.mask)) as path:
        mask, _ = named(lambda: images.load_mask_image(path, img.size), path, "mask")
    return Init(img, notes, mask, "mask.png")


def _mask_png(data: bytes) -> bytes:
    """The mask as load_mask_image should read it: an RGBA mask with transparency is its alpha channel (A1111's
    create_binary_mask: alpha > 128 is white); any other as it is."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > Image.MAX_IMAGE_PIXELS:
                raise BadInputError(f"mask: {img.width}x{img.height} pixels is over the pixel limit")
            if img.mode != "RGBA" or img.getchannel("A").getextrema() == (255, 255):
                return data
            mask = img.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadInputError(f"mask: cannot decode image ({e})") from None
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    return buf.getvalue()


# --- rendering: OpenAI ---------------------------------------------------------------------------------------

async def _openai(state: State, request):
    """OpenAI's images API as stable-diffusion.cpp's server offers it: prompt, n, size, response_format b64_json."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    try:
        ask = api.openai_request(api.parse_body(await request.body()))
    except api.Invalid as e:
        return JSONResponse(api.openai_error(e), status_code=422)
    spec = await run_in_threadpool(spec_for, state, ask)
    result = await wait_for(request, state.submit(lambda t: state.service.render(t, spec), "openai"))
    if result is None:
        return Response(status_code=499)
    return JSONResponse({"created": int(time.time()), "output_format": "png",
                         "data": [{"b64_json": api.b64(r.png), "revised_prompt": spec.job.prompt}
                                  for r in result.images]})


# --- options -------------------------------------------------------------------------------------------------

async def _set_options(state: State, request):
    """POST /sdapi/v1/options: clip skip for later requests; a checkpoint or VAE switch, loaded in turn."""
    ask = api.options_request(api.parse_body(await request.body()))
    model, vae = _model_choice(state, ask.options)
    state.options.update(ask.flags)
    for warning in ask.warnings:
        log(f"options: {warning}")
    if model is not None or vae != "current":
        await wait_for(request, state.submit(lambda t: state.service.switch(model, vae), "options"))
    return JSONResponse(None)
