"""The sampler loop's parts: sigma schedules (schedule), denoisers that turn a network into x0 = D(x, sigma) with
guidance (denoise), the samplers themselves as pure functions (samplers), and what the network is conditioned on
(conditioning: `Cond`).

May import runtime, formats, models, families and text (a prompt-editing schedule is part of a `Cond`). Must never
import loading, control, output, pipeline or app: a sampler only sees a denoiser callable, sigmas and noise.
"""
