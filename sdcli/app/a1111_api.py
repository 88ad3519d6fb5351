"""AUTOMATIC1111's web API (`/sdapi/v1/...`) as data: its request fields mapped onto sdcli's config keys, the
fields sdcli cannot honour, and the response shapes. No web framework here: `app/serve.py` feeds these functions
the JSON a client sent and sends back what they return, so every mapping can be tested without a server.

A1111's request models are pydantic models generated from `StableDiffusionProcessingTxt2Img` /
`StableDiffusionProcessingImg2Img` (modules/api/models.py, modules/processing.py); its responses are
`{"images": [base64 PNG], "parameters": the request, "info": Processed.js()}`. Clients send A1111's defaults for
most fields, so a field is refused only when its value asks for something sdcli would silently not do.

Values are checked by `config.check_value`, the one typed check every flag, config file and prompts-file line goes
through: an out-of-range `steps` is a 422 naming `steps`, never a 500. Fields a request leaves out take the
server's configuration (sdcli's defaults < user config < `serve --config`), not A1111's (steps 50, 512x512).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from sdcli import __version__
from sdcli.config import check_value
from sdcli.runtime.errors import BadInputError

# A1111 field -> sdcli config key: the value goes through config.check_value as a prompts-file value does.
SETTINGS = {
    "negative_prompt": "negative", "seed": "seed", "steps": "steps", "cfg_scale": "cfg", "width": "width",
    "height": "height", "batch_size": "batch_size", "tiling": "seamless", "hr_scale": "hires_scale",
    "hr_second_pass_steps": "hires_steps", "token_merging_ratio": "tome_ratio",
    "token_merging_ratio_hr": "tome_ratio_hr", "subseed": "subseed", "subseed_strength": "subseed_strength",
    "eta": "eta", "s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax", "s_noise": "s_noise",
}
# img2img's inpaint fields are read only with a mask, as A1111 uses them (_inpaint: sdcli's app/inpaint.py keys)
INPAINT_FILLS = {0: "fill", 1: "original", 2: "latent-noise", 3: "latent-nothing"}  # A1111's inpainting_fill
# A1111 options (override_settings, POST /sdapi/v1/options) -> sdcli config key
OPTION_SETTINGS = {"CLIP_stop_at_last_layers": "clip_skip", "eta_noise_seed_delta": "ensd", "randn_source": "rng"}
# Options a request may name to pick files: resolved by name inside the server's folders only (app/serve.py).
FILE_OPTIONS = ("sd_model_checkpoint", "sd_vae")

# Fields that change nothing in sdcli's render (A1111 clients send their defaults): accepted and dropped.
INERT = {
    "send_images", "do_not_save_samples", "do_not_save_grid", "force_task_id", "comments", "sampler_index",
    "override_settings_restore_afterwards", "firstphase_width", "firstphase_height", "seed_enable_extras",
    "ddim_discretize", "include_init_images", "disable_extra_networks", "mask_round", "refiner_switch_at",
    "infotext", "outpath_samples", "outpath_grids",
}
# Fields read by name below (prompt, sampler, hires, img2img inputs, options, scripts).
MAPPED = {
    "prompt", "sampler_name", "scheduler", "n_iter", "denoising_strength", "enable_hr", "hr_upscaler",
    "hr_resize_x", "hr_resize_y", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
    "override_settings", "styles", "alwayson_scripts", "init_images", "mask", "resize_mode",
    "inpainting_mask_invert", "mask_blur", "mask_blur_x", "mask_blur_y", "inpainting_fill", "inpaint_full_res",
    "inpaint_full_res_padding", "seed_resize_from_w", "seed_resize_from_h",
}

# Fields sdcli cannot do: refused (422) unless they hold one of A1111's "off" values, with the reason.
UNSUPPORTED = {
    "s_min_uncond": ((None, 0, 0.0), "negative guidance minimum sigma (NGMS) is not available in sdcli"),
    "script_name": ((None, "", "None"), "scripts are A1111 extensions; sdcli has none"),
    "script_args": ((None, []), "scripts are A1111 extensions; sdcli has none"),
    "image_cfg_scale": ((None,), "instruct-pix2pix models are not supported"),
    "initial_noise_multiplier": ((None, 1, 1.0), "sdcli adds the noise the schedule asks for"),
    "latent_mask": ((None, ""), "a separate latent mask is not supported; send `mask`"),
    "refiner_checkpoint": ((None, "", "None"), "the SDXL refiner is not available through the server yet"),
    "hr_checkpoint_name": ((None, "", "Use same checkpoint"), "the hires pass runs on the same checkpoint"),
}
# Fields accepted but not applied when not at these values: said in the response's info["warnings"].
APPROXIMATED = {
    "restore_faces": ((None, False), "face restoration is not available; the image is returned as sampled"),
    "save_images": ((None, False), "the server never saves images: they are in the response"),
}
LATENT_UPSCALERS = ("Latent", "Latent (bilinear)", "None", "", None)  # sdcli's hires pass: the latent, bilinear
RESIZE_JUST = 0  # A1111 resize_mode "Just resize"


class Invalid(Exception):
    """The request does not validate: FastAPI's 422 body (A1111 answers bad requests through FastAPI)."""

    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors))
        self.errors = errors

    def body(self) -> dict:
        return {"detail": self.errors}


