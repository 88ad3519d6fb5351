"""`sdcli upscale`: images through an upscaler model (A1111's Extras "Upscale", ComfyUI's ImageUpscaleWithModel).

Every output is named and checked before the model loads (the rules of `generate`: no overwrite without
--overwrite, one image on stdout, no two outputs with one name), and written atomically. Gray and alpha images
keep their mode. The input's metadata is carried over as A1111's Extras tab carries it: every text chunk as it
was (the `parameters` infotext unchanged), plus A1111's postprocessing infotext
(``Postprocess upscale by: 4, Postprocess upscaler: 4x-UltraSharp``, A1111 scripts/postprocessing_upscale.py,
in the `postprocessing` and `extras` chunks, modules/postprocessing.py); sdcli's JSON record gains a
``postprocessing`` entry naming the upscaler file, its sha256, the scale and both sizes.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcli import __version__
from sdcli import config as cfgmod
from sdcli.runtime import console
from sdcli.runtime.errors import UsageError

DEFAULT_OUTPUT = "{stem}-upscaled.png"
MAX_SCALE = 16.0
POSTPROCESSING_KEYS = ("postprocessing", "extras")  # A1111's chunks for the Extras infotext


@dataclass
class UpscaleRequest:
    images: list[str]
    upscaler: str  # a file, a name in upscaler_dir, or Lanczos / Nearest
    output: str | None = None  # a file, '-', or a template ({index} {stem} {seed} {prompt})
    scale: float | None = None  # None: the model's own
    tile: int = 512  # 0: untiled
    overlap: int = 32
    flags: dict = field(default_factory=dict)  # upscaler_dir, device, dtype as given
    config_file: Path | None = None
    overwrite: bool = False
    json_out: bool = False


@dataclass(frozen=True)
class Item:
    """One input and where its upscaled image goes."""

    index: int
    source: str  # as given ('-': stdin)
    path: Path  # the output
    texts: dict  # the input's text metadata chunks
    data: bytes | None = None  # stdin's bytes, read at planning (stdin can be read once)


def run_upscale(req: UpscaleRequest) -> None:
    _check_options(req)
    cfg = cfgmod.resolve(req.flags, req.config_file)
    choice = upscaler_choice(req.upscaler, cfg.upscaler_dir, req.scale)
    items = plan(req)
    model = _load(choice, cfg) if choice.kind == "model" else None
    record = _upscaler_record(choice)
    started = time.perf_counter()
    for item in items:
        _upscale_one(item, choice, model, record, req)
    console.info(f"done: {len(items)} image{'s' if len(items) != 1 else ''} in {time.perf_counter() - started:.1f} s")


def _check_options(req: UpscaleRequest) -> None:
    if not req.images:
        raise UsageError("give at least one image to upscale")
    if req.scale is not None and not 0 < req.scale <= MAX_SCALE:
        raise UsageError(f"option --scale: must be above 0 and at most {MAX_SCALE:g}, got {req.scale:g}")
    from sdcli.upscale.tiled import MIN_TILE

    if req.tile != 0 and req.tile < MIN_TILE:
        raise UsageError(f"option --tile: must be 0 (the whole image) or at least {MIN_TILE}, got {req.tile}")
    if req.overlap < 0:
        raise UsageError(f"option --tile-overlap: must not be negative, got {req.overlap}")
    if req.images.count("-") > 1:
        raise UsageError("stdin (-) can be read once: give it as one input only")


def upscaler_choice(value: str, folder: str | None, scale: float | None):
    """What --upscaler names (upscale.names.UpscalerChoice): a model, or a Lanczos / Nearest resize (which has no
    scale of its own); latent modes and None upscale nothing here."""
    from sdcli.upscale.names import choose

    choice = choose(value, folder)
    if choice.kind == "latent":
        raise UsageError(f"--upscaler {choice.name}: a latent upscaler enlarges latents, in the hires fix "
                         "(--hires-upscaler); give an upscaler model, Lanczos or Nearest")
    if choice.kind == "resize" and choice.mode == "none":
        raise UsageError("--upscaler None upscales nothing; give an upscaler model, Lanczos or Nearest")
    if choice.kind == "resize" and scale is None:
        raise UsageError(f"--upscaler {choice.name} has no scale of its own: give --scale")
    return choice


# --- before the model loads --------------------------------------------------------------------------------

def plan(req: UpscaleRequest) -> list[Item]:
    """Every input's metadata read (no pixel decoded yet) and every output named and checked (OutputPlan)."""
    from sdcli.app.planning import OutputPlan

    outputs = OutputPlan(overwrite=req.overwrite, json_stdout=req.json_out)
    items = []
    for index, source in enumerate(req.images):
        texts, data = _input_texts(source)
        path = output_name(req.output or DEFAULT_OUTPUT, index, source, texts)
        outputs.add("image", path)
        items.append(Item(index, source, path, texts, data))
    outputs.check()
    return items


def _input_texts(source: str) -> tuple[dict, bytes | None]:
    """(the input's text chunks, stdin's bytes or None); BadInputError for a missing or non-image file."""
    if source == "-":
        from sdcli.formats.inputs import read_input

        _, data = read_input("-", "an image")
        return _texts_of_bytes(data), data
    from sdcli.output.metadata import read_image_metadata

    return dict(read_image_metadata(source)["raw"]), None


