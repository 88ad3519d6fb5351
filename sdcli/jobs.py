"""Render jobs: one prompt with its resolved config. A prompts file gives many jobs that share one loaded model.

Prompts file format (`--prompts-file F`, `-` = stdin), one job per line:
  - a plain line is a prompt;
  - a line starting with `{` is a JSON object: {"prompt": "...", "seed": 7, "steps": 30, ...} where every key
    besides `prompt` is a config key (as in the YAML configs) overriding the run's config for that job;
  - blank lines and lines starting with `#` are skipped;
  - the file is UTF-8 (a byte order mark at its start is dropped; an invalid byte is an error naming its line).
Every line is checked before any work starts; a bad one fails with its line number. Keys that would need another
model loaded (model, vae, dtype, device, prediction) or another embeddings folder cannot change per job.
"""

from __future__ import annotations

import json
import operator
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from sdcli.config import FIELDS, SEED_MAX, RunConfig, check_value, decode_utf8
from sdcli.runtime.errors import BadInputError, UsageError

PER_RUN_KEYS = {"model", "vae", "dtype", "device", "prediction", "embeddings_dir", "vae_dir", "ray", "offload",
                "clip_l", "clip_g", "t5", "threads"}


@dataclass(frozen=True)
class Job:
    prompt: str  # as written (recorded in the image's metadata)
    cfg: RunConfig  # seed already drawn when it was -1
    source: str  # "command line" or "FILE:LINE", for messages
    seed_drawn: bool = False  # the seed was -1 and drawn here: --skip-existing may take the one its images record
    subseed_drawn: bool = False  # the variation seed was -1 and drawn here (--dry-run cannot say it in advance)

    # The extra-network tags are taken out of `prompt` once per job (after _checked has named any bad one with its
    # line): `text` is what the encoder sees, `loras` the <lora:...> tags it named. Kept in the instance's dict as
    # functools.cached_property does, without its per-access lock (a 100,000-line file reads it per line).
    @property
    def _split(self) -> tuple[str, tuple]:
        split = self.__dict__.get("_split")
        if split is None:
            from sdcli.text.prompts import split_extra_networks

            text, tags = split_extra_networks(self.prompt)
            split = self.__dict__["_split"] = text, tuple(tags)
        return split

    @property
    def text(self) -> str:
        return self._split[0]

    @property
    def loras(self) -> tuple:
        return self._split[1]


def draw_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


def with_seed(cfg: RunConfig, variation: bool = False) -> RunConfig:
    """Replace seed -1 by a drawn one, so it can be recorded and replayed; the variation seed (subseed) too when a
    variation strength is set, or `variation` says one will be (a sweep axis), as A1111 draws it."""
    if cfg.seed < 0:
        cfg = with_values(cfg, seed=draw_seed())
    if _draws_subseed(cfg, variation):
        cfg = with_values(cfg, subseed=draw_seed())
    return cfg


def with_values(cfg: RunConfig, /, **changes) -> RunConfig:  # positional: 'cfg' is a key (the CFG scale)
    """`dataclasses.replace(cfg, **changes)` for values already checked (a drawn seed, a prompts-file line's
    check_value'd keys), at less than half its cost: replace gathers the ~70 fields one by one into keyword
    arguments, here they are read in one C call and passed in order, and a 100,000-line file draws 100,000
    seeds before the first image. RunConfig has no __post_init__, so the object is the one replace builds
    (tests/test_prompts_file_scale.py compares)."""
    values = list(_ALL_VALUES(cfg))
    for key, value in changes.items():
        if key not in _POSITION:  # as replace: a key that is no field is a TypeError
            raise TypeError(f"RunConfig has no field {key!r}")
        values[_POSITION[key]] = value
    return type(cfg)(*values)


_ALL_VALUES = operator.attrgetter(*FIELDS)  # a RunConfig's values in field order, __init__'s order
_POSITION = {name: i for i, name in enumerate(FIELDS)}


