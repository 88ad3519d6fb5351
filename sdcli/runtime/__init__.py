"""What every layer may lean on: error classes and exit codes (errors), stderr output (console), device and dtype
choice and process setup (device), where sdcli keeps its own files (paths), CUDA graph replay (cuda_graphs), tiled
application of a function over an image (tiling).

The lowest layer: imports nothing from sdcli outside this package; every other package may import it.
"""