def error(field_name: str, message: str, value: Any = None, kind: str = "value_error") -> dict:
    """One entry of FastAPI's validation error list (pydantic v2's shape)."""
    loc = [int(part) if part.isdigit() else part for part in field_name.split(".")]
    return {"type": kind, "loc": ["body", *loc], "msg": message, "input": _short(value)}


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "..."
    return value if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__


@dataclass
class Ask:
    """A txt2img/img2img request in sdcli's terms, before any file is looked at."""

    prompt: str
    flags: dict  # config key -> checked value
    count: int  # images: batch_size * n_iter
    options: dict = field(default_factory=dict)  # sd_model_checkpoint / sd_vae names asked for (override_settings)
    warnings: list[str] = field(default_factory=list)
    send_images: bool = True
    images: list[bytes] = field(default_factory=list)  # img2img: the decoded init_images
    mask: bytes | None = None
    hires_size: tuple[int, int] | None = None  # (hr_resize_x, hr_resize_y), checked against the scale later
    given: dict = field(default_factory=dict)  # the request as sent, for `parameters`


# --- requests ------------------------------------------------------------------------------------------------

def parse_body(raw: bytes) -> dict:
    """The request's JSON object; Invalid (FastAPI's json_invalid / model_attributes_type shapes) otherwise."""
    try:
        value = json.loads(raw.decode("utf-8")) if raw else None
    except UnicodeDecodeError as e:
        raise Invalid([error("body", f"JSON decode error: not UTF-8 at byte {e.start}", kind="json_invalid")]) from None
    except json.JSONDecodeError as e:
        raise Invalid([{"type": "json_invalid", "loc": ["body", e.pos], "msg": f"JSON decode error: {e.msg}",
                        "input": {}}]) from None
    except (RecursionError, ValueError) as e:  # nesting past the recursion limit, an integer past the digit limit
        raise Invalid([error("body", f"JSON decode error: {str(e).split(';')[0]}", kind="json_invalid")]) from None
    if not isinstance(value, dict):
        raise Invalid([{"type": "model_attributes_type", "loc": ["body"], "input": _short(value),
                        "msg": "Input should be a valid dictionary or object to extract fields from"}])
    return value


def txt2img_request(body: dict) -> Ask:
    """POST /sdapi/v1/txt2img's body -> an Ask; Invalid listing every bad field."""
    errors: list[dict] = []
    ask = _common(body, errors)
    _hires(body, ask, errors)
    if errors:
        raise Invalid(errors)
    return ask