def _texts_of_bytes(data: bytes) -> dict:
    """Text chunks of an image given as bytes (stdin); {} for anything PIL cannot read (decoding says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return {k: v for k, v in img.info.items() if isinstance(k, str) and isinstance(v, str)}
    except Exception:  # noqa: BLE001 - the decode that follows reports the file properly
        return {}


def output_name(template: str, index: int, source: str, texts: dict) -> Path:
    """The output of input `index`: '-' , a file, or a template with {index}, {stem} (the input's file name
    without its extension), {seed} and {prompt} (the input's recorded ones)."""
    from sdcli.output.targets import STDOUT, expand_template

    if template == STDOUT:
        return Path(STDOUT)
    stem = "stdin" if source == "-" else Path(source).stem
    if "{stem:" in template or "{stem!" in template:
        raise UsageError(f"output template {template!r}: {{stem}} takes no format spec")
    expanded = template.replace("{stem}", stem.replace("{", "{{").replace("}", "}}"))
    seed, prompt = _recorded_seed_prompt(texts)
    if seed is None and "{seed" in expanded:
        raise UsageError(f"output template {template!r}: {source} records no seed for {{seed}}")
    return expand_template(expanded, index, seed if seed is not None else -1, prompt)


def _recorded_seed_prompt(texts: dict) -> tuple[int | None, str]:
    from sdcli.output.metadata import PARAMETERS_KEY, parse_infotext

    params = parse_infotext(texts[PARAMETERS_KEY]) if texts.get(PARAMETERS_KEY) else {}
    seed = params.get("seed")
    return (seed if isinstance(seed, int) else None), str(params.get("prompt") or "")


def _load(choice, cfg):
    """The upscaler on the configured device and dtype (`auto`: as for a render)."""
    from sdcli.runtime import device
    from sdcli.upscale.files import load_upscaler

    placement = device.choose(cfg.device, cfg.dtype)
    device.configure(placement, cfg.threads)
    console.info(f"loading {choice.path} ({placement.device}, {placement.dtype_name})")
    return load_upscaler(choice.path, placement.dtype, placement.device)


def _upscaler_record(choice) -> dict:
    if choice.path is None:
        return {"name": choice.name}
    from sdcli.app.save import upscaler_record

    return upscaler_record(choice)


# --- each image ----------------------------------------------------------------------------------------------

def _upscale_one(item: Item, choice, model, record: dict, req: UpscaleRequest) -> None:
    from sdcli.formats.images import load_image_as_is
    from sdcli.output.targets import atomic_write_bytes

    img, notes = load_image_as_is(item.source, data=item.data)
    for note in notes:
        console.info(f"{item.source}: {note}")
    t0 = time.perf_counter()
    out = upscale_image(img, choice, model, req.scale, req.tile, req.overlap)
    seconds = round(time.perf_counter() - t0, 3)
    scale = req.scale if req.scale is not None else model.scale
    step = {**record, "scale": scale, "from_size": _size(img), "size": _size(out), "tile": req.tile,
            "overlap": req.overlap, "sdcli_version": __version__}
    path = atomic_write_bytes(item.path, png_with_metadata(out, item.texts, choice.name, scale, step),
                              overwrite=req.overwrite)
    if req.json_out:
        console.emit_json({"path": str(path), "index": item.index, "input": item.source, "upscaler": choice.name,
                           "scale": scale, "from_size": step["from_size"], "size": step["size"], "seconds": seconds})
    elif str(path) != "-":
        console.info(f"saved {path} ({img.width}x{img.height} -> {out.width}x{out.height}, {choice.name})")


def upscale_image(img, choice, model, scale: float | None, tile: int, overlap: int):
    """`img` upscaled by a model (tiled.upscale_pil: passes then one Lanczos resize) or resized by `scale`."""
    from PIL import Image

    from sdcli.upscale.tiled import normal_mode, upscale_pil

    if choice.kind == "model":
        return upscale_pil(img, model, scale=scale, tile=tile or None, overlap=overlap)
    img = normal_mode(img)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resample = Image.Resampling.LANCZOS if choice.mode == "lanczos" else Image.Resampling.NEAREST
    return img.resize(size, resample=resample)


def _size(img) -> dict:
    return {"width": img.width, "height": img.height}


def postprocessing_infotext(name: str, scale: float) -> str:
    """A1111's Extras infotext for an upscale by a factor: 'Postprocess upscale by: 4, Postprocess upscaler: NAME'
    (values holding ',', ':' or a line break JSON-quoted, as A1111's infotext_utils.quote)."""
    def quote(value: Any) -> str:
        text = str(int(value) if isinstance(value, float) and value.is_integer() else value)
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    return f"Postprocess upscale by: {quote(scale)}, Postprocess upscaler: {quote(name)}"


def png_with_metadata(img, texts: dict, name: str, scale: float, step: dict) -> bytes:
    """The PNG of `img` carrying the input's text chunks (sdcli's record with `step` appended to its
    postprocessing list) and A1111's postprocessing infotext."""
    from PIL.PngImagePlugin import PngInfo

    from sdcli.output.metadata import SDCLI_JSON_KEY

    info = PngInfo()
    for key, value in texts.items():
        if key in POSTPROCESSING_KEYS:
            continue  # this upscale's replaces an earlier one, as A1111 does
        if key == SDCLI_JSON_KEY:
            info.add_itxt(key, _with_step(value, step))
        else:
            info.add_text(key, value)  # tEXt when Latin-1, else PIL writes iTXt
    infotext = postprocessing_infotext(name, scale)
    for key in POSTPROCESSING_KEYS:
        info.add_text(key, infotext)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _with_step(text: str, step: dict) -> str:
    """sdcli's JSON record with this upscale appended to its `postprocessing` list; unreadable JSON as it was."""
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):
        return text
    if not isinstance(record, dict):
        return text
    done = record.get("postprocessing")
    record["postprocessing"] = [*(done if isinstance(done, list) else []), step]
    return json.dumps(record, ensure_ascii=False, sort_keys=True, default=str)