def _draws_subseed(cfg: RunConfig, variation: bool = False) -> bool:
    return cfg.subseed < 0 and (cfg.subseed_strength != 0 or variation)


def _job(prompt: str, cfg: RunConfig, where: str) -> Job:
    """A job of `cfg` (seed -1 not drawn yet), its seeds drawn and what was drawn noted."""
    return Job(prompt, with_seed(cfg), where, cfg.seed < 0, _draws_subseed(cfg))


def single_job(prompt: str | None, cfg: RunConfig) -> Job:
    if prompt is None:
        raise UsageError("give a PROMPT or --prompts-file FILE")
    return _checked(_job(prompt, cfg, "command line"))


def _checked(job: Job) -> Job:
    """The job's prompt and negative prompt checked before the model loads (see prompts.check_prompt); from the
    command line a text that is not UTF-8 is a usage error naming the argument or flag."""
    from sdcli.text.prompts import check_prompt

    in_file = job.source != "command line"
    for text, name, tags in ((job.prompt, "PROMPT", True), (job.cfg.negative, "--negative", False)):
        if (text, job.cfg.steps, tags) in _PASSED:  # the run's negative, on every line of a prompts file
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            if not in_file:
                raise UsageError(f"{name}: not valid UTF-8 text") from None
        check_prompt(text, job.source if in_file else None, job.cfg.steps, tags)
        if not tags:
            _remember(text, job.cfg.steps, tags)
    return job


# Negative prompts that passed check_prompt (which depends on the text and the steps only): a prompts file's
# lines share the run's negative, checked once instead of 100,000 times. Bounded, as a long-lived server's.
_PASSED: dict[tuple, None] = {}


def _remember(text: str, steps: int, tags: bool) -> None:
    if len(_PASSED) >= 64:
        _PASSED.clear()
    _PASSED[(text, steps, tags)] = None


def read_prompts_file(path: str, base: RunConfig) -> list[Job]:
    """All jobs of a prompts file, each checked; BadInputError naming FILE:LINE on the first bad line."""
    name, text = _read_text(path)
    jobs = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{name}:{number}"
        if stripped.startswith("{"):
            jobs.append(_checked(_json_job(stripped, base, where)))
        else:
            jobs.append(_checked(_job(stripped, base, where)))
    if not jobs:
        raise BadInputError(f"{name}: no prompts in the file")
    return jobs


def _read_text(path: str) -> tuple[str, str]:
    """The file's text, decoded strictly as UTF-8 (a BOM at the start dropped): a bad byte is named by line."""
    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            if sys.stdin is None or sys.stdin.closed:
                raise BadInputError("--prompts-file -: stdin is closed")
            stream = getattr(sys.stdin, "buffer", None)  # bytes, decoded below; a text-only stdin (tests): as is
            data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        else:
            data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{path}: prompts file not found") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a directory, expected a prompts file") from None
    except (OSError, ValueError) as e:  # ValueError: a stdin closed under us
        raise BadInputError(f"{name}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return name, decode_utf8(data, name)


def _json_job(line: str, base: RunConfig, where: str) -> Job:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise BadInputError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer past Python's digit limit
        raise BadInputError(f"{where}: unusable JSON value ({str(e).split(';')[0]})") from None
    if not isinstance(obj, dict):
        raise BadInputError(f"{where}: expected a JSON object")
    prompt = obj.pop("prompt", None)
    if not isinstance(prompt, str):
        raise BadInputError(f"{where}: 'prompt' must be given as text")
    fixed = PER_RUN_KEYS & obj.keys()
    if fixed:
        raise BadInputError(f"{where}: '{sorted(fixed)[0]}' cannot change per job (the model is loaded once)")
    overrides = {key: check_value(key, value, where) for key, value in obj.items()}
    return _job(prompt, with_values(base, **overrides), where)