def img2img_request(body: dict) -> Ask:
    """POST /sdapi/v1/img2img's body -> an Ask with the decoded init image and mask; Invalid otherwise."""
    errors: list[dict] = []
    ask = _common(body, errors)
    strength = _setting(body, "denoising_strength", "strength", errors)
    if strength is not None:
        ask.flags["strength"] = strength
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        errors.append(error("init_images", "img2img needs init_images: a list of base64 images", images))
    else:
        ask.images = [_image_bytes(f"init_images.{k}", v, errors) for k, v in enumerate(images)]
        if len(images) > 1:
            ask.warnings.append(f"init_images: {len(images)} given; sdcli uses the first for every image")
    if body.get("mask") not in (None, ""):
        ask.mask = _image_bytes("mask", body["mask"], errors)
        ask.flags.update(_inpaint(body, errors))
    mode = _int(body, "resize_mode", errors, RESIZE_JUST)
    if mode not in (RESIZE_JUST, None):
        errors.append(error("resize_mode", "only 0 (just resize) is available in sdcli", mode))
    if errors:
        raise Invalid(errors)
    return ask


def _inpaint(body: dict, errors: list[dict]) -> dict:
    """A1111's inpaint fields -> sdcli's inpaint keys: mask_blur (else mask_blur_x / _y, which must agree),
    inpainting_fill, inpaint_full_res ("Only masked") and its padding, inpainting_mask_invert."""
    out = {}
    blur = body.get("mask_blur")
    if blur is None and (body.get("mask_blur_x") is not None or body.get("mask_blur_y") is not None):
        blur_x, blur_y = body.get("mask_blur_x", 4), body.get("mask_blur_y", 4)
        if blur_x != blur_y:
            errors.append(error("mask_blur_x", "sdcli blurs the mask alike in x and y; give mask_blur", blur_x))
        blur = blur_x
    for name, key, value in (("mask_blur", "mask_blur", blur),
                             ("inpaint_full_res_padding", "inpaint_padding", body.get("inpaint_full_res_padding"))):
        if value is not None:
            try:
                out[key] = check_value(key, value, "request")
            except BadInputError as e:
                errors.append(error(name, str(e).replace(f"request: '{key}'", name), value))
    fill = body.get("inpainting_fill")
    if fill is not None:
        if fill not in INPAINT_FILLS or isinstance(fill, bool):
            errors.append(error("inpainting_fill", "inpainting_fill must be 0 (fill), 1 (original), 2 (latent "
                                                   "noise) or 3 (latent nothing)", fill))
        else:
            out["inpaint_fill"] = INPAINT_FILLS[fill]
    if body.get("inpaint_full_res") is not None:
        out["inpaint_area"] = "masked" if body["inpaint_full_res"] else "whole"
    invert = _int(body, "inpainting_mask_invert", errors, 0)
    if invert not in (0, 1, None):
        errors.append(error("inpainting_mask_invert", "inpainting_mask_invert must be 0 or 1", invert))
    elif invert is not None:
        out["mask_invert"] = bool(invert)
    return out


def _common(body: dict, errors: list[dict]) -> Ask:
    """What txt2img and img2img share: prompt, settings, sampler, count, options and the fields refused."""
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        errors.append(error("prompt", "Input should be a valid string", prompt, "string_type"))
        prompt = ""
    ask = Ask(prompt, {}, 1, given=dict(body))
    for name, key in SETTINGS.items():
        value = _setting(body, name, key, errors)
        if value is not None:
            ask.flags[key] = value
    ask.flags.update(_sampler(body, errors))
    ask.flags.update(_seed_resize(body, errors))
    batch = ask.flags.get("batch_size", 1)
    n_iter = _int(body, "n_iter", errors, 1)
    if n_iter is not None and not 1 <= n_iter <= 1000:
        errors.append(error("n_iter", "n_iter must be between 1 and 1000", n_iter))
    ask.count = batch * (n_iter or 1)
    ask.flags["n"] = ask.count
    ask.send_images = body.get("send_images", True) is not False
    _options(body.get("override_settings"), ask, errors, "override_settings")
    _refused(body, errors)
    _approximated(body, ask)
    _styles_and_scripts(body, ask, errors)
    known = INERT | MAPPED | SETTINGS.keys() | UNSUPPORTED.keys() | APPROXIMATED.keys()
    ask.warnings += [f"{name}: not an A1111 field; ignored" for name in body if name not in known]
    return ask


