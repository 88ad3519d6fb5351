"""Writing output files safely: name templates, atomic writes, PNGs with metadata, stdout.

Rules (RELIABILITY.md "Output and environment"): never overwrite without being asked; write to a temp file in
the target's folder and rename it into place, so a crash or Ctrl-C never leaves a half-written file; a
read-only folder, a full disk or a closed pipe become an OutputError naming the path. No torch here.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import re
import stat
import string
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

from sdcli.runtime.errors import OutputError, UsageError, quote
from sdcli.output.metadata import PARAMETERS_KEY, SDCLI_EXIF_MARK, SDCLI_JSON_KEY

STDOUT = "-"
TEMPLATE_FIELDS = ("index", "seed", "prompt")
PROMPT_SLUG_MAX_CHARS = 60
PROMPT_SLUG_MAX_BYTES = 120  # file names are limited to 255 bytes on most file systems


def as_path(path: str | Path) -> Path:
    """`path` as a Path, not parsed again when it is one (a run of 100,000 images checks each name)."""
    return path if isinstance(path, Path) else Path(path)


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
    return set(_template_fields(template))


@functools.lru_cache(maxsize=256)  # a run names every image with one template: parsed once, not per image
def _template_fields(template: str) -> frozenset[str]:
    names = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UsageError(f"output template {quote(repr(template))}: {exc}") from exc
    if template.endswith(("/", os.sep)):
        raise UsageError(f"output {quote(repr(template))} names a folder; give a file name or a template, "
                         f"e.g. {template.rstrip('/' + os.sep)}/{{index}}.png")
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        _check_spec(template, name, spec or "")
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base not in TEMPLATE_FIELDS:
            raise UsageError(f"output template {quote(repr(template))}: unknown field {{{name}}}; "
                             f"use {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
        names.add(base)
    return frozenset(names)


MAX_FIELD_WIDTH = 64  # '{index:999999999d}' would build a 1 GB name before the file system refused it


def _check_spec(template: str, name: str, spec: str) -> None:
    """A field's format spec may not nest fields ('{index:{seed}d}' takes its width from the seed) nor ask
    for a width or precision past MAX_FIELD_WIDTH."""
    if "{" in spec:
        raise UsageError(f"output template {quote(repr(template))}: no fields inside {{{name}:...}}")
    numbers = [int(n) for n in re.findall(r"\d+", spec)]
    if any(n > MAX_FIELD_WIDTH for n in numbers):
        raise UsageError(f"output template {quote(repr(template))}: {{{name}:{spec}}} asks for a width over {MAX_FIELD_WIDTH}")


def expand_template(template: str, index: int, seed: int, prompt: str) -> Path:
    """'out/{seed}_{index:03d}_{prompt}.png' -> Path; the prompt is slugified so it cannot add folders."""
    used = _template_fields(template)
    slug = slugify(prompt) if "prompt" in used else ""  # not made for a name that does not show it
    try:
        return Path(template.format(index=index, seed=seed, prompt=slug))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        raise UsageError(f"output template {quote(repr(template))}: {exc}") from exc


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


# --- the target: only a regular file may be replaced --------------------------------------------------------

NAME_MAX_BYTES = 255  # the longest file name ext4, XFS, btrfs, APFS and NTFS accept

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _not_regular(path: Path) -> str | None:
    """What is at `path` when it is something other than a regular file (None: absent or a regular file).
    A symbolic link counts as itself: renaming over it would replace the link, and `-o link-to-/dev/null` must
    not be a way to reach a device."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"{path}: cannot check the target ({exc.strerror or exc})") from None
    if stat.S_ISREG(st.st_mode):
        return None
    if not stat.S_ISLNK(st.st_mode):
        return _kind(st.st_mode)
    try:
        points_to = os.stat(path).st_mode
    except OSError:
        return "a symbolic link that points nowhere"
    return "a symbolic link to " + ("a regular file" if stat.S_ISREG(points_to) else _kind(points_to))


