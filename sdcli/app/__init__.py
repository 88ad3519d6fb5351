"""The commands, one module each (generate, img2img, encode/decode, convert, verify, sweep, inspect, preprocess),
over a shared render module (render.py: targets, LoRA state, the passes) and a save module (save.py: PNG,
metadata, latents). cli.py builds a request and calls the command's `run_*`; nothing here keeps state between
calls.

May import every layer below it (pipeline, output, config, jobs, control, loading, sampling, text, ...). Only the
Typer layer (cli.py, cli_guard.py, cli_options.py) imports app/; nothing below it ever does.
"""