def _setting(body: dict, name: str, key: str, errors: list[dict]) -> Any:
    """The checked value of field `name` (config key `key`), or None when absent (or A1111's null)."""
    value = body.get(name)
    if value is None:
        return None
    if name in ("seed", "subseed") and isinstance(value, (int, float)) and value < -1:  # A1111 draws for any negative
        value = -1
    try:
        return check_value(key, value, "request")
    except BadInputError as e:
        errors.append(error(name, str(e).replace(f"request: '{key}'", name), value))
        return None


def _seed_resize(body: dict, errors: list[dict]) -> dict:
    """seed_resize_from_w / _h (A1111's "Resize seed from"; 0 or -1: off) -> seed_resize_from "WxH"."""
    w, h = _int(body, "seed_resize_from_w", errors, -1), _int(body, "seed_resize_from_h", errors, -1)
    if w is None or h is None or (w <= 0 and h <= 0):
        return {}
    if w <= 0 or h <= 0:
        errors.append(error("seed_resize_from_w", "give both seed_resize_from_w and seed_resize_from_h", w))
        return {}
    try:
        return {"seed_resize_from": check_value("seed_resize_from", f"{w}x{h}", "request")}
    except BadInputError as e:
        errors.append(error("seed_resize_from_w", str(e).replace("request: 'seed_resize_from'", "seed resize"), w))
        return {}


def _int(body: dict, name: str, errors: list[dict], default: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):  # fmt: skip
        errors.append(error(name, "Input should be a valid integer", value, "int_type"))
        return None
    return int(value)


def _sampler(body: dict, errors: list[dict]) -> dict:
    """sampler_name (else sampler_index, A1111's older field) and scheduler -> sampler / schedule flags."""
    from sdcli.output.metadata import canonical_schedule
    from sdcli.sampling.samplers import resolve_sampler
    from sdcli.sampling.schedule import SCHEDULES
    from sdcli.runtime.errors import UsageError

    out = {}
    name = body.get("sampler_name") or body.get("sampler_index")
    which = "sampler_name" if body.get("sampler_name") else "sampler_index"
    if name is not None:
        if not isinstance(name, str) or name.strip().lower() == "help":
            errors.append(error(which, "Sampler not found", name))
        else:
            try:
                resolve_sampler(name)
                out["sampler"] = name
            except UsageError as e:
                errors.append(error(which, f"Sampler not found: {e}", name))
    scheduler = body.get("scheduler")
    if scheduler is not None:
        schedule = canonical_schedule(scheduler) if isinstance(scheduler, str) else scheduler
        if schedule is None:
            out["schedule"] = "auto"
        elif schedule in SCHEDULES:
            out["schedule"] = schedule
        else:
            errors.append(error("scheduler", f"Scheduler not found (known: {', '.join(SCHEDULES)})", scheduler))
    return out


def _options(options: Any, ask: Ask, errors: list[dict], where: str) -> None:
    """override_settings: the options sdcli maps (clip skip, model, VAE); others noted and ignored."""
    if options is None:
        return
    if not isinstance(options, dict):
        errors.append(error(where, "Input should be a valid dictionary", options, "dict_type"))
        return
    for name, value in options.items():
        if name in OPTION_SETTINGS:
            key = OPTION_SETTINGS[name]
            try:
                ask.flags[key] = check_value(key, value, "request")
            except BadInputError as e:
                errors.append(error(f"{where}.{name}", str(e).replace(f"request: '{key}'", name), value))
        elif name in FILE_OPTIONS:
            if not isinstance(value, str):
                errors.append(error(f"{where}.{name}", "Input should be a valid string", value, "string_type"))
            else:
                ask.options[name] = value
        elif name in UNSUPPORTED:
            allowed, reason = UNSUPPORTED[name]
            if value not in allowed:
                errors.append(error(f"{where}.{name}", reason, value))
        else:
            ask.warnings.append(f"{where}.{name}: not a setting sdcli has; ignored")


