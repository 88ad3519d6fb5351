"""What AUTOMATIC1111's webui (v1.6 - v1.10) does with the sampler noise parameters, as data: which sampler takes
`eta` / `s_churn` / `s_tmin` / `s_tmax` / `s_noise`, their defaults, which infotext field records them and when,
and where each sampler's noise comes from. sdcli passes the parameters to its samplers, writes and reads the
infotext fields, and says which noise it cannot draw again, with it (sampling/rng.py has the noise itself).

Where each rule lives in A1111 (github.com/AUTOMATIC1111/stable-diffusion-webui):
- modules/sd_samplers_kdiffusion.py: `samplers_k_diffusion` (label, k-diffusion function, options `uses_ensd`,
  `brownian_noise`, ...) and `sampler_extra_params` (only sample_euler, sample_heun, sample_dpm_2 get s_churn,
  s_tmin, s_tmax, s_noise);
- modules/sd_samplers_common.py Sampler.__init__ / initialize: eta = p.eta or the setting `eta_ancestral` (1.0),
  passed to every function whose signature has `eta`, written as `Eta` when != 1.0; s_churn / s_tmin / s_tmax /
  s_noise come from the settings (s_tmax 0 means inf), written as `Sigma churn` / `Sigma tmin` / `Sigma tmax` /
  `Sigma noise` when they differ from 0 / 0 / inf / 1; create_noise_sampler: the SDE samplers' Brownian tree,
  seeded with the image seeds; is_sampler_using_eta_noise_seed_delta: when `ENSD` is written;
- modules/sd_samplers_timesteps.py CompVisSampler: DDIM / PLMS / UniPC read `eta_ddim` (0.0), written as
  `Eta DDIM` when != 0 (only DDIM's function takes eta);
- modules/processing.py create_infotext: `Variation seed` and `Variation seed strength` when the strength != 0,
  `Seed resize from: WxH` when both are set, `ENSD` (the setting "Eta noise seed delta") when the sampler uses it
  and eta != 0, `RNG: CPU|NV` (absent = GPU, as infotext_utils.parse_generation_parameters reads it);
- modules/rng.py ImageRNG: ENSD re-seeds every image's sampler noise with seed + ENSD after the initial noise, for
  EVERY sampler, whether or not the infotext records it.

k-diffusion as A1111 pins it (crowsonkb/k-diffusion ab527a9) draws one noise per step in sample_euler,
sample_heun and sample_dpm_2 whatever s_churn is (`eps = randn_like(x) * s_noise` before the `gamma > 0` test),
and applies churn only where s_tmin <= sigma <= s_tmax, gamma = min(s_churn / steps, sqrt 2 - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# The noise sources, as config values (`rng`) and infotext values (`RNG: CPU|GPU|NV`, upper case there).
SOURCES = ("cpu", "gpu", "nv")

# Infotext field -> (sampler keyword or setting, default, when A1111 writes it).
INFOTEXT_FIELDS: dict[str, tuple[str, object, str]] = {
    "Eta": ("eta (setting eta_ancestral)", 1.0, "k-diffusion sampler with an eta argument, eta != 1"),
    "Eta DDIM": ("eta (setting eta_ddim)", 0.0, "DDIM, eta != 0"),
    "Sigma churn": ("s_churn", 0.0, "Euler / Heun / DPM2, value != 0"),
    "Sigma tmin": ("s_tmin", 0.0, "Euler / Heun / DPM2, value != 0"),
    "Sigma tmax": ("s_tmax", float("inf"), "Euler / Heun / DPM2, value != inf (setting 0 means inf)"),
    "Sigma noise": ("s_noise", 1.0, "Euler / Heun / DPM2, value != 1"),
    "ENSD": ("setting eta_noise_seed_delta", 0, "value != 0, sampler uses_ensd, eta != 0"),
    "Variation seed": ("subseed", None, "variation strength != 0 (image k: subseed + k)"),
    "Variation seed strength": ("subseed_strength", 0.0, "value != 0"),
    "Seed resize from": ("seed_resize_from_w x seed_resize_from_h", None, "both > 0, written as WxH in pixels"),
    "RNG": ("setting randn_source", "GPU", "source is CPU or NV (absent means GPU)"),
}


@dataclass(frozen=True)
class SamplerNoise:
    """One A1111 sampler: its k-diffusion (or timesteps) function, the noise parameters it takes and where its
    noise comes from. noise: "none" (deterministic), "rng" (ImageRNG.next() through k-diffusion's randn_like, so
    sampling/rng.py ImageNoise replays it), "churn" (one ImageRNG draw per step, used only when s_churn > 0),
    "brownian" (a torchsde Brownian tree seeded with the image seeds: not ImageNoise's stream)."""

    label: str
    function: str
    eta: str | None  # infotext field of its eta, None if the function takes none
    churn: bool  # takes s_churn / s_tmin / s_tmax / s_noise
    uses_ensd: bool  # A1111 writes ENSD for it (when eta != 0)
    noise: str
    sdcli: str | None  # sdcli's sampler (samplers.SAMPLERS), None if sdcli has none


A1111_SAMPLERS: tuple[SamplerNoise, ...] = (
    SamplerNoise("DPM++ 2M", "sample_dpmpp_2m", None, False, False, "none", "dpm++_2m"),
    SamplerNoise("DPM++ SDE", "sample_dpmpp_sde", "Eta", False, False, "brownian", "dpm++_sde"),
    SamplerNoise("DPM++ 2M SDE", "sample_dpmpp_2m_sde", "Eta", False, False, "brownian", "dpm++_2m_sde"),
    SamplerNoise("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", "Eta", False, False, "brownian", None),
    SamplerNoise("DPM++ 2S a", "sample_dpmpp_2s_ancestral", "Eta", False, True, "rng", "dpm++_2s_a"),
    SamplerNoise("DPM++ 3M SDE", "sample_dpmpp_3m_sde", "Eta", False, False, "brownian", None),
    SamplerNoise("Euler a", "sample_euler_ancestral", "Eta", False, True, "rng", "euler_a"),
    SamplerNoise("Euler", "sample_euler", None, True, False, "churn", "euler"),
    SamplerNoise("LMS", "sample_lms", None, False, False, "none", "lms"),
    SamplerNoise("Heun", "sample_heun", None, True, False, "churn", "heun"),
    SamplerNoise("DPM2", "sample_dpm_2", None, True, False, "churn", "dpm2"),
    SamplerNoise("DPM2 a", "sample_dpm_2_ancestral", "Eta", False, True, "rng", "dpm2_a"),
    SamplerNoise("DPM fast", "sample_dpm_fast", "Eta", False, True, "rng", None),
    SamplerNoise("DPM adaptive", "sample_dpm_adaptive", "Eta", False, True, "rng", None),
    SamplerNoise("Restart", "restart_sampler", None, False, False, "rng", None),
    SamplerNoise("DDIM", "ddim", "Eta DDIM", False, False, "rng", "ddim"),
    SamplerNoise("PLMS", "plms", None, False, False, "none", "plms"),
    SamplerNoise("UniPC", "unipc", None, False, False, "none", "unipc"),
    SamplerNoise("LCM", "sample_lcm", None, False, False, "rng", "lcm"),
)


_BY_SDCLI = {row.sdcli: row for row in A1111_SAMPLERS if row.sdcli}
CHURN_KEYS = ("s_churn", "s_tmin", "s_tmax", "s_noise")
# sdcli's config defaults (s_tmax 0 stands for infinity, as in A1111's setting) and the infotext label of each.
CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}
CHURN_LABELS = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}