def check_target(path: str | Path, overwrite: bool) -> None:
    """Refuse an output target up front (before any work): a name too long for the file system, a folder, a
    device, pipe, socket or link (never replaced, --overwrite or not), an existing file without --overwrite."""
    if str(path) == STDOUT:
        return
    path = as_path(path)
    if len(path.name.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
        raise OutputError(f"{str(path)[:60]}...: the file name is {len(path.name.encode('utf-8', 'surrogateescape'))}"
                          f" bytes; file systems allow at most {NAME_MAX_BYTES}")
    other = _not_regular(path)
    if other == "a folder":
        raise OutputError(f"{path}: is a folder; give a file name (e.g. {path / '{index}.png'})")
    if other is not None:
        raise OutputError(f"{path}: is {other}; sdcli only ever replaces regular files")
    if not overwrite and os.path.lexists(path):
        raise OutputError(f"{path} exists; pass --overwrite to replace it")


# --- temp files ---------------------------------------------------------------------------------------------

TEMP_MARK = "sdcli"
# .NAME.sdcli-PID-RANDOM.tmp; NAME is cut so that the temp name fits in NAME_MAX_BYTES too
_TEMP_RE = re.compile(r"^\..*\." + TEMP_MARK + r"-(\d+)-[A-Za-z0-9_]+\.tmp$", re.S)
STALE_AFTER_S = 15 * 60  # a temp file lives for the milliseconds of one write; older ones were left by a kill
DEAD_PID_GRACE_S = 60  # ... or its writer is gone (a grace period: another machine on a shared folder)
_swept: set[str] = set()


def _temp_prefix(name: str) -> str:
    cut = name
    while len(cut.encode("utf-8", "surrogateescape")) > 120:
        cut = cut[:-1]
    return f".{cut}.{TEMP_MARK}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's live process (or a number no process can have)
    return True


def _is_stale(entry: os.DirEntry, now: float) -> bool:
    match = _TEMP_RE.match(entry.name)
    if match is None:
        return False
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    age = now - st.st_mtime
    return age > STALE_AFTER_S or (age > DEAD_PID_GRACE_S and not _pid_alive(int(match.group(1))))


def sweep_stale_temps(folder: Path) -> list[str]:
    """Remove temp files of our own naming that a killed run (SIGKILL, power loss) left in `folder`; once per
    folder and process. Best effort: a folder we cannot list or a file we cannot remove is left as it is."""
    key = os.path.abspath(folder)
    if key in _swept:
        return []
    _swept.add(key)
    removed, now = [], time.time()
    try:
        with os.scandir(folder) as entries:
            stale = [e.path for e in entries if _is_stale(e, now)]
    except OSError:
        return []
    for tmp in stale:
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _write_temp(folder: Path, name: str, data: bytes) -> str:
    """Write `data` to a new temp file in `folder` (same file system, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(name), suffix=".tmp", dir=folder)
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


# --- publishing ---------------------------------------------------------------------------------------------

_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _publish_new(tmp: str, path: Path) -> None:
    """Give the finished temp file the name `path`, failing if that name exists, whoever made it meanwhile: a
    hard link cannot replace a name (two runs racing for one name: exactly one wins)."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise OutputError(f"{path} exists; pass --overwrite to replace it") from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    # No hard links here (FAT, some network and FUSE file systems): reserve the name with O_EXCL, which also
    # fails if it exists, then rename the finished file over our own empty reservation.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _file_mode())
    except FileExistsError:
        raise OutputError(f"{path} exists; pass --overwrite to replace it") from None
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(str(path))
        raise


def _publish_replace(tmp: str, path: Path) -> None:
    """--overwrite: rename over the target, checked again just before (it must still be absent or a regular file)."""
    other = _not_regular(path)
    if other is not None:
        raise OutputError(f"{path}: is {other}; sdcli only ever replaces regular files")
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write `data` to `path` atomically ('-' = stdout). Refuses an existing target unless overwrite, and
    anything but a regular file always."""
    if str(path) == STDOUT:
        return _write_stdout(data)
    path = Path(path)
    check_target(path, overwrite)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temps(path.parent)
        tmp = _write_temp(path.parent, path.name, data)
        (_publish_replace if overwrite else _publish_new)(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        # On success the name was moved or linked to the target; on any exception (a signal included) the temp
        # file must not stay.
        if tmp is not None and os.path.lexists(tmp):
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


# -o's extension -> the format written (stdout: PNG). JPEG and WebP carry the parameters as A1111 writes them
# (modules/images.py save_image_with_geninfo: EXIF UserComment, "UNICODE\0" then UTF-16 big-endian, as piexif's
# UserComment.dump(encoding="unicode")), and sdcli's JSON in the Exif MakerNote after SDCLI_EXIF_MARK.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
DEFAULT_QUALITY = 90  # --quality for JPEG and WebP (A1111's default is 80); WebP at 100 is lossless


def image_format(path: Path | str) -> str:
    """"PNG", "JPEG" or "WEBP" from the name's extension (stdout: PNG); UsageError naming the supported ones."""
    if str(path) == STDOUT:
        return "PNG"
    suffix = as_path(path).suffix.lower()
    if suffix in IMAGE_FORMATS:
        return IMAGE_FORMATS[suffix]
    what = f"{suffix!r} is not one of them" if suffix else "the name has none"
    raise UsageError(f"-o {path}: the extension names the image format, .png, .jpg (.jpeg) or .webp; {what}")


def image_bytes(img, infotext: str, meta: dict, fmt: str = "PNG", quality: int = DEFAULT_QUALITY) -> bytes:
    """The image file's bytes in `fmt`, with the parameters and our metadata where that format keeps them."""
    if fmt == "PNG":
        return png_bytes(img, infotext, meta)
    from PIL import Image

    meta = {**meta, "file": {"format": fmt, "quality": quality}}  # verify encodes its re-render the same way
    exif = Image.Exif()
    exif[0x8769] = {  # the Exif IFD: UserComment, MakerNote
        0x9286: b"UNICODE\0" + infotext.encode("utf-16-be"),
        0x927C: SDCLI_EXIF_MARK + json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8"),
    }
    buf = io.BytesIO()
    options = {"lossless": True} if fmt == "WEBP" and quality >= 100 else {"quality": quality}
    img.convert("RGB").save(buf, format=fmt, exif=exif.tobytes(), **options)
    return buf.getvalue()


def save_png(img, path: Path | str, infotext: str, meta: dict, overwrite: bool = False) -> Path:
    """Save `img` as a PNG with metadata, atomically; '-' writes the PNG bytes to stdout."""
    return atomic_write_bytes(path, png_bytes(img, infotext, meta), overwrite=overwrite)
