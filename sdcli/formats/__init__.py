"""File knowledge with no family knowledge: safetensors headers (validation, sniffing, reading), the one
restricted unpickler for .ckpt/.pt/.pth, diffusers folders and rename tables, LDM key prefixes, strict loading of a
module from a weight source, hub downloads, hashing, PNG text chunks, and reading input files and images safely.

May import runtime only. Must never import models, families or anything above them: a format is read the same
whichever model it holds.
"""
