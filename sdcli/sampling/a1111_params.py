"""What AUTOMATIC1111's webui (v1.6 - v1.10) does with the sampler noise parameters, as data: which sampler takes
`eta` / `s_churn` / `s_tmin` / `s_tmax` / `s_noise`, their defaults, which infotext field records them and when,
and where each sampler's noise comes from. sdcli reads infotexts and replays images with it (sampling/rng.py
has the noise itself).

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

from dataclasses import dataclass

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
)

# What sdcli's samplers (samplers.py) lack to replay these parameters: nothing is added there yet (the lead wires
# it after the layout move).
SDCLI_GAPS: dict[str, str] = {
    "euler": "no s_churn/s_tmin/s_tmax/s_noise; A1111 (k-diffusion ab527a9) draws one noise per step when they apply",
    "heun": "no s_churn/s_tmin/s_tmax/s_noise (same per-step draw as euler)",
    "dpm2": "no s_churn/s_tmin/s_tmax/s_noise (same per-step draw as euler)",
    "euler_a": "eta fixed at 1 (k-diffusion get_ancestral_step(eta) is in samplers._ancestral_step, not exposed)",
    "dpm2_a": "eta fixed at 1",
    "dpm++_2s_a": "eta fixed at 1",
    "dpm++_sde": "eta fixed at 1; A1111 draws from a Brownian tree (torchsde), not ImageRNG: not replayable",
    "dpm++_2m_sde": "eta fixed at 1; Brownian tree noise in A1111, as dpm++_sde",
    "ddim": "eta fixed at 0 ('Eta DDIM'); A1111's DDIM draws one ImageRNG noise per step even at eta 0",
}
