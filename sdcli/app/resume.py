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
from sdcli.config import sparse_keys
from sdcli.runtime.errors import OutputError
from sdcli.app import save

# 'auto'/None: known once the model is loaded (the size, cfg and guidance are the family's when not given)
LOAD_TIME_KEYS = ("device", "dtype", "prediction", "width", "height", "cfg", "guidance", "schedule")


def skip_done(targets: list, outputs, req) -> list:
    """With --skip-existing: the targets less the images already there (said on stderr), whose names (and latent
    names) leave the output plan, so the plan's checks do not refuse them as existing files."""
    if not getattr(req, "skip_existing", False):
        return targets
    done = {id(t) for t in targets if _done(t, req.overwrite)}
    if not done:
        return targets
    console.info(f"skipping {len(done)} of {len(targets)} images that exist already")
    gone = {p for t in targets if id(t) in done for p in (t.path, t.latent_path) if p is not None}
    outputs.outputs = [o for o in outputs.outputs if o.path not in gone]
    return [t for t in targets if id(t) not in done]


def _done(target, overwrite: bool) -> bool:
    if str(target.path) == "-" or not target.path.exists():
        return False
    if matches(target.path, target):
        return True
    if overwrite:
        return False
    raise OutputError(f"{target.path} exists but is not this job's image (its metadata differs); "
                      "pass --overwrite to replace it")


def matches(path: Path, target) -> bool:
    """Whether the PNG at `path` records exactly the image `target` would make."""
    recorded = _recorded(path)
    if recorded is None or recorded.get("prompt") != target.job.prompt or recorded.get("seed") != target.seed:
        return False
    expected, config = expected_config(target), recorded.get("config") or {}
    sparse = sparse_keys()  # recorded only when not at their defaults (save.metadata): absent means the default
    return all(config.get(key, sparse.get(key)) == value for key, value in expected.items())


def expected_config(target) -> dict:
    """The recorded config (save.metadata) as far as it is known before a model is loaded."""
    cfg = target.job.cfg
    sampler, schedule = save.sampler_schedule(cfg)
    auto = cfg.schedule == "auto" and not cfg.sigmas  # a flow family's schedule is its own: known at load
    expected = dataclasses.replace(cfg, seed=target.seed, subseed=target.image_subseed, n=1, sampler=sampler,
                                   schedule="auto" if auto else schedule).to_dict()
    for key in ("output", "lora_dir", "ray", "offload"):
        expected.pop(key, None)
    for key in ("model", "vae", "clip_l", "clip_g", "t5"):
        expected[key] = Path(expected[key]).name if expected[key] else expected[key]
    for key in LOAD_TIME_KEYS:
        if expected[key] in (None, "auto"):
            del expected[key]
    control_config.put_record(expected, cfg.controlnets)
    return json.loads(json.dumps(expected))  # as read back from JSON: tuples become lists


def _recorded(path: Path) -> dict | None:
    from PIL import Image

    from sdcli.output.metadata import SDCLI_JSON_KEY

    try:
        with Image.open(path) as img:
            text = img.text.get(SDCLI_JSON_KEY) if hasattr(img, "text") else None
        data = json.loads(text) if text else None
    except (OSError, ValueError, SyntaxError):
        return None
    return data if isinstance(data, dict) else None
