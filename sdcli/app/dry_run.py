"""`--dry-run` (generate, img2img): what the run would do, worked out as the run works it out, with nothing loaded
but a checkpoint's header and nothing written. For each job: the files it would write, the size, the seed each
image really gets (a seed drawn at random is drawn when the run starts, so it is shown as random, never as a number
the run would not use; `--skip-existing` takes the seed the existing images record, as the run does), the sampler
and its sigmas, the prompt's schedule (prompt editing) and its tokens per 75-token chunk.

A readable summary on stdout by default; with --json one line per job in the envelope every --json line has
(kind "plan", console.emit_result), without the padded token arrays: the unpadded ids and the count per chunk.
The tokens and the default size are the model's family's when -m names a local file (its header is read, as
`inspect` reads it); otherwise SD1's, and the summary says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from sdcli.runtime import console
from sdcli.app import render, resume


@dataclass(frozen=True)
class ModelView:
    """What a dry run knows of the model: its family (the default one when no local file is given)."""

    family: object  # families.Family
    prediction: str
    note: str  # "" when read from the model, else why the default family is assumed


def show(jobs: list, req, base, init_strength: float | None = None) -> None:
    """Print the plan of `jobs` (already checked as the run checks them). `init_strength`: img2img's strength,
    so the sigmas shown are the ones it runs.

    Each job's plan is printed as soon as it is made and then let go: a prompts file of 100,000 lines is planned
    in seconds and in the memory of its jobs, not of 100,000 plans (their tokens, sigmas and configs) held until
    the end. What many jobs share (the sampling plan, the negative prompt's tokens, the embeddings folder) is
    worked out once (_Shared)."""
    model = model_view(base)
    jobs = resume.adopt_seeds(jobs, req)  # --skip-existing: the seeds the existing images record
    targets, outputs = render.plan_outputs(jobs, req)
    render.plan_grid(req, targets, outputs)
    todo = {id(t) for t in resume.skip_done(list(targets), outputs, req)}
    by_job: dict[int, list] = {}
    for t in targets:
        by_job.setdefault(id(t.job), []).append(t)
    extra = [{"kind": o.kind, "path": str(o.path), "exists": _exists(o.path)} for o in outputs.outputs
             if o.kind not in ("image", "latent")]
    shared = _Shared(model, init_strength)
    for job in jobs:  # a sampler refused for the family (exit 2) is refused before any plan is printed
        shared.sampling(job.cfg)
    for n, job in enumerate(jobs):
        plan = _job_plan(job, by_job.get(id(job), []), todo, req, shared)
        if n == len(jobs) - 1:
            plan["outputs"] += extra  # a grid or preview belongs to the run: listed with its last job
        if req.json_out:
            console.emit_result("plan", None, plan)
        else:
            print(_summary(plan, n + 1, len(jobs), model))


class _Shared:
    """What the jobs of one dry run share, worked out once: the sampling plan of each distinct set of sampling
    settings (make_plan builds the sigmas with torch), the tokens of a negative prompt, the embeddings folder."""

    LIMIT = 1024  # distinct entries kept; a file whose lines all differ starts over, never grows without bound

    def __init__(self, model: ModelView, init_strength: float | None):
        self.model, self.init_strength = model, init_strength
        self._plans: dict[tuple, tuple] = {}
        self._negatives: dict[tuple, dict] = {}
        self._embeddings: dict[str | None, object] = {}

    def sampling(self, cfg) -> tuple:
        """(sampler, cfg scale, sigmas rounded as shown) of the job's first pass."""
        size = _size(cfg, self.model)
        key = (cfg.sampler, cfg.schedule, cfg.steps, cfg.sigmas, cfg.cfg, cfg.guidance_rescale, cfg.flow_shift,
               size, tuple(render.sampler_params(cfg).items()))
        found = self._plans.get(key)
        if found is None:
            plan = _sampling(cfg, self.model, size, self.init_strength)
            found = _keep(self._plans, key, (plan.sampler, plan.cfg, [round(float(s), 5) for s in plan.sigmas]))
        return found

    def negative_tokens(self, cfg) -> dict:
        key = (cfg.negative, cfg.embeddings_dir)
        found = self._negatives.get(key)
        if found is None:
            found = _keep(self._negatives, key, _tokens(cfg.negative, cfg, self, brief=True))
        return found

    def embeddings(self, cfg):
        if cfg.embeddings_dir not in self._embeddings:  # a per-run key: one folder, read once
            self._embeddings[cfg.embeddings_dir] = _embeddings(cfg)
        return self._embeddings[cfg.embeddings_dir]


def _keep(cache: dict, key, value):
    if len(cache) >= _Shared.LIMIT:
        cache.clear()
    cache[key] = value
    return value


def model_view(cfg) -> ModelView:
    from sdcli.families import DEFAULT, by_name

    default_prediction = DEFAULT.default_prediction(False)[0]
    if not cfg.model:
        return ModelView(DEFAULT, default_prediction, "no model given: SD1's tokenizer and schedule")
    if not _exists(cfg.model):
        return ModelView(DEFAULT, default_prediction, f"{cfg.model} is not a local file or folder, so it was not "
                                                      "read: SD1's tokenizer and schedule")
    from sdcli.loading.checkpoint import detect

    info = detect(cfg.model, None if cfg.prediction == "auto" else cfg.prediction)
    return ModelView(by_name(info.family), info.prediction, "")


def _job_plan(job, targets: list, todo: set, req, shared: _Shared) -> dict:
    from sdcli.text.editing import prompt_schedule

    cfg, model = job.cfg, shared.model
    size = _size(cfg, model)
    sampler, guidance, sigmas = shared.sampling(cfg)
    schedule = prompt_schedule(job.text, cfg.steps)
    config = cfg.to_dict()
    if job.seed_drawn:  # drawn here, and drawn again by the real run: what is known is that it is random
        config["seed"] = -1
    if job.subseed_drawn:
        config["subseed"] = -1
    return {
        "source": job.source, "prompt": job.prompt, "negative": cfg.negative,
        "seeds": None if job.seed_drawn else [t.seed for t in targets],
        "subseeds": None if job.subseed_drawn or cfg.subseed_strength == 0 else [t.image_subseed for t in targets],
        "size": list(size) if size else None, "hires_size": _hires_size(cfg, size, model),
        "outputs": _outputs(job, targets, todo, req),
        "sampler": sampler, "schedule": _schedule_used(cfg), "steps": cfg.steps, "cfg": guidance,
        "sigmas": sigmas,
        "prompt_loras": [{"name": t.name, "weight": t.weight} for t in job.loras],
        "prompt_schedule": [{"until_step": end, "text": t} for end, t in schedule],
        "tokens": _tokens(schedule[-1][1], cfg, shared),
        "negative_tokens": shared.negative_tokens(cfg) if cfg.negative else None,
        "config": config,
    }


def _size(cfg, model: ModelView) -> tuple[int, int] | None:
    """(width, height) of the first pass: given, else the family's native size for the prediction type."""
    native = model.family.native_size(model.prediction)
    return cfg.width or native, cfg.height or native


def _hires_size(cfg, size, model: ModelView) -> list[int] | None:
    """[width, height] after the hires pass, rounded as the pass rounds (hires_fix.output_size)."""
    from sdcli.app.hires_fix import output_size

    if cfg.hires_scale == 1.0 or size is None:
        return None
    height, width = output_size(model.family, (size[1], size[0]), cfg.hires_scale)
    return [width, height]


def _sampling(cfg, model: ModelView, size, init_strength: float | None):
    """The sampling plan the run makes (pipeline.make_plan), its sigmas cut to img2img's strength."""
    from sdcli import pipeline
    from sdcli.sampling import schedule

    plan = pipeline.make_plan(cfg.sampler, cfg.schedule, cfg.steps, cfg.sigmas, cfg.cfg, cfg.guidance_rescale,
                              model.family, render.sampler_params(cfg), size=(size[1], size[0]),
                              shift=cfg.flow_shift)
    if init_strength is None:
        return plan
    if model.family.flow is not None:
        from sdcli.sampling.flow import img2img_start

        sigmas = plan.sigmas[img2img_start(len(plan.sigmas) - 1, init_strength):]
    else:
        sigmas = schedule.img2img_sigmas(plan.sigmas, init_strength)
    return dataclasses.replace(plan, sigmas=sigmas)


def _schedule_used(cfg) -> str | None:
    from sdcli.sampling.names import resolve_sampler_schedule

    return None if cfg.sigmas else resolve_sampler_schedule(cfg.sampler, cfg.schedule)[1]


def _tokens(text: str, cfg, shared: _Shared, brief: bool = False) -> dict:
    """inspect --prompt's report of the text with the family's first CLIP tokenizer, without the padded arrays:
    the prompt's ids (begin and end included, no padding) and, per 75-token chunk, its count and tokens."""
    from sdcli.text.clip_tokenizer import get_tokenizer
    from sdcli.text.prompts import describe_prompt

    family = shared.model.family
    spec = next((s for s in family.text if s.kind == "clip"), family.text[0])
    described = describe_prompt(text, get_tokenizer(), spec.pad_id, shared.embeddings(cfg), arrays=False)
    if brief:
        return {"n_tokens": described["n_tokens"], "per_chunk": [c["n_tokens"] for c in described["chunks"]]}
    chunks = [{"n_tokens": c["n_tokens"], "tokens": c["tokens"], "embeddings": c["embeddings"]}
              for c in described["chunks"]]
    return {**{k: v for k, v in described.items() if k != "chunks"}, "per_chunk": [c["n_tokens"] for c in chunks],
            "chunks": chunks}


def _embeddings(cfg):
    if not cfg.embeddings_dir:
        return None
    from sdcli.text.clip_tokenizer import get_tokenizer
    from sdcli.text.embeddings import EmbeddingLibrary

    # no model: every file taken as it is, as inspect --prompt does
    return EmbeddingLibrary(cfg.embeddings_dir, None, get_tokenizer().encode, console.info)


class _Drawn:
    """Stands for a seed drawn when the run starts, in an output template: the name shows `{seed}`."""

    def __format__(self, _spec: str) -> str:
        return "{seed}"


def _outputs(job, targets: list, todo: set, req) -> list[dict]:
    from sdcli.output.targets import STDOUT, slugify

    out = []
    for t in targets:
        names = [("image", job.cfg.output, t.path)] if not getattr(req, "grid_only", False) else []
        if t.latent_path is not None:
            names.append(("latent", req.latent_out, t.latent_path))
        for kind, template, path in names:
            shown = str(path)
            if job.seed_drawn and str(path) != STDOUT:  # the name holds a seed not drawn yet
                shown = template.format(index=t.index, seed=_Drawn(), prompt=slugify(job.prompt))
            entry = {"kind": kind, "path": shown, "exists": _exists(path)}
            if id(t) not in todo:
                entry["skipped"] = True  # --skip-existing: this job's image is there already
            out.append(entry)
    return out


def _exists(path) -> bool:
    """Whether a file or folder is there ('-', stdout, is not; nor a name the system refuses, too long...)."""
    try:
        return str(path) != "-" and Path(path).exists()
    except (OSError, ValueError):  # ENAMETOOLONG, a NUL byte: the run's own checks name those
        return False


# --- the readable summary ------------------------------------------------------------------------------------------

def _summary(plan: dict, n: int, total: int, model: ModelView) -> str:
    head = f"job {n} of {total} ({plan['source']})" if total > 1 else f"plan ({plan['source']})"
    lines = [head, _row("prompt", repr(plan["prompt"]))]
    if plan["negative"]:
        lines.append(_row("negative", repr(plan["negative"])))
    lines += [_row("writes", _shown_outputs(plan["outputs"])), _row("size", _shown_size(plan, model)),
              _row("seeds", _shown_seeds(plan))]
    if plan["subseeds"] is not None or plan["config"].get("subseed_strength"):
        lines.append(_row("variation", _shown_variation(plan)))
    schedule = plan["schedule"] or "custom sigmas"
    lines.append(_row("sampler", f"{plan['sampler']}, schedule {schedule}, {plan['steps']} steps, cfg {plan['cfg']}"))
    lines.append(_row("sigmas", " ".join(f"{s:g}" for s in plan["sigmas"])))
    if len(plan["prompt_schedule"]) > 1:
        lines.append(_row("schedule", "; ".join(f"until step {s['until_step']}: {s['text']!r}"
                                                for s in plan["prompt_schedule"])))
    lines.append(_row("tokens", _shown_tokens(plan["tokens"])))
    if plan["negative_tokens"]:
        lines.append(_row("negative", _shown_tokens(plan["negative_tokens"])))
    if plan["prompt_loras"]:
        lines.append(_row("LoRA tags", ", ".join(f"{t['name']} {t['weight']:g}" for t in plan["prompt_loras"])))
    if model.note:
        lines.append(_row("note", model.note))
    return "\n".join(lines) + "\n"


def _row(label: str, text: str) -> str:
    return f"  {label + ':':<10} {text}"


def _shown_outputs(outputs: list[dict]) -> str:
    if not outputs:
        return "nothing"
    parts = []
    for o in outputs:
        marks = [o["kind"]] if o["kind"] != "image" else []
        if o.get("skipped"):
            marks.append("exists, this job's: skipped")
        elif o["exists"]:
            marks.append("exists")
        parts.append(o["path"] + (f" ({', '.join(marks)})" if marks else ""))
    return ", ".join(parts)


def _shown_size(plan: dict, model: ModelView) -> str:
    width, height = plan["size"]
    text = f"{width}x{height}"
    if plan["config"].get("width") is None or plan["config"].get("height") is None:
        text += f" ({model.family.title}'s native size{'; the model was not read' if model.note else ''})"
    if plan["hires_size"]:
        text += f", hires fix to {plan['hires_size'][0]}x{plan['hires_size'][1]}"
    return text


def _shown_seeds(plan: dict) -> str:
    if plan["seeds"] is None:
        n = len([o for o in plan["outputs"] if o["kind"] == "image"]) or plan["config"]["n"]
        more = f" (image k gets seed+k, {n} images)" if n > 1 else ""
        return f"random: drawn when the run starts{more}; give --seed N to fix it"
    return ", ".join(map(str, plan["seeds"]))


def _shown_variation(plan: dict) -> str:
    strength = plan["config"].get("subseed_strength")
    seeds = "random" if plan["subseeds"] is None else ", ".join(map(str, plan["subseeds"]))
    return f"seeds {seeds} at strength {strength}"


def _shown_tokens(tokens: dict) -> str:
    chunks = tokens["per_chunk"]
    text = f"{tokens['n_tokens']} in {len(chunks)} chunk{'s' if len(chunks) != 1 else ''} of 75 ({', '.join(map(str, chunks))})"
    if "tokens" in tokens:
        text += ": " + " ".join(tokens["tokens"])
    return text
