"""Sweep axes: `--x KEY=V1,V2,...` parsed, typed and checked, and X x Y x Z expanded into cells.

The value syntax is A1111's X/Y/Z plot (scripts/xyz_grid.py): values are comma-separated and parsed as CSV, so
a value holding a comma is quoted (`prompt_sr="red, blue",green`); numeric keys take inclusive ranges
`1-8`, ranges with a step `1-10 (+2)`, `10-1 (-3)`, and ranges with a count `1-10 [5]` (evenly spaced; an
integer key truncates them, as A1111 does). Keys are config keys (their type from RunConfig), `prompt_sr`
(A1111's Prompt S/R: the first value is searched in the prompt and the negative prompt, and each value
replaces it; the first value is the unchanged prompt), and `lora:NAME` (a LoRA's weight). Pure: no torch.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any

from sdcli import config
from sdcli.runtime.errors import BadInputError, UsageError

PROMPT_SR = "prompt_sr"
LORA_PREFIX = "lora:"
# Keys a sweep cannot vary: the model is loaded once per sweep, and where/how many images go is the sweep's own.
FIXED_KEYS = {
    "model": "the model is loaded once per sweep",
    "vae": "the model is loaded once per sweep",
    "dtype": "the model is loaded once per sweep",
    "device": "the model is loaded once per sweep",
    "lora_dir": "LoRAs are resolved once per sweep",
    "embeddings_dir": "embeddings are found once per sweep",
    "vae_dir": "the model is loaded once per sweep",
    "offload": "the model is loaded once per sweep",
    "threads": "the thread count is set once per run (and changes no byte)",
    "output": "the sweep names its own files",
    "n": "a cell is one image",
    "batch_size": "a cell is one image",
}

_NUM = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE = re.compile(rf"\s*({_NUM})\s*-\s*({_NUM})\s*(?:\(\s*({_NUM})\s*\)|\[\s*(\d+)\s*\])?\s*")
MAX_RANGE_VALUES = 10000


@dataclass(frozen=True)
class Axis:
    key: str  # a config key, "prompt_sr" or "lora:NAME"
    values: tuple  # typed and checked
    spec: str = ""  # what was given, for the plot's metadata

    def labels(self) -> list[str]:
        return [label(self.key, v) for v in self.values]


@dataclass(frozen=True)
class Cell:
    index: tuple[int, int, int]  # (ix, iy, iz)
    prompt: str
    negative: str
    settings: dict[str, Any] = field(default_factory=dict)  # config key -> value, "lora:NAME" -> weight


def label(key: str, value: Any) -> str:
    """A1111's axis labels: "key: value", just the value for Prompt S/R; floats without binary noise."""
    if isinstance(value, float):
        value = round(value, 8)
        if value.is_integer():
            value = int(value) if abs(value) < 1e15 else value
    if key == PROMPT_SR:
        return str(value)
    return f"{key}: {value}"


def parse_axis(spec: str, option: str = "--x") -> Axis:
    """`KEY=V1,V2,...` -> Axis; UsageError naming `option` for anything wrong."""
    key, sep, text = spec.partition("=")
    key = key.strip()
    if key.lower().startswith(LORA_PREFIX):
        key = LORA_PREFIX + key[len(LORA_PREFIX):]  # the LoRA's name keeps its case
    else:
        key = key.lower().replace("-", "_")
    if not sep or not key:
        raise UsageError(f"{option} {spec!r}: expected KEY=V1,V2,... (e.g. cfg=5,7.5,10)")
    kind = _kind(key, option)
    raw = _split_values(text, option, key)
    values = _expand_ranges(raw, kind, option, key) if kind in ("int", "float") else raw
    typed = tuple(_typed(key, kind, v, option) for v in values)
    if not typed:
        raise UsageError(f"{option} {key}: no values")
    return Axis(key, typed, spec)


def expand(prompt: str, negative: str, x: Axis, y: Axis | None = None, z: Axis | None = None) -> list[Cell]:
    """Every cell of the plot in the order the plots are drawn: z outer, then rows (y), then columns (x)."""
    axes = [x, y or _NOTHING, z or _NOTHING]
    keys = [a.key for a in axes if a is not _NOTHING]
    for key in set(keys):
        if keys.count(key) > 1 and key != PROMPT_SR:
            raise UsageError(f"{key} is swept on two axes; give each key to one of --x/--y/--z")
    for name, axis in zip(("--x", "--y", "--z"), axes):
        if axis.key == PROMPT_SR and axis.values[0] not in prompt and axis.values[0] not in negative:
            raise UsageError(f"{name} prompt_sr: {axis.values[0]!r} is not in the prompt or the negative prompt "
                             "(the first value is what the others replace)")
    cells = []
    for iz, vz in enumerate(axes[2].values):
        for iy, vy in enumerate(axes[1].values):
            for ix, vx in enumerate(axes[0].values):
                cells.append(_cell((ix, iy, iz), prompt, negative, zip(axes, (vx, vy, vz))))
    return cells


