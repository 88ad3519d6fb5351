"""ControlNet, all of it: units as settings (settings), ControlNet files and their loading (files), the residuals
computed at sampling time (apply), and the hint preprocessors that need no network (preprocess).

May import every layer below it: runtime, formats, models, families, text, sampling and loading. Must never import
config, output, pipeline or app.
"""
