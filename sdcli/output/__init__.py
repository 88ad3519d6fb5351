"""What a run writes and reads back: output targets and atomic writes (targets), PNG generation metadata
(metadata) and the settings read back from it (replay), latent and embedding files (latents), contact sheets and
plots (grid), the `verify --report` page (report), the live preview (preview).

May import the config and every layer below it. Must never import pipeline or app.
"""
