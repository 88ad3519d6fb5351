"""The run configuration: built-in defaults < user config < --config FILE (or a preset shipped with sdcli, by
name) < settings replayed from an image < flags given on the command line; `--print-config` says which gave each.

YAML here is plain data, read with a YAML 1.2-style safe loader: `no`, `off`, `1:30` stay strings instead of
YAML 1.1's False / 90, so a typo cannot silently turn into a boolean or a number. Unknown keys, wrong types and
out-of-range values are errors that name the file and the key. No torch import: `--print-config` stays instant.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sdcli.runtime.errors import BadInputError, UsageError, quote
from sdcli.runtime.paths import xdg_path
from sdcli.sampling.a1111_params import SOURCES

SEED_MAX = 2**32 - 1
DTYPES = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
PREDICTIONS = ("auto", "eps", "v", "flow")
INPAINT_FILLS = ("original", "fill", "latent-noise", "latent-nothing")
MAX_PAD = 4096


def _range(lo: float | None = None, hi: float | None = None, choices: tuple[str, ...] | None = None,
           sparse: bool = False) -> dict:
    """A key's checks. `sparse`: recorded in an image's sdcli metadata only when not at its default (a feature
    that is off unless asked for, added after images existed: those images keep their bytes, and an image without
    the key replays with the feature off, as it was made)."""
    return {"lo": lo, "hi": hi, "choices": choices, "sparse": sparse}


def sparse_keys() -> dict[str, Any]:
    """The sparse keys (see _range) and their defaults."""
    return {f.name: f.default for f in fields(RunConfig) if f.metadata.get("sparse")}


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything a render needs besides the prompt. Field names are the YAML keys. Slots: 600 bytes an instance
    instead of 1.7 KB, and a prompts file of 100,000 lines holds one per line (its seed drawn)."""

    model: str | None = field(default=None, metadata=_range())
    vae: str | None = field(default=None, metadata=_range())
    lora_dir: str | None = field(default=None, metadata=_range())  # where <lora:NAME> in prompts is looked up
    embeddings_dir: str | None = field(default=None, metadata=_range())  # textual-inversion files (A1111's folder)
    vae_dir: str | None = field(default=None, metadata=_range())  # VAE files; a taesd decoder here drives --preview
    prediction: str = field(default="auto", metadata=_range(choices=PREDICTIONS))
    sampler: str = field(default="dpm++_2m", metadata=_range())
    schedule: str = field(default="auto", metadata=_range())  # auto = the sampler's usual schedule
    sigmas: str | None = field(default=None, metadata=_range())
    steps: int = field(default=20, metadata=_range(1, 1000))
    cfg: float | None = field(default=None, metadata=_range(0.0, 100.0))  # None: the family's (7; FLUX 1)
    guidance_rescale: float = field(default=0.0, metadata=_range(0.0, 1.0))
    seed: int = field(default=-1, metadata=_range(-1, SEED_MAX))
    # A1111's noise (sampling/rng.py): its source, variation seed (subseed -1 is drawn when the strength is not 0),
    # "Resize seed from" WxH, "Eta noise seed delta"; like the sampler parameters below, recorded only when set
    rng: str = field(default="cpu", metadata=_range(choices=SOURCES, sparse=True))
    subseed: int = field(default=-1, metadata=_range(-1, SEED_MAX, sparse=True))
    subseed_strength: float = field(default=0.0, metadata=_range(0.0, 1.0, sparse=True))
    seed_resize_from: str | None = field(default=None, metadata=_range(sparse=True))
    ensd: int = field(default=0, metadata=_range(-SEED_MAX, SEED_MAX, sparse=True))
    # A1111's sampler parameters (sampling/a1111_params.py): eta (None: the sampler's own, 1 or DDIM's 0) and the
    # churn of Euler / Heun / DPM2 (s_tmax 0 = infinity, as A1111's setting)
    eta: float | None = field(default=None, metadata=_range(0.0, 1.0, sparse=True))
    s_churn: float = field(default=0.0, metadata=_range(0.0, 100.0, sparse=True))
    s_tmin: float = field(default=0.0, metadata=_range(0.0, 1000.0, sparse=True))
    s_tmax: float = field(default=0.0, metadata=_range(0.0, 1000.0, sparse=True))
    s_noise: float = field(default=1.0, metadata=_range(0.0, 2.0, sparse=True))
    width: int | None = field(default=None, metadata=_range(64, 4096))
    height: int | None = field(default=None, metadata=_range(64, 4096))
    negative: str = field(default="", metadata=_range())
    batch_size: int = field(default=1, metadata=_range(1, 64))
    n: int = field(default=1, metadata=_range(1, 100000))
    clip_skip: int = field(default=1, metadata=_range(1, 12))
    strength: float = field(default=0.75, metadata=_range(0.0, 1.0))
    # Inpainting (img2img --mask), A1111's inpaint settings (app/inpaint.py); None: the model's default
    mask_blur: int | None = field(default=None, metadata=_range(0, 64, sparse=True))  # Gaussian radius in pixels (4; 0 9-channel)
    inpaint_fill: str = field(default="original", metadata=_range(choices=INPAINT_FILLS, sparse=True))  # A1111 "Masked content"
    inpaint_area: str = field(default="whole", metadata=_range(choices=("whole", "masked"), sparse=True))  # "Only masked"
    inpaint_padding: int = field(default=32, metadata=_range(0, 256, sparse=True))  # "Only masked padding, pixels"
    mask_invert: bool = field(default=False, metadata=_range(sparse=True))  # A1111 "Inpaint not masked"
    overlay: bool | None = field(default=None, metadata=_range(sparse=True))  # the original put back outside the mask
    pad: str | None = field(default=None, metadata=_range(sparse=True))  # outpainting: "LEFT,TOP,RIGHT,BOTTOM" pixels added
    seamless: bool = field(default=False, metadata=_range())  # tileable output: circular padding in UNet and VAE
    # A1111 "Hires. fix": a second img2img pass on the latents upscaled by hires_scale (1 = off)
    hires_scale: float = field(default=1.0, metadata=_range(1.0, 4.0))
    hires_strength: float = field(default=0.5, metadata=_range(0.0, 1.0))  # the second pass's denoising strength
    hires_steps: int | None = field(default=None, metadata=_range(1, 1000))  # None: the same as steps
    # how pass 1 is brought to the hires size: an A1111 latent mode, Lanczos/Nearest/None, or a model (file or name)
    hires_upscaler: str = field(default="Latent", metadata=_range())
    upscaler_dir: str | None = field(default=None, metadata=_range())  # upscaler files by name (A1111's models/)
    # Token merging (models/tome.py), A1111's "Token merging ratio" (and "... hr" for the hires pass; 0 there: the
    # same as tome_ratio, as A1111's get_token_merging_ratio(for_hr=True)); 0 = off
    tome_ratio: float = field(default=0.0, metadata=_range(0.0, 0.9, sparse=True))
    tome_ratio_hr: float = field(default=0.0, metadata=_range(0.0, 0.9, sparse=True))
    # VAE decode in tiles (runtime/tiling.py): auto = only to retry a decode that ran out of memory, on, off
    vae_tiling: str = field(default="auto", metadata=_range(choices=("auto", "on", "off"), sparse=True))
    vae_tile_size: int = field(default=512, metadata=_range(64, 8192, sparse=True))  # a tile's side in pixels
    # SDXL size/crop conditioning (the vector y): "WxH" (default: the size being rendered), "TOP,LEFT" (default 0,0)
    original_size: str | None = field(default=None, metadata=_range())
    target_size: str | None = field(default=None, metadata=_range())
    crop_coords: str | None = field(default=None, metadata=_range())
    aesthetic_score: float = field(default=6.0, metadata=_range(0.0, 10.0))  # SDXL refiner: prompt's score
    negative_aesthetic_score: float = field(default=2.5, metadata=_range(0.0, 10.0))  # ... and the negative's
    refiner: str | None = field(default=None, metadata=_range())  # SDXL refiner checkpoint: ensemble of experts
    refiner_switch: float = field(default=0.8, metadata=_range(0.0, 1.0))  # A1111 "Refiner switch at"
    dtype: str = field(default="auto", metadata=_range(choices=DTYPES))
    device: str = field(default="auto", metadata=_range(choices=DEVICES))
    output: str = field(default="sdcli-{seed}.png", metadata=_range())
    # ControlNet units (control_config.ControlSpec); in YAML a list of {model, image, weight, start, end, ...}
    controlnets: tuple = field(default=(), metadata=_range())
    ray: str | None = field(default=None, metadata=_range())  # render on a Ray cluster: auto | local | ray://HOST:PORT
    offload: bool = field(default=False, metadata=_range())  # one of text/UNet/VAE resident at a time (loading/residency.py)
    # torch's intra-op CPU threads (None: torch's default, one per core). Never recorded in an image (save.metadata):
    # the bytes do not depend on it (models/invariant.py)
    threads: int | None = field(default=None, metadata=_range(1, 1024, sparse=True))
    # The flow transformers (SD3, FLUX), recorded only when set: text encoders as files of their own (ComfyUI's
    # clip_l / clip_g / t5xxl files), FLUX dev's distilled guidance, a shift replacing the family's
    clip_l: str | None = field(default=None, metadata=_range(sparse=True))
    clip_g: str | None = field(default=None, metadata=_range(sparse=True))
    t5: str | None = field(default=None, metadata=_range(sparse=True))
    guidance: float | None = field(default=None, metadata=_range(0.0, 100.0, sparse=True))  # None: the family's (3.5)
    flow_shift: float | None = field(default=None, metadata=_range(0.01, 100.0, sparse=True))  # None: the family's
    # SD3.5 skip-layer guidance (sampling/slg.py; stable-diffusion.cpp's names): 0 = off
    slg_scale: float = field(default=0.0, metadata=_range(0.0, 100.0, sparse=True))
    skip_layers: str = field(default="7,8,9", metadata=_range(sparse=True))
    slg_start: float = field(default=0.01, metadata=_range(0.0, 1.0, sparse=True))
    slg_end: float = field(default=0.2, metadata=_range(0.0, 1.0, sparse=True))

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in FIELDS}
        if not all(type(v) in _PLAIN or v == () for v in out.values()):  # nested values: ControlNet units
            out = dataclasses.asdict(self)  # (asdict copies each value, a plain one is itself: 80 us a config)
        out["controlnets"] = [dict(u) for u in out["controlnets"]]  # plain lists for YAML and JSON
        return out


