"""Writing output files safely: name templates, atomic writes, PNGs with metadata, stdout.

Rules (RELIABILITY.md "Output and environment"): never overwrite without being asked; write to a temp file in
the target's folder and rename it into place, so a crash or Ctrl-C never leaves a half-written file; a
read-only folder, a full disk or a closed pipe become an OutputError naming the path. No torch here.
"""

from __future__ import annotations

import io
import json
import os
import re
import string
import sys
import tempfile
import unicodedata
from pathlib import Path

from sdcli.errors import OutputError, UsageError
from sdcli.metadata import PARAMETERS_KEY, SDCLI_JSON_KEY

STDOUT = "-"
TEMPLATE_FIELDS = ("index", "seed", "prompt")
PROMPT_SLUG_MAX_CHARS = 60
PROMPT_SLUG_MAX_BYTES = 120  # file names are limited to 255 bytes on most file systems


def slugify(text: str) -> str:
    """A prompt as a file-name fragment: letters/digits/'-' kept, the rest '_', length-capped, never empty."""
    text = unicodedata.normalize("NFKC", text)
    slug = re.sub(r"[^\w\-]+", "_", text, flags=re.UNICODE).strip("._-")
    slug = slug[:PROMPT_SLUG_MAX_CHARS]
    while len(slug.encode("utf-8")) > PROMPT_SLUG_MAX_BYTES:
        slug = slug[:-1]
    return slug.strip("._-") or "untitled"


def template_fields(template: str) -> set[str]:
    """Names of the {fields} a template uses; UsageError for positional or unknown ones."""
    names = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UsageError(f"output template {template!r}: {exc}") from exc
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base not in TEMPLATE_FIELDS:
            raise UsageError(f"output template {template!r}: unknown field {{{name}}}; "
                             f"use {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
        names.add(base)
    return names


def expand_template(template: str, index: int, seed: int, prompt: str) -> Path:
    """'out/{seed}_{index:03d}_{prompt}.png' -> Path; the prompt is slugified so it cannot add folders."""
    template_fields(template)
    try:
        return Path(template.format(index=index, seed=seed, prompt=slugify(prompt)))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        raise UsageError(f"output template {template!r}: {exc}") from exc


def _write_stdout(data: bytes) -> Path:
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError as exc:
        raise OutputError("stdout: the pipe was closed before the output was written") from exc
    return Path(STDOUT)


def _file_mode() -> int:
    """The permissions a plain open() would give (mkstemp makes 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_temp(folder: Path, name: str, data: bytes) -> str:
    """Write `data` to a new temp file in `folder` (same file system, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write `data` to `path` atomically ('-' = stdout). Refuses an existing target unless overwrite."""
    if str(path) == STDOUT:
        return _write_stdout(data)
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists (pass --overwrite to replace it)")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temp(path.parent, path.name, data)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        # On success the temp file was renamed away; on any exception (Ctrl-C included) it must not stay.
        if tmp is not None and os.path.exists(tmp):
            _remove(tmp)
    return path


def _is_latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def png_bytes(img, infotext: str, meta: dict) -> bytes:
    """Encode a PIL image as PNG with the A1111 `parameters` text and our JSON metadata chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    # tEXt is Latin-1 only (PNG spec); A1111 switches to iTXt (UTF-8) for other text, readers accept both.
    if _is_latin1(infotext):
        info.add_text(PARAMETERS_KEY, infotext)
    else:
        info.add_itxt(PARAMETERS_KEY, infotext)
    info.add_itxt(SDCLI_JSON_KEY, json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(img, path: Path | str, infotext: str, meta: dict, overwrite: bool = False) -> Path:
    """Save `img` as a PNG with metadata, atomically; '-' writes the PNG bytes to stdout."""
    return atomic_write_bytes(path, png_bytes(img, infotext, meta), overwrite=overwrite)
