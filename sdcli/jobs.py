"""Render jobs: one prompt with its resolved config. A prompts file gives many jobs that share one loaded model.

Prompts file format (`--prompts-file F`, `-` = stdin), one job per line:
  - a plain line is a prompt;
  - a line starting with `{` is a JSON object: {"prompt": "...", "seed": 7, "steps": 30, ...} where every key
    besides `prompt` is a config key (as in the YAML configs) overriding the run's config for that job;
  - blank lines and lines starting with `#` are skipped.
Every line is checked before any work starts; a bad one fails with its line number. Keys that would need another
model loaded (model, vae, dtype, device, prediction) cannot change per job.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import SEED_MAX, RunConfig, check_value
from .errors import BadInputError, UsageError

PER_RUN_KEYS = {"model", "vae", "dtype", "device", "prediction", "ray"}


@dataclass(frozen=True)
class Job:
    prompt: str  # as written (recorded in the image's metadata)
    cfg: RunConfig  # seed already drawn when it was -1
    source: str  # "command line" or "FILE:LINE", for messages
    # Taken out of `prompt` once, here: the text the encoder sees, and the <lora:...> tags it named.
    text: str = dataclasses.field(init=False, repr=False, compare=False)
    loras: tuple = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        from .prompts import split_extra_networks

        text, tags = split_extra_networks(self.prompt)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "loras", tuple(tags))


def draw_seed() -> int:
    return secrets.randbelow(SEED_MAX + 1)


def with_seed(cfg: RunConfig) -> RunConfig:
    """Replace seed -1 by a drawn one, so it can be recorded and replayed."""
    return cfg if cfg.seed >= 0 else dataclasses.replace(cfg, seed=draw_seed())


def single_job(prompt: str | None, cfg: RunConfig) -> Job:
    if prompt is None:
        raise UsageError("give a PROMPT or --prompts-file FILE")
    return Job(prompt, with_seed(cfg), "command line")


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
            jobs.append(_json_job(stripped, base, where))
        else:
            jobs.append(Job(stripped, with_seed(base), where))
    if not jobs:
        raise BadInputError(f"{name}: no prompts in the file")
    return jobs


def _read_text(path: str) -> tuple[str, str]:
    if path == "-":
        return "<stdin>", sys.stdin.read()
    try:
        return path, Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path}: prompts file not found") from None
    except IsADirectoryError:
        raise BadInputError(f"{path}: is a directory, expected a prompts file") from None
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror})") from None


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
    return Job(prompt, with_seed(dataclasses.replace(base, **overrides)), where)