_PLAIN = (str, int, float, bool, type(None))  # values asdict gives back as they are


FIELDS = {f.name: f for f in fields(RunConfig)}
TEXT_FILE_KEYS = ("clip_l", "clip_g", "t5")  # text encoders given as files of their own (loading/components.py)


# --- YAML 1.2-ish safe loading -------------------------------------------------------------------

def _strict_loader():
    """A SafeLoader whose implicit scalars follow YAML 1.2 core: only true/false are booleans, no sexagesimals."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_TAGS]
        for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
        list("-+0123456789."),
    )
    return Loader


_YAML11_TAGS = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}


def decode_utf8(data: bytes, name: str) -> str:
    """Strict UTF-8 text of a file, without a byte order mark at its start (Windows editors write one, and it
    would glue itself to the first line); BadInputError naming the line of the first invalid byte."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BadInputError(f"{name}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x})") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a config file into a plain dict; BadInputError naming the file for anything that is not a mapping."""
    import yaml

    try:
        text = decode_utf8(Path(path).read_bytes(), str(path))
    except FileNotFoundError:
        raise BadInputError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a directory, expected a YAML config file") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read config file ({e})") from None
    try:
        data = yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise BadInputError(f"{path}: not valid YAML{where}") from None
    except (RecursionError, ValueError) as e:  # PyYAML recurses per nesting level; int() caps digit counts
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise BadInputError(f"{path}: not a usable config ({why})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


# --- validation ----------------------------------------------------------------------------------

def _show(value: Any) -> str:
    """A short repr for messages: a YAML alias bomb (`&a [*b, *b, ...]`) shares objects and must not be expanded."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 4, 4, 60, 60
    return short.repr(value)


def _type_name(value: Any) -> str:
    return "boolean" if isinstance(value, bool) else type(value).__name__


def check_value(key: str, value: Any, where: str, error: type[Exception] = BadInputError) -> Any:
    """Return `value` checked and normalised for config key `key`; raise `error` naming `where` and the key.

    This is the one typed check for every value, whatever it was read from: a flag (`error` UsageError, exit 2)
    or a file (a config, a prompts-file line, an image's metadata: BadInputError, exit 3, naming FILE and key)."""
    if error is BadInputError and key == "sampler" and isinstance(value, str) and value.strip().lower() == "help":
        # `--sampler help` lists the samplers and exits 0; read from a file it would end a CI job "successfully"
        # without an image.
        raise BadInputError(f"{where}: 'sampler' is 'help', which is not a sampler (`--sampler help` lists them)")
    try:
        return _check_value(key, value, where)
    except BadInputError as e:
        if error is BadInputError:
            raise
        flag = "--" + key.replace("_", "-")
        raise error(str(e).replace(f"{where}: '{key}'", f"option {flag}")) from None


def _check_value(key: str, value: Any, where: str) -> Any:
    if key not in FIELDS:
        close = ", ".join(k for k in FIELDS if k[:3] == str(key)[:3]) or ", ".join(FIELDS)
        raise BadInputError(f"{where}: unknown key '{quote(key, 60)}' (known: {close})")
    f = FIELDS[key]
    if key == "controlnets":  # a list of unit objects, checked by their own rules
        from sdcli.control.settings import parse_specs

        return parse_specs(value, where)
    kind = f.type if isinstance(f.type, str) else str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise BadInputError(f"{where}: '{key}' must not be empty")
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise BadInputError(f"{where}: '{key}' must be true or false, got {_type_name(value)} "
                                f"{quote(repr(value))}")
        return value
    if kind.startswith("int"):
        value = _as_int(key, value, where)
    elif kind.startswith("float"):
        value = _as_float(key, value, where)
    elif not isinstance(value, str):
        raise BadInputError(f"{where}: '{key}' must be text, got {_type_name(value)} {_show(value)}")
    if key == "rng":  # A1111's infotext writes the source in upper case ("RNG: NV")
        value = value.strip().lower()
    return _check_range(key, value, f.metadata, where)


def _as_int(key: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, float) and not math.isnan(value) and math.isinf(value):
            lo, hi = FIELDS[key].metadata.get("lo"), FIELDS[key].metadata.get("hi")
            raise BadInputError(f"{where}: '{key}' must be between {lo} and {hi}, got {value}")
        raise BadInputError(f"{where}: '{key}' must be an integer, got {_type_name(value)} {_show(value)}")
    return value


def _as_float(key: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"{where}: '{key}' must be a number, got {_type_name(value)} {_show(value)}")
    if not math.isfinite(value):
        raise BadInputError(f"{where}: '{key}' must be finite, got {_show(value)}")
    return float(value)


def _check_range(key: str, value: Any, meta: dict, where: str) -> Any:
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if choices and value not in choices:
        raise BadInputError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {_show(value)}")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise BadInputError(f"{where}: '{key}' must be between {lo} and {hi}, got {_show(value)}")
    if key in ("width", "height", "vae_tile_size") and value % 8:
        raise BadInputError(f"{where}: '{key}' must be a multiple of 8, got {value}")
    if key in PAIRS:
        pair = pair_of(key, value, where)
        if key == "seed_resize_from" and max(pair) > SEED_RESIZE_MAX:  # noise is drawn at this size
            raise BadInputError(f"{where}: '{key}' must be at most {SEED_RESIZE_MAX}x{SEED_RESIZE_MAX}, got "
                                  f"{quote(value, 60)}")
    if key == "pad":
        pad_of(value, where)
    if key == "hires_upscaler":
        if not value.strip():
            raise BadInputError(f"{where}: '{key}' must name an upscaler (Latent, Lanczos, a model...), got ''")
        from sdcli.upscale.names import canonical

        value = canonical(value)
    return value


def pad_of(value: str, where: str = "config") -> tuple[int, int, int, int]:
    """(left, top, right, bottom) from "LEFT,TOP,RIGHT,BOTTOM": whole pixels, 0 to MAX_PAD, not all 0."""
    parts = value.replace(" ", "").split(",")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 5 and int(p) <= MAX_PAD for p in parts):
        raise BadInputError(f"{where}: 'pad' must be LEFT,TOP,RIGHT,BOTTOM (four whole numbers of pixels, 0 to "
                            f"{MAX_PAD}), got {_show(value)}")
    pad = tuple(int(p) for p in parts)
    if not any(pad):
        raise BadInputError(f"{where}: 'pad' adds nothing (all four are 0)")
    return pad


SEED_RESIZE_MAX = 8192
PAIRS = {"original_size": ("x", "WxH"), "target_size": ("x", "WxH"), "crop_coords": (",", "TOP,LEFT"),
         "seed_resize_from": ("x", "WxH")}


def pair_of(key: str, value: str, where: str = "config") -> tuple[int, int]:
    """Two non-negative integers from "WxH" (returned as (height, width), SDXL's order) or "TOP,LEFT"."""
    sep, form = PAIRS[key]
    parts = value.lower().replace(" ", "").split(sep)
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= 6 for p in parts):
        raise BadInputError(f"{where}: '{key}' must be {form} (two whole numbers), got {_show(value)}")
    a, b = int(parts[0]), int(parts[1])
    return (b, a) if sep == "x" else (a, b)


