"""The names of the samplers and schedules, and the other tools' names for them, without torch: a command checks
`--sampler` / `--schedule` and reads or writes infotext labels before (or without) importing torch, so a typo costs
milliseconds, not the 2-3 s of `import torch`. samplers.py pairs each name with its function and schedule.py each
schedule name with its sigmas; tests/test_new_user.py checks the tables agree."""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from sdcli.runtime.errors import UsageError, quote

# Ours, in schedule.SCHEDULES' order.
SCHEDULE_NAMES = ("normal", "karras", "exponential", "sgm_uniform", "simple", "trailing", "ddim_uniform", "beta",
                  "align_your_steps", "lcm")

# The one table of schedule names: ours -> A1111's "Schedule type" label (modules/sd_schedulers.py), where A1111 has
# the schedule; output/metadata.py writes and reads infotext with it, resolve_sampler reads schedule words in sampler
# labels. "Trailing" is not one of A1111's: it is written in A1111's style, and A1111 reads a label it does not know
# as "Automatic" (sd_samplers.get_sampler_and_scheduler); sdcli reads it back as `trailing`.
SCHEDULE_LABELS = {
    "normal": "Normal", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
    "simple": "Simple", "trailing": "Trailing", "ddim_uniform": "DDIM", "beta": "Beta",
    "align_your_steps": "Align Your Steps",
}
# Other spellings -> ours (None: the sampler's default). A1111's "Uniform" is k-diffusion's default discretisation,
# uniform in t, which is the schedule we (and ComfyUI) call "normal".
SCHEDULE_ALIASES = {"automatic": None, "default": None, "uniform": "normal", "sgmuniform": "sgm_uniform",
                    "ays": "align_your_steps", "ddim": "ddim_uniform"}


@dataclass(frozen=True)
class SamplerName:
    """A sampler and the names other tools use for it. a1111/comfy/diffusers are '' where none exists."""

    name: str
    stochastic: bool
    default_schedule: str
    a1111: str = ""
    comfy: str = ""
    diffusers: str = ""
    extra_aliases: tuple[str, ...] = ()

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(a for a in (self.a1111, self.comfy, self.diffusers, *self.extra_aliases) if a)


SAMPLER_NAMES: dict[str, SamplerName] = {s.name: s for s in [
    SamplerName("euler", False, "normal", "Euler", "euler", "EulerDiscreteScheduler"),
    SamplerName("euler_a", True, "normal", "Euler a", "euler_ancestral", "EulerAncestralDiscreteScheduler"),
    SamplerName("heun", False, "normal", "Heun", "heun", "HeunDiscreteScheduler"),
    SamplerName("dpm2", False, "normal", "DPM2", "dpm_2", "KDPM2DiscreteScheduler"),
    SamplerName("dpm2_a", True, "normal", "DPM2 a", "dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler"),
    SamplerName("dpm++_2m", False, "karras", "DPM++ 2M", "dpmpp_2m", "DPMSolverMultistepScheduler"),
    SamplerName("dpm++_2m_sde", True, "karras", "DPM++ 2M SDE", "dpmpp_2m_sde"),
    SamplerName("dpm++_2s_a", True, "karras", "DPM++ 2S a", "dpmpp_2s_ancestral"),
    SamplerName("dpm++_sde", True, "karras", "DPM++ SDE", "dpmpp_sde", "DPMSolverSDEScheduler"),
    SamplerName("lms", False, "normal", "LMS", "lms", "LMSDiscreteScheduler"),
    SamplerName("ddim", False, "ddim_uniform", "DDIM", "ddim", "DDIMScheduler"),
    SamplerName("plms", False, "ddim_uniform", "PLMS", "", "PNDMScheduler"),
    SamplerName("unipc", False, "normal", "UniPC", "uni_pc_bh2", "UniPCMultistepScheduler"),
    SamplerName("lcm", True, "lcm", "LCM", "lcm", "LCMScheduler"),
]}

# Schedule words that A1111 / ComfyUI append to a sampler label ("DPM++ 2M Karras", "dpmpp_2m_sgm_uniform").
_SCHEDULE_SUFFIXES = {**{name: name for name in SCHEDULE_LABELS}, "automatic": None, "uniform": "normal"}


def _norm(label: str) -> str:
    return "_".join(label.strip().lower().replace("-", " ").split())


@functools.cache  # a prompts file of 100,000 lines resolves its sampler on each
def _alias_table() -> dict[str, str]:
    table = {}
    for spec in SAMPLER_NAMES.values():
        for alias in (spec.name, *spec.aliases):
            table[_norm(alias)] = spec.name
    return table


def resolve_sampler(label: str) -> tuple[str, str | None]:
    """A sampler label in any known spelling -> (canonical name, schedule or None).

    "DPM++ 2M Karras" -> ("dpm++_2m", "karras"); "euler_ancestral" -> ("euler_a", None);
    "DPMSolverMultistepScheduler" -> ("dpm++_2m", None). UsageError with close matches otherwise.
    """
    table, key = _alias_table(), _norm(label)
    if key in table:
        return table[key], None
    for suffix, schedule in _SCHEDULE_SUFFIXES.items():
        base = key[: -len(suffix) - 1]
        if key.endswith("_" + suffix) and base in table:
            return table[base], schedule
    close = difflib.get_close_matches(key, list(table), n=4, cutoff=0.5)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    raise UsageError(f"unknown sampler {quote(repr(label))}{hint} (see --sampler help)")


def resolve_sampler_schedule(sampler: str, schedule_name: str) -> tuple[str, str]:
    """(canonical sampler, schedule): a schedule in the label wins, then an explicit one, then the sampler's own."""
    name, label_schedule = resolve_sampler(sampler)
    if label_schedule:
        return name, label_schedule
    if schedule_name != "auto":
        return name, schedule_name
    return name, SAMPLER_NAMES[name].default_schedule


def sampler_help() -> str:
    """Plain-text table of samplers and the names A1111, ComfyUI and diffusers use for them."""
    rows = [("name", "A1111", "ComfyUI", "diffusers", "default schedule")]
    rows += [(s.name, s.a1111 or "-", s.comfy or "-", s.diffusers or "-", s.default_schedule)
             for s in SAMPLER_NAMES.values()]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    lines.append("A schedule can follow the name, as in A1111: \"DPM++ 2M Karras\", \"euler_a exponential\".")
    lines.append("Names are case-insensitive; spaces, '-' and '_' are interchangeable.")
    return "\n".join(lines)


def schedule_help() -> str:
    """Plain-text table of schedules, A1111's label for each and the other names sdcli reads as it."""
    rows = [("name", "A1111", "also read as")]
    for name in SCHEDULE_NAMES:
        aliases = [alias for alias, ours in SCHEDULE_ALIASES.items() if ours == name]
        rows.append((name, SCHEDULE_LABELS.get(name, "-"), ", ".join(aliases) or "-"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    lines.append("auto (the default) takes the sampler's own schedule (see --sampler help); automatic and default "
                 "mean auto too.")
    lines.append("A schedule named in the sampler label (\"DPM++ 2M Karras\") wins over --schedule.")
    return "\n".join(lines)