def _refused(body: dict, errors: list[dict]) -> None:
    for name, (allowed, reason) in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            errors.append(error(name, reason, body[name]))


def _approximated(body: dict, ask: Ask) -> None:
    for name, (defaults, note) in APPROXIMATED.items():
        if note and name in body and body[name] not in defaults:
            ask.warnings.append(f"{name}: {note}")


def _styles_and_scripts(body: dict, ask: Ask, errors: list[dict]) -> None:
    """styles are A1111's saved prompt snippets (the server has none: ignored with a warning); alwayson_scripts
    are extensions, refused by name (sdcli maps none of them yet)."""
    styles = body.get("styles")
    if styles:
        ask.warnings.append(f"styles {styles!r}: sdcli has no saved styles; ignored (put the text in the prompt)")
    scripts = body.get("alwayson_scripts")
    if scripts in (None, {}):
        return
    if not isinstance(scripts, dict):
        errors.append(error("alwayson_scripts", "Input should be a valid dictionary", scripts, "dict_type"))
        return
    for name in scripts:
        hint = " (ControlNet: use `sdcli generate --controlnet` for now)" if "controlnet" in str(name).lower() else ""
        errors.append(error(f"alwayson_scripts.{name}", f"always-on script {name!r} is not available in sdcli"
                                                        f"{hint}", scripts[name]))


def _hires(body: dict, ask: Ask, errors: list[dict]) -> None:
    """enable_hr and its hr_* fields -> hires_scale / hires_strength / hires_steps (the Latent upscaler)."""
    if not body.get("enable_hr"):
        ask.flags.pop("hires_scale", None)
        ask.flags.pop("hires_steps", None)
        return
    ask.flags.setdefault("hires_scale", 2.0)  # A1111's hr_scale default
    strength = _setting(body, "denoising_strength", "hires_strength", errors)
    if strength is not None:
        ask.flags["hires_strength"] = strength
    upscaler = body.get("hr_upscaler")
    if upscaler not in LATENT_UPSCALERS:
        errors.append(error("hr_upscaler", "sdcli's hires fix upscales the latent (A1111's 'Latent'); "
                                           f"{upscaler!r} is not available", upscaler))
    sizes = (_int(body, "hr_resize_x", errors, 0), _int(body, "hr_resize_y", errors, 0))
    if any(sizes):
        ask.hires_size = sizes
    for name, same in (("hr_sampler_name", ("sampler_name", "sampler_index")), ("hr_scheduler", ("scheduler",)),
                       ("hr_prompt", ("prompt",)), ("hr_negative_prompt", ("negative_prompt",))):
        value = body.get(name)
        if value not in (None, "", "Use same sampler", "Use same scheduler") \
                and all(value != body.get(s) for s in same):  # fmt: skip
            errors.append(error(name, "the hires pass uses the first pass's value in sdcli", value))


def _image_bytes(name: str, value: Any, errors: list[dict]) -> bytes:
    """A base64 image (a data: URL too, as A1111 takes); URLs are refused: the server fetches nothing."""
    if not isinstance(value, str):
        errors.append(error(name, "Input should be a valid string", value, "string_type"))
        return b""
    text = value.strip()
    if text.startswith(("http://", "https://")):
        errors.append(error(name, "image URLs are not fetched by sdcli's server; send the image as base64", value))
        return b""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        errors.append(error(name, "Invalid encoded image: not base64", value))
        return b""
    if not data:
        errors.append(error(name, "Invalid encoded image: empty", value))
    return data


# --- OpenAI's images API --------------------------------------------------------------------------------------