def check_mapping(data: dict[str, Any], where: str, error: type[Exception] = BadInputError) -> dict[str, Any]:
    return {key: check_value(key, value, where, error) for key, value in data.items()}


# --- resolution ----------------------------------------------------------------------------------

def user_config_path() -> Path | None:
    """$XDG_CONFIG_HOME/sdcli/config.yaml (typer.get_app_dir honours XDG on Linux)."""
    return xdg_path("XDG_CONFIG_HOME", ".config", "sdcli", "config.yaml")


@dataclass(frozen=True)
class Layer:
    """One source of config values: what it is for people (with its file's path), and the values it sets."""

    source: str
    values: dict[str, Any]


PRESETS = "presets"  # the folder of sdcli/ that holds the presets shipped with the package (configs/ in the repo)


def presets() -> dict[str, Path]:
    """name -> file of the presets shipped inside the package (`--config fast`)."""
    from importlib import resources

    folder = Path(str(resources.files("sdcli") / PRESETS))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def find_config(value: Path) -> tuple[Path, str]:
    """(file, how to name it) for a --config value: a file that exists, else a packaged preset named by its name
    (`fast` or `fast.yaml`); a bare name that is neither is an error listing the presets."""
    path = Path(value)
    if path.exists() or len(path.parts) != 1:
        return path, f"--config {path}"
    name = path.stem if path.suffix.lower() in (".yaml", ".yml") else path.name
    known = presets()
    if name in known:
        return known[name], f"preset {name} ({known[name]})"
    raise BadInputError(f"{path}: config file not found, and no preset of that name (presets shipped with sdcli: "
                        f"{', '.join(known) or 'none'})")


