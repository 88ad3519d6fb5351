"""Image upscalers (A1111's "ESRGAN" / "R-ESRGAN" upscalers, ComfyUI's upscale models): what a file is
(``files``), the networks sdcli runs itself (``sdcli.models.esrgan``), everything else through spandrel when it
is installed, and tiled inference with blended seams (``tiled``)."""
