"""The commands, one module each (generate, img2img, encode/decode, convert, verify), over a shared render module
(render.py: targets, LoRA state, the passes) and a save module (save.py: PNG, metadata, latents). cli.py builds a
request and calls the command's `run_*`; nothing here keeps state between calls."""