def layers(flags: dict[str, Any], config_file: Path | None = None, replay: dict[str, Any] | None = None,
           replay_source: str = "image metadata") -> list[Layer]:  # fmt: skip
    """The sources above the built-in defaults, lowest first: user config < `config_file` (a file or a packaged
    preset) < `replay` (settings read from an image, already checked) < `flags` (only the flags the user gave)."""
    out = []
    user = user_config_path()
    if user is not None and user.is_file():
        out.append(Layer(f"user config {user}", check_mapping(read_yaml(user), str(user))))
    if config_file is not None:
        path, label = find_config(config_file)
        out.append(Layer(label, check_mapping(read_yaml(path), str(path))))
    if replay:
        out.append(Layer(replay_source, dict(replay)))
    given = {k: v for k, v in flags.items() if v is not None}
    # Flags were typed by Typer already; a range error there is a usage error, not a bad file.
    out.append(Layer("command line", check_mapping(given, "command line", UsageError)))
    return out


def resolve(flags: dict[str, Any], config_file: Path | None = None, replay: dict[str, Any] | None = None) -> RunConfig:
    """Defaults < user config < `config_file` < `replay` < `flags` (see layers)."""
    values: dict[str, Any] = {}
    for layer in layers(flags, config_file, replay):
        values.update(layer.values)
    return RunConfig(**values)


