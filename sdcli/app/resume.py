"""--skip-existing: a rerun of the same command renders only what is missing, so an interrupted batch resumes.

An output that exists counts as done when the sdcli metadata in it says it is this job's image: the same prompt,
seed and model file, and every setting the job fixes before a model is loaded (the recorded config, with the
sampler and schedule canonical). Settings decided at load time (device, dtype, prediction and the size when
'auto') are compared only when the job names them. Anything else at that path is refused as a plain run refuses
an existing file. Outputs are published atomically, so an existing one is never a half-written file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sdcli.runtime import console

from sdcli.control import settings as control_config
from sdcli.runtime.errors import BadInputError, OutputError
from sdcli.app import save

LOAD_TIME_KEYS = ("device", "dtype", "prediction", "width", "height")  # 'auto'/None: known once the model is loaded


def skip_done(targets: list, outputs, req) -> list:
    """With --skip-existing: the targets less the images already there (said on stderr), whose names (and latent
    names) leave the output plan, so the plan's checks do not refuse them as existing files."""
    if not getattr(req, "skip_existing", False):
        return targets
    sized = not getattr(req, "latent_in", None)  # a --latent-in run renders the latent's size, not -W/-H
    done = {id(t) for t in targets if _done(t, req.overwrite, sized)}
    if not done:
        return targets
    console.info(f"skipping {len(done)} of {len(targets)} images that exist already")
    gone = {p for t in targets if id(t) in done for p in (t.path, t.latent_path) if p is not None}
    outputs.outputs = [o for o in outputs.outputs if o.path not in gone]
    return [t for t in targets if id(t) not in done]


def _done(target, overwrite: bool, sized: bool = True) -> bool:
    if str(target.path) == "-" or not target.path.exists():
        return False
    if matches(target.path, target, sized):
        return True
    if overwrite:
        return False
    raise OutputError(f"{target.path} exists but is not this job's image (its metadata differs, or it is not a "
                      "whole PNG of the job's size); pass --overwrite to replace it")


def matches(path: Path, target, sized: bool = True) -> bool:
    """Whether the PNG at `path` records exactly the image `target` would make (and, when `sized`, has the size
    the job asks for)."""
    recorded = _recorded(path, target.job.cfg if sized else None)
    if recorded is None or recorded.get("prompt") != target.job.prompt or recorded.get("seed") != target.seed:
        return False
    expected, config = expected_config(target), recorded.get("config") or {}
    return all(config.get(key) == value for key, value in expected.items())


def expected_config(target) -> dict:
    """The recorded config (save.metadata) as far as it is known before a model is loaded."""
    cfg = target.job.cfg
    sampler, schedule = save.sampler_schedule(cfg)
    expected = dataclasses.replace(cfg, seed=target.seed, n=1, sampler=sampler, schedule=schedule).to_dict()
    for key in ("output", "lora_dir", "ray", "offload"):
        expected.pop(key, None)
    for key in ("model", "vae"):
        expected[key] = Path(expected[key]).name if expected[key] else expected[key]
    for key in LOAD_TIME_KEYS:
        if expected[key] in (None, "auto"):
            del expected[key]
    control_config.put_record(expected, cfg.controlnets)
    return json.loads(json.dumps(expected))  # as read back from JSON: tuples become lists


def _recorded(path: Path, cfg) -> dict | None:
    """The sdcli metadata of the file at `path` when it is a whole PNG of the job's size, else None. Read as every
    image's metadata is (output/metadata.py: no pixel decoded, text and zlib bombs refused), never with a bare
    PIL reader: the file is anything that happens to be at an output name."""
    from sdcli.formats.png_text import complete_png_size
    from sdcli.output.metadata import read_image_metadata

    try:
        data = read_image_metadata(path).get("sdcli")
    except BadInputError:
        return None
    size = complete_png_size(path)
    if not isinstance(data, dict) or size is None or (cfg is not None and not _right_size(size, cfg)):
        return None  # a damaged file, or one whose metadata claims a render its pixels are not
    return data


def _right_size(size: tuple[int, int], cfg) -> bool:
    """The PNG's (width, height) is the job's, when the job fixes it before a model is loaded."""
    from sdcli.pipeline import hires_size

    if cfg.width is None or cfg.height is None:
        return True
    height, width = hires_size(cfg.height, cfg.width, cfg.hires_scale) if cfg.hires_scale != 1.0 else \
        (cfg.height, cfg.width)
    return size == (width, height)
