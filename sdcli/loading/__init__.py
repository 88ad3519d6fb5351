"""Building networks from files: checkpoints detected from their header and strictly loaded (checkpoint), VAE and
TAESD files (vae), LoRA merged into loaded weights (lora), and which parts are in memory when (residency).

May import runtime, formats, models, families, text and sampling. Must never import control, output, pipeline or
app.
"""
