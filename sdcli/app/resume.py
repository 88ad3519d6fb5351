"""--skip-existing: a rerun of the same command renders only what is missing, so an interrupted batch resumes.

An output that exists counts as done when the sdcli metadata in it says it is this job's image: the same prompt,
seed and model file, and every setting the job fixes before a model is loaded (the recorded config, with the
sampler and schedule canonical). Settings decided at load time (device, dtype, prediction and the size when
'auto') are compared only when the job names them. Anything else at that path is refused as a plain run refuses
an existing file. Outputs are published atomically, so an existing one is never a half-written file.

A job whose seed was drawn (seed -1, the default) would draw another on the rerun, and no image of the first run
would be its own: with --skip-existing such a job takes the seed its existing images record (`adopt_seeds`), when
they are otherwise this job's images and agree on it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sdcli.config import sparse_keys
from sdcli.runtime import console

from sdcli.control import settings as control_config
from sdcli.runtime.errors import OutputError
from sdcli.app import render, save

# 'auto'/None: known once the model is loaded (the size, cfg and guidance are the family's when not given)
LOAD_TIME_KEYS = ("device", "dtype", "prediction", "width", "height", "cfg", "guidance", "schedule")


def adopt_seeds(jobs: list, req) -> list:
    """With --skip-existing: each job whose seed was drawn takes the base seed its existing outputs record (image
    k of a job has seed+k), so an interrupted random-seed run resumes; OutputError when they disagree."""
    if not getattr(req, "skip_existing", False):
        return jobs
    adopted, index = [], 0
    for job in jobs:
        seeds = _recorded_seeds(job, index) if job.seed_drawn else set()
        index += job.cfg.n
        if len(seeds) > 1:
            raise OutputError(f"the existing images of this run ({job.source}) record different seeds "
                              f"({', '.join(map(str, sorted(seeds)))}): pass --seed to say which run to resume")
        if seeds:
            seed = seeds.pop()
            console.info(f"resuming with seed {seed}, recorded in the existing images")
            job = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, seed=seed))
        adopted.append(job)
    return adopted


def _recorded_seeds(job, first_index: int) -> set[int]:
    """The base seeds (recorded seed - k; with a variation seed, the seed) of the job's existing outputs that are otherwise this job's images."""
    from sdcli.output.targets import STDOUT, expand_template

    if job.cfg.output == STDOUT:
        return set()
    seeds = set()
    for k in range(job.cfg.n):
        path = expand_template(job.cfg.output, first_index + k, job.cfg.seed + k, job.prompt)
        recorded = _recorded(path) if path.exists() else None
        seed = recorded.get("seed") if recorded else None
        if not isinstance(seed, int) or isinstance(seed, bool):
            continue
        base = seed - k if job.cfg.subseed_strength == 0 else seed  # a variation keeps the seed (render.image_seeds)
        if base < 0:
            continue
        job_there = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, seed=base))
        image_seeds, subseeds = render.image_seeds(job_there.cfg)
        if matches(path, render.Target(job_there, first_index + k, image_seeds[k], path, None, subseeds[k])):
            seeds.add(base)
    return seeds


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
    for key, default in sparse_keys().items():  # as save.metadata: a feature that is off is not recorded
        if expected.get(key) == default:
            del expected[key]
    expected.pop("threads", None)  # never recorded (save.metadata)
    save.record_hires_upscaler(expected, cfg)
    for key in ("model", "vae", "clip_l", "clip_g", "t5"):
        if key in expected:  # the encoder files are sparse: absent when not given
            expected[key] = Path(expected[key]).name if expected[key] else expected[key]
    for key in LOAD_TIME_KEYS:  # (guidance is sparse: absent when not given)
        if expected.get(key, "auto") in (None, "auto"):
            expected.pop(key, None)
    control_config.put_record(expected, cfg.controlnets)
    return json.loads(json.dumps(expected))  # as read back from JSON: tuples become lists


def _recorded(path: Path) -> dict | None:
    """sdcli's JSON metadata of the image at `path` (PNG, JPEG or WebP), None when it has none."""
    from sdcli.output.metadata import read_image_metadata
    from sdcli.runtime.errors import BadInputError

    try:
        data = read_image_metadata(path).get("sdcli")
    except BadInputError:
        return None
    return data if isinstance(data, dict) else None