_NOTHING = Axis("", (None,))


def _cell(index, prompt: str, negative: str, axis_values) -> Cell:
    settings: dict[str, Any] = {}
    replacements = []
    for axis, value in axis_values:
        if axis is _NOTHING:
            continue
        if axis.key == PROMPT_SR:
            replacements.append((axis.values[0], value))
        else:
            settings[axis.key] = value
    negative = settings.pop("negative", negative)
    for search, value in replacements:  # in axis order, x first, as A1111 applies them
        prompt, negative = prompt.replace(search, value), negative.replace(search, value)
    return Cell(index, prompt, negative, settings)


def _kind(key: str, option: str) -> str:
    if key == PROMPT_SR:
        return "str"
    if key.startswith(LORA_PREFIX):
        if not key[len(LORA_PREFIX):]:
            raise UsageError(f"{option} {key}: name the LoRA (lora:NAME=0,0.5,1)")
        return "float"
    if key in FIXED_KEYS:
        raise UsageError(f"{option} {key}: cannot be swept ({FIXED_KEYS[key]})")
    if key not in config.FIELDS:
        known = ", ".join(k for k in config.FIELDS if k not in FIXED_KEYS)
        raise UsageError(f"{option} {key}: unknown key (known: {known}, prompt_sr, lora:NAME)")
    declared = str(config.FIELDS[key].type)
    return next((k for k in ("bool", "int", "float") if declared.startswith(k)), "str")


def _split_values(text: str, option: str, key: str) -> list[str]:
    try:
        rows = list(csv.reader(io.StringIO(text), skipinitialspace=True, strict=True))
    except csv.Error as e:
        raise UsageError(f"{option} {key}: cannot read the values ({e})") from None
    values = [v.strip() for row in rows for v in row]
    if any(v == "" for v in values):
        raise UsageError(f"{option} {key}: empty value in {text!r}")
    return values


def _expand_ranges(values: list[str], kind: str, option: str, key: str) -> list[Any]:
    out: list[Any] = []
    for text in values:
        m = _RANGE.fullmatch(text)
        out += _range(m, kind, option, key, text) if m else [text]
        if len(out) > MAX_RANGE_VALUES:
            raise UsageError(f"{option} {key}: more than {MAX_RANGE_VALUES} values")
    return out


def _range(m: re.Match, kind: str, option: str, key: str, text: str) -> list[float | int]:
    num = int if kind == "int" else float
    try:
        start, end = (num(g.replace(" ", "")) for g in m.group(1, 2))
        step = num(m.group(3).replace(" ", "")) if m.group(3) else None
    except ValueError:
        raise UsageError(f"{option} {key}: {text!r} is not a range of {kind}s") from None
    if m.group(4) is not None:  # [count]: evenly spaced, ends included (numpy.linspace)
        count = int(m.group(4))
        if count < 1 or count > MAX_RANGE_VALUES:
            raise UsageError(f"{option} {key}: {text!r}: the count must be 1 to {MAX_RANGE_VALUES}")
        spaced = [start + (end - start) * i / (count - 1) for i in range(count)] if count > 1 else [start]
        return [int(v) if kind == "int" else _tidy(v) for v in spaced]
    step = step if step is not None else 1
    if step == 0 or (end - start) * step < 0:
        raise UsageError(f"{option} {key}: {text!r}: the step {step} never gets from {start} to {end}")
    count = math.floor((end - start) / step + 1e-9) + 1  # ends included, as A1111
    if count > MAX_RANGE_VALUES:
        raise UsageError(f"{option} {key}: {text!r} has more than {MAX_RANGE_VALUES} values")
    return [start + i * step if kind == "int" else _tidy(start + i * step) for i in range(count)]


def _tidy(value: float) -> float:
    """0.1 * 3 is 0.30000000000000004: ranges give the decimal the user meant."""
    return round(value, 10)


def _typed(key: str, kind: str, value: Any, option: str) -> Any:
    if key == PROMPT_SR:
        return value
    if isinstance(value, str):  # not from a range
        value = _from_text(key, kind, value, option)
    if key.startswith(LORA_PREFIX):
        if not math.isfinite(value):
            raise UsageError(f"{option} {key}: the weight must be finite, got {value}")
        return value
    try:
        return config.check_value(key, value, option)
    except BadInputError as e:
        raise UsageError(str(e)) from None


def _from_text(key: str, kind: str, text: str, option: str) -> Any:
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise UsageError(f"{option} {key}: {text!r} is not a{'n integer' if kind == 'int' else ' number'}") from None
    if kind == "bool":
        if text.lower() not in ("true", "false"):
            raise UsageError(f"{option} {key}: {text!r} is not true or false")
        return text.lower() == "true"
    return text