def row_of(sampler: str) -> SamplerNoise | None:
    """A1111's row for one of sdcli's samplers (canonical name), None when A1111 has no such sampler."""
    return _BY_SDCLI.get(sampler)


def eta_default(sampler: str) -> float | None:
    """The eta A1111 gives `sampler` when none is set: 1 (setting eta_ancestral) for the k-diffusion functions that
    take one, 0 (eta_ddim) for DDIM; None for a sampler without eta."""
    row = row_of(sampler)
    if row is None or row.eta is None:
        return None
    return float(INFOTEXT_FIELDS[row.eta][1])


def sampler_options(sampler: str, eta: float | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                    s_tmax: float = 0.0, s_noise: float = 1.0) -> dict[str, float]:
    """The keyword arguments samplers.py's function for `sampler` takes, as A1111 passes them: eta to the samplers
    that have one (None: left at the function's default, A1111's), s_churn / s_tmin / s_tmax / s_noise to Euler,
    Heun and DPM2 (s_tmax 0 = infinity). Only values that differ from the function's defaults are given, so a
    render at the defaults calls the function exactly as before these parameters existed."""
    row, options = row_of(sampler), {}
    if row is None:
        return options
    if row.eta is not None and eta is not None and eta != eta_default(sampler):
        options["eta"] = float(eta)
    if row.churn:
        given = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
        for key, value in given.items():
            if value != CHURN_DEFAULTS[key]:
                options[key] = math.inf if key == "s_tmax" and value == 0 else float(value)
    return options


