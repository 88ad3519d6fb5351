"""Image upscalers (A1111's "ESRGAN" / "R-ESRGAN" upscalers, ComfyUI's upscale models): what a file is
(``files``), the networks sdcli runs itself (``sdcli.models.esrgan``), everything else through spandrel when it
is installed, and tiled inference with blended seams (``tiled``).

May import runtime, formats and models (beside loading/ in the layers). Must never import families, control,
output, pipeline or app: an upscaler knows pixels, not prompts or models' families.
"""