def sources(flags: dict[str, Any], config_file: Path | None = None, replay: dict[str, Any] | None = None,
            replay_source: str = "image metadata") -> dict[str, str]:  # fmt: skip
    """key -> the source its resolved value came from ("default", "user config PATH", "preset NAME (PATH)",
    "--config PATH", "image metadata ...", "command line"), for --print-config."""
    out = {key: "default" for key in FIELDS}
    for layer in layers(flags, config_file, replay, replay_source):
        out.update({key: layer.source for key in layer.values})
    return out


def origin(key: str, flags: dict[str, Any], config_file: Path | None = None, replay: Any = None) -> str:
    """Where the resolved value of `key` came from, for messages: "option --key", "FILE: 'key'" or "default".
    `replay` (a replay.Replay) is the image whose metadata set the values it holds."""
    if flags.get(key) is not None:
        return "option --" + key.replace("_", "-")
    if replay is not None and key in replay.values:
        return f"{replay.path} (metadata): '{key}'"
    files = [find_config(config_file)[0]] if config_file is not None else []
    for path in (*files, user_config_path()):  # the user config may be None
        if path is not None and Path(path).is_file() and key in read_yaml(Path(path)):
            return f"{path}: '{key}'"
    return "default"


def to_yaml(cfg: RunConfig, shown: dict[str, str] | None = None) -> str:
    """The config as YAML a --config file can be; with `shown` (sources()), each value's source as a comment
    after it (before it, for a value that takes several lines) and the order of the sources on top."""
    import yaml

    if shown is None:
        return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
    user = user_config_path()
    lines = ["# later wins: default < user config "
             + (f"{user}{'' if user.is_file() else ' (none there)'}" if user is not None else "(no home folder)")
             + " < --config FILE or preset < --from-image metadata < command line"]
    for key, value in cfg.to_dict().items():
        text = yaml.safe_dump({key: value}, sort_keys=False, allow_unicode=True, width=1 << 16).rstrip("\n")
        if "\n" in text:
            lines += [f"# {key}: {shown[key]}", text]
        else:
            lines.append(f"{text}  # {shown[key]}")
    return "\n".join(lines) + "\n"