def unused(sampler: str, eta: float | None, churn: dict[str, float]) -> list[str]:
    """The parameters set away from their defaults that `sampler` does not take (A1111 ignores them there):
    config keys, for a warning."""
    row = row_of(sampler)
    out = []
    if eta is not None and (row is None or row.eta is None):
        out.append("eta")
    if row is None or not row.churn:
        out += [key for key in CHURN_KEYS if churn.get(key, CHURN_DEFAULTS[key]) != CHURN_DEFAULTS[key]]
    return out


def infotext_fields(sampler: str, eta: float | None, churn: dict[str, float], ensd: int) -> dict[str, Any]:
    """The sampler fields A1111 writes for a render, by its rules (sd_samplers_common.Sampler.initialize,
    processing.create_infotext): `Eta` / `Eta DDIM` when the sampler takes eta and it differs from the default,
    `Sigma churn` ... `Sigma noise` for Euler / Heun / DPM2 when not at their defaults (tmax as a number),
    `ENSD` when it is set, the sampler is one A1111 says uses it, and eta is not 0."""
    row, fields = row_of(sampler), {}
    if row is None:
        return fields
    used_eta = eta_default(sampler) if eta is None else float(eta)
    if row.eta is not None and used_eta != eta_default(sampler):
        fields[row.eta] = used_eta
    if row.churn:
        for key in CHURN_KEYS:
            value = churn.get(key, CHURN_DEFAULTS[key])
            if value != CHURN_DEFAULTS[key]:
                fields[CHURN_LABELS[key]] = value
    if ensd and row.uses_ensd and used_eta:
        fields["ENSD"] = ensd
    return fields


def from_infotext(sampler: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Config values (eta, s_churn, s_tmin, s_tmax, s_noise) from A1111 infotext fields, as A1111 reads them
    back: `Eta` or `Eta DDIM` whichever field is `sampler`'s, the Sigma fields for any sampler (A1111 writes them
    only for those that take them). Absent fields are left out: the defaults are A1111's."""
    row, out = row_of(sampler), {}
    if row is not None and row.eta is not None and fields.get(row.eta) is not None:
        out["eta"] = fields[row.eta]
    for key, label in CHURN_LABELS.items():
        if fields.get(label) is not None:
            out[key] = fields[label]
    return out


def unreplayable(sampler: str, eta: float | None) -> str | None:
    """Why A1111's noise for `sampler` cannot be drawn again, or None when it can: the SDE samplers draw from a
    torchsde Brownian tree (not from the image's generators) unless eta is 0."""
    row = row_of(sampler)
    used_eta = eta_default(sampler) if eta is None else eta
    if row is not None and row.noise == "brownian" and used_eta:
        return (f"A1111 draws {row.label}'s noise from a torchsde Brownian tree seeded with the image seeds; sdcli "
                "draws Gaussian steps of the same law from the image's generator, so the same seed gives a "
                "different image")
    return None


def unknown_ensd(sampler: str, eta: float | None, fields: dict[str, Any]) -> str | None:
    """A1111 re-seeds every sampler's noise with seed + ENSD but writes `ENSD` only for the samplers it says use
    it (and eta != 0): for the others that draw noise (Euler / Heun / DPM2 with churn, DDIM with eta, LCM) an
    infotext cannot say whether ENSD was set. None when it can."""
    row = row_of(sampler)
    if row is None or "ENSD" in fields:
        return None
    used_eta = eta_default(sampler) if eta is None else eta
    churned = row.noise == "churn" and float(fields.get("Sigma churn") or 0) > 0
    draws = churned or (row.noise == "rng" and (row.eta is None or bool(used_eta)))
    if not draws or (row.uses_ensd and used_eta):
        return None
    return (f"A1111 does not record ENSD for {row.label}, yet draws its noise from seed + ENSD when its setting "
            "'Eta noise seed delta' is set: if it was, give it with --ensd")