def openai_request(body: dict) -> Ask:
    """POST /v1/images/generations (as stable-diffusion.cpp's server takes it): prompt, n, size "WxH",
    response_format b64_json; A1111's setting names (seed, steps, cfg_scale, negative_prompt, sampler_name,
    scheduler) are taken too. `model`, `quality`, `style`, `user` name nothing here and are ignored."""
    errors: list[dict] = []
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        errors.append(error("prompt", "Field required: the prompt text", prompt, "missing"))
    if body.get("response_format", "b64_json") not in ("b64_json", None):
        errors.append(error("response_format", "this server returns images inline: use b64_json",
                            body.get("response_format")))
    if body.get("output_format", "png") not in ("png", None):
        errors.append(error("output_format", "this server writes PNG", body.get("output_format")))
    n = _int(body, "n", errors, 1)
    if n is not None and not 1 <= n <= 100:
        errors.append(error("n", "n must be between 1 and 100", n))
    a1111 = {k: v for k, v in body.items() if k in SETTINGS or k in ("sampler_name", "scheduler")}
    a1111.update(prompt=prompt if isinstance(prompt, str) else "", n_iter=n or 1, batch_size=1)
    size = body.get("size")
    if size not in (None, "auto"):
        w, sep, h = str(size).partition("x")
        if not (sep and w.isdigit() and h.isdigit()):
            errors.append(error("size", "size must be WIDTHxHEIGHT, e.g. 512x512", size))
        else:
            a1111.update(width=int(w), height=int(h))
    ask = _common(a1111, errors)
    if errors:
        raise Invalid(errors)
    ask.given = dict(body)
    return ask


def openai_error(e: Invalid) -> dict:
    """OpenAI's error body, with FastAPI's list beside it for A1111-minded clients."""
    first = e.errors[0]
    return {"error": {"message": str(e), "type": "invalid_request_error", "param": str(first["loc"][-1]),
                      "code": None}, "detail": e.errors}


# --- png-info ------------------------------------------------------------------------------------------------

_LABELS = {"steps": "Steps", "cfg_scale": "CFG scale", "seed": "Seed", "model_hash": "Model hash", "model": "Model",
           "vae_hash": "VAE hash", "vae": "VAE", "denoising_strength": "Denoising strength", "clip_skip": "Clip skip",
           "rng": "RNG", "version": "Version"}


def infotext_parameters(text: str) -> dict:
    """An infotext parsed as A1111's parse_generation_parameters returns it: label -> value, the prompt under
    "Prompt", the size as "Size-1" / "Size-2"."""
    from sdcli.output.metadata import parse_infotext
    from sdcli.sampling.schedule import SCHEDULE_LABELS

    if not text:
        return {}
    p = parse_infotext(text)
    out: dict[str, Any] = {"Prompt": p.get("prompt", ""), "Negative prompt": p.get("negative_prompt", "")}
    if "sampler" in p:
        out["Sampler"] = a1111_sampler(p["sampler"])
    if "schedule" in p:
        out["Schedule type"] = SCHEDULE_LABELS.get(p["schedule"], p["schedule"])
    out.update({label: p[key] for key, label in _LABELS.items() if key in p})
    if "width" in p:
        out["Size-1"], out["Size-2"] = p["width"], p["height"]
    out.update(p.get("extra", {}))
    return out


# --- options -------------------------------------------------------------------------------------------------

def options_request(body: dict) -> Ask:
    """POST /sdapi/v1/options: the options sdcli keeps (model, VAE, clip skip); others noted."""
    errors: list[dict] = []
    ask = Ask("", {}, 1, given=dict(body))
    _options(body, ask, errors, "options")
    if errors:
        raise Invalid(errors)
    return ask


# --- responses -----------------------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parameters(body: dict, flags: dict) -> dict:
    """`parameters`: the request as A1111 echoes it (init images and mask left out, as include_init_images=False
    does), with the seed asked for."""
    out = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    out.setdefault("prompt", "")
    for name, key in SETTINGS.items():
        out.setdefault(name, flags.get(key))
    return out


def info(job_cfg, prompt: str, seeds: list[tuple[int, int]], infotexts: list[str], model: dict, extra: dict) -> str:
    """`info`: A1111's Processed.js() (a JSON string) for the images made ((seed, variation seed) each); `extra`
    adds sdcli's fields."""
    from sdcli.app.save import sampler_schedule

    sampler, schedule = sampler_schedule(job_cfg)
    resize = job_cfg.seed_resize_from.lower().split("x") if job_cfg.seed_resize_from else (-1, -1)
    resize = [int(v) for v in resize]
    obj = {
        "prompt": prompt, "all_prompts": [prompt] * len(seeds), "negative_prompt": job_cfg.negative,
        "all_negative_prompts": [job_cfg.negative] * len(seeds), "seed": seeds[0][0] if seeds else job_cfg.seed,
        "all_seeds": [s for s, _ in seeds], "subseed": seeds[0][1] if seeds else job_cfg.subseed,
        "all_subseeds": [s for _, s in seeds], "subseed_strength": job_cfg.subseed_strength,
        "width": job_cfg.width, "height": job_cfg.height, "sampler_name": a1111_sampler(sampler),
        "scheduler": schedule, "cfg_scale": job_cfg.cfg, "steps": job_cfg.steps, "batch_size": job_cfg.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model.get("name"),
        "sd_model_hash": model.get("hash"), "sd_vae_name": model.get("vae_name"), "sd_vae_hash": model.get("vae_hash"),
        "seed_resize_from_w": resize[0], "seed_resize_from_h": resize[1],
        "denoising_strength": extra.pop("denoising_strength", None),
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": job_cfg.clip_skip,
        "is_using_inpainting_conditioning": extra.pop("inpainting", False), "version": f"sdcli {__version__}",
    }
    return json.dumps({**obj, **extra}, ensure_ascii=False)


def a1111_sampler(name: str) -> str:
    from sdcli.sampling.samplers import SAMPLERS

    spec = SAMPLERS.get(name)
    return spec.a1111 if spec is not None and spec.a1111 else name


def samplers() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's label as the name, sdcli's and the other tools' names as aliases."""
    from sdcli.sampling.samplers import SAMPLERS

    return [{"name": s.a1111 or s.name, "aliases": [s.name, *(a for a in s.aliases if a != s.a1111)],
             "options": {"scheduler": s.default_schedule}} for s in SAMPLERS.values()]


def schedulers() -> list[dict]:
    """GET /sdapi/v1/schedulers: A1111's "automatic" (the sampler's own) first, then sdcli's schedules."""
    from sdcli.sampling.schedule import SCHEDULE_ALIASES, SCHEDULE_LABELS, SCHEDULES

    rows = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
             "need_inner_model": False}]
    for name in SCHEDULES:
        aliases = [a for a, target in SCHEDULE_ALIASES.items() if target == name]
        rows.append({"name": name, "label": SCHEDULE_LABELS.get(name, name), "aliases": aliases or None,
                     "default_rho": 7.0 if name == "karras" else -1, "need_inner_model": False})
    return rows


def upscalers() -> list[dict]:
    """GET /sdapi/v1/upscalers: the hires pass's latent upscaler (what `hr_upscaler` may name)."""
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1},
            {"name": "Latent", "model_name": None, "model_path": None, "model_url": None, "scale": 2}]


def idle_state() -> dict:
    return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
            "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}


def progress(state: dict, started: float | None, image: str | None) -> dict:
    """GET /sdapi/v1/progress, computed as A1111's progressapi does from the job and step counters."""
    if not state["job_count"] or started is None:
        return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
    done = 0.01 + state["job_no"] / state["job_count"]
    if state["sampling_steps"]:
        done += state["sampling_step"] / state["sampling_steps"] / state["job_count"]
    elapsed = time.time() - started
    return {"progress": min(done, 1.0), "eta_relative": elapsed / done - elapsed, "state": state,
            "current_image": image, "textinfo": None}


def failure(status: int, e: BaseException, message: str) -> dict:
    """A1111's error body (modules/api/api.py handle_exception) for what is not a validation error."""
    return {"error": type(e).__name__, "detail": message, "body": "", "errors": f"{status}: {message}"}
