"""Textual-inversion embeddings: reading the files, finding them in a folder, and placing them in a prompt.

Formats (as A1111 ``textual_inversion.py`` ``load_from_file`` / ``create_embedding_from_data`` reads them):
* A1111 ``.pt``: ``{"string_to_param": {"*": Tensor[n, d]}, "name", "step", ...}`` (exactly one entry; very old
  files hold a ``torch.nn.ParameterDict`` there, which we read as plain data, never as a module);
* ``.safetensors`` / ``.bin`` with a single tensor under any key (kohya ``emb_params``, diffusers
  ``learned_embeds`` ``{"<token>": Tensor[d] or [n, d]}``): the key is NOT the trigger, the file stem is;
* SDXL ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.
Pickles are read only through the one restricted loader (formats/pickle_ckpt.load_pickle): tensors, dicts, lists,
strings and numbers.

An embedding's ``vectors`` maps an encoder key to its rows: ``"clip_l"`` / ``"clip_g"`` for SDXL files, and
``ANY_ENCODER`` ("*") for single-tensor files, which A1111 gives to any one-encoder model of the right width.
``fit`` checks them against the model's encoders ({"clip_l": 768} for SD1, {"clip_h": 1024} for SD2,
{"clip_l": 768, "clip_g": 1280} for SDXL) and says why an embedding is skipped instead of raising.

In the prompt (A1111 ``sd_hijack_clip.py`` ``tokenize_line``, ``find_embedding_at_position``; ComfyUI
``sd1_clip.py``): an embedding is triggered by the BPE id sequence of its name inside one weighted text piece
(so ``myemb`` inside ``xmyembx`` does not trigger), longest name first, or by ComfyUI's ``embedding:NAME``.
It becomes n placeholder ids (0) carrying the piece's weight, is never split across a 75-token chunk (it moves
whole to the next one), and its vectors replace the token embeddings at those places (``prompts.PromptChunk.fixes``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdcli.runtime.errors import BadInputError
from sdcli.formats.pickle_ckpt import ParameterDictData, load_pickle
from sdcli.text.prompts import Slot

ANY_ENCODER = "*"
SDXL_KEYS = ("clip_l", "clip_g")
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str  # the file stem: the trigger word
    path: Path
    vectors: dict[str, Tensor]  # encoder key ("clip_l", "clip_g" or ANY_ENCODER) -> (n, width) float32
    sha256: str  # of the whole file, as A1111 hashes embeddings

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def short_hash(self) -> str:
        """The 12 hex digits A1111 writes in ``TI hashes: "name: hash, ..."``."""
        return self.sha256[:12]


@dataclass(frozen=True)
class Skipped:
    """An embedding that does not fit the model: A1111 lists these as skipped, it is not an error."""

    name: str
    path: Path
    reason: str


# ----------------------------------------------------------------------------------------------------------
# Reading one file


def _load_data(path: Path) -> Any:
    if path.stat().st_size == 0:
        raise BadInputError(f"{path}: the embedding file is empty")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        from sdcli.formats.safetensors import read_header

        read_header(path)  # one clear line for truncated, HTML, LFS-pointer and renamed-pickle files
        return load_file(str(path))
    return load_pickle(path, "embedding")


def _as_rows(t: Any, path: Path, what: str) -> Tensor:
    if isinstance(t, torch.nn.Parameter):
        t = t.data
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise BadInputError(f"{path}: {what} is not a float tensor ({type(t).__name__})")
    if t.dim() == 1:
        t = t[None]  # a diffusers single-vector embedding: (d,) -> (1, d)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise BadInputError(f"{path}: {what} has shape {list(t.shape)}, expected (vectors, width)")
    if not bool(torch.isfinite(t).all()):
        raise BadInputError(f"{path}: {what} holds NaN or Inf")
    return t.detach().to(torch.float32).contiguous()


def vectors_from_data(data: Any, path: Path) -> dict[str, Tensor]:
    """The encoder-key -> rows mapping of a loaded embedding file (A1111's three cases, in its order)."""
    if not isinstance(data, dict) or not data:
        raise BadInputError(f"{path}: not an embedding (expected a dict of tensors, got {type(data).__name__})")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = params.parameters if isinstance(params, ParameterDictData) else params
        if not isinstance(params, dict) or len(params) != 1:
            raise BadInputError(f"{path}: string_to_param must hold exactly one embedding")
        return {ANY_ENCODER: _as_rows(next(iter(params.values())), path, "string_to_param")}
    if all(k in data for k in SDXL_KEYS):
        rows = {k: _as_rows(data[k], path, k) for k in SDXL_KEYS}
        if rows["clip_l"].shape[0] != rows["clip_g"].shape[0]:
            raise BadInputError(f"{path}: clip_l has {rows['clip_l'].shape[0]} vectors but clip_g "
                                f"{rows['clip_g'].shape[0]}")  # fmt: skip
        return rows
    tensors = [k for k, v in data.items() if isinstance(v, Tensor)]
    if len(data) == 1 and tensors:
        return {ANY_ENCODER: _as_rows(data[tensors[0]], path, repr(tensors[0]))}
    raise BadInputError(f"{path}: not a textual-inversion embedding (no string_to_param, no clip_l/clip_g pair, "
                        f"and not a single tensor: keys {sorted(map(str, data))[:6]})")  # fmt: skip


def read_embedding(path: str | Path) -> Embedding:
    """One embedding file; BadInputError (one line naming the file) for anything that is not one."""
    from sdcli.formats.hashing import file_sha256

    path = Path(path)
    try:
        vectors = vectors_from_data(_load_data(path), path)
        sha = file_sha256(path)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from e
    return Embedding(path.stem, path, vectors, sha)


def fit(embedding: Embedding, widths: dict[str, int]) -> Embedding | Skipped:
    """The embedding restricted to the model's encoders ({key: width}), or why it does not fit.

    A single-tensor embedding fits a one-encoder model of its width; an SDXL (clip_l/clip_g) file fits a model
    whose encoders it all covers; widths must match exactly (A1111 compares the total width)."""
    have = ", ".join(f"{k} {v.shape[1]}" for k, v in embedding.vectors.items())
    need = ", ".join(f"{k} {w}" for k, w in widths.items())
    skipped = Skipped(embedding.name, embedding.path, f"its vectors ({have}) do not fit this model ({need})")
    if ANY_ENCODER in embedding.vectors:
        if len(widths) != 1:
            return skipped
        ((key, width),) = widths.items()
        rows = embedding.vectors[ANY_ENCODER]
        return Embedding(embedding.name, embedding.path, {key: rows}, embedding.sha256) \
            if rows.shape[1] == width else skipped  # fmt: skip
    if any(embedding.vectors.get(k) is None or embedding.vectors[k].shape[1] != w for k, w in widths.items()):
        return skipped
    return Embedding(embedding.name, embedding.path, {k: embedding.vectors[k] for k in widths}, embedding.sha256)


# ----------------------------------------------------------------------------------------------------------
# Finding embeddings in a folder


@dataclass(frozen=True)
class EmbeddingFolder:
    paths: dict[str, Path]  # name (file stem) -> file, as A1111 resolves duplicates: the last one walked wins
    shadowed: list[Path] = field(default_factory=list)  # files hidden by a later one of the same name


def find_embeddings(folder: str | Path) -> EmbeddingFolder:
    """Every .pt/.bin/.safetensors under `folder` (sub-folders too, following links, as A1111's os.walk).

    Empty files are passed over as A1111 does. A1111 walks top-down and lets a later file with the same stem
    replace an earlier one, so a sub-folder's file wins over the top folder's; we walk in sorted order so the
    outcome is the same on every machine. Images (A1111's PNG/WEBP embeds, previews) are not read.

    Unlike os.walk alone, a folder reached twice (a link to itself or to a parent: a loop) is walked once, and the
    walk stops with an error past MAX_WALKED entries (a link to / or to a huge tree), instead of running on."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BadInputError(f"embeddings folder {root}: no such folder")
    paths: dict[str, Path] = {}
    shadowed: list[Path] = []
    seen: set[tuple[int, int]] = set()
    _first_visit(root, seen)
    walked = 0
    for here, dirs, files in os.walk(root, followlinks=True):
        walked += len(dirs) + len(files)
        if walked > MAX_WALKED:
            raise BadInputError(f"embeddings folder {root}: more than {MAX_WALKED:,} files and folders under it "
                                "(a link to a large tree?); give a folder of embeddings")
        dirs[:] = sorted(d for d in dirs if _first_visit(Path(here) / d, seen))
        for name in sorted(files):
            path = Path(here) / name
            if path.suffix.lower() not in EMBEDDING_SUFFIXES or not path.is_file() or path.stat().st_size == 0:
                continue
            if path.stem in paths:
                shadowed.append(paths[path.stem])
            paths[path.stem] = path
    return EmbeddingFolder(dict(sorted(paths.items(), key=lambda kv: kv[0].lower())), shadowed)


MAX_WALKED = 100_000  # files and folders under an embeddings folder (A1111's folders hold hundreds)


def _first_visit(folder: Path, seen: set[tuple[int, int]]) -> bool:
    """Whether `folder` (its real directory: device and inode) has not been walked yet; marks it walked."""
    try:
        st = folder.stat()
    except OSError:  # a dangling link or no permission: nothing to walk
        return False
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


# ----------------------------------------------------------------------------------------------------------
# Triggers in a prompt


@dataclass(frozen=True)
class EmbeddingRef:
    """ComfyUI's ``embedding:NAME`` written in the prompt text."""

    name: str


# ComfyUI splits a piece on spaces and takes a word starting with "embedding:"; trailing commas are not the name.
_REF_RE = re.compile(r"(?<!\S)embedding:([^\s]*[^\s,])")


def split_embedding_refs(text: str) -> list[str | EmbeddingRef]:
    """A weighted text piece cut into plain text and ``embedding:NAME`` references (the name: a file stem,
    optionally with its extension or a sub-folder path, as ComfyUI accepts; ``name_of_ref`` reduces it)."""
    out: list[str | EmbeddingRef] = []
    pos = 0
    for m in _REF_RE.finditer(text):
        if m.start() > pos:
            out.append(text[pos : m.start()])
        out.append(EmbeddingRef(m.group(1)))
        pos = m.end()
    if pos < len(text) or not out:
        out.append(text[pos:])
    return out


def name_of_ref(ref: EmbeddingRef) -> str:
    """``embedding:sub/foo.pt`` -> ``foo``: embeddings are named by their file stem."""
    path = Path(ref.name.replace("\\", "/"))
    return path.stem if path.suffix.lower() in EMBEDDING_SUFFIXES else path.name


TriggerTable = dict[int, list[tuple[tuple[int, ...], str]]]


def trigger_table(names: Iterable[str], encode: Callable[[str], list[int]]) -> TriggerTable:
    """Names indexed by the first id of their BPE ids, longest first (A1111 ``register_embedding_by_name``).
    Names that tokenize alike keep the order given: the first one wins, as in A1111's stable sort."""
    table: TriggerTable = {}
    for name in names:
        ids = tuple(encode(name))
        if ids:
            table.setdefault(ids[0], []).append((ids, name))
    for entries in table.values():
        entries.sort(key=lambda e: len(e[0]), reverse=True)
    return table


def find_triggers(ids: Sequence[int], table: TriggerTable) -> list[tuple[int, int, str]]:
    """(start, length, name) of each embedding triggered in one piece's ids, left to right, not overlapping."""
    found = []
    i = 0
    while i < len(ids):
        match = next(((len(t), name) for t, name in table.get(ids[i], ()) if tuple(ids[i : i + len(t)]) == t), None)
        if match is None:
            i += 1
            continue
        found.append((i, *match))
        i += match[0]
    return found


def units_of_piece(ids: Sequence[int], table: TriggerTable, n_vectors: dict[str, int]) -> list[int | Slot]:
    """A piece's ids with every triggered, usable embedding (named in `n_vectors`) replaced by its Slot; a
    trigger without a usable embedding (skipped for its width) stays as the plain words it tokenized to."""
    units: list[int | Slot] = []
    pos = 0
    for start, length, name in find_triggers(ids, table):
        if name not in n_vectors:
            continue
        units += ids[pos:start]
        units.append(Slot(name, n_vectors[name]))
        pos = start + length
    units += ids[pos:]
    return units


def units_of_text(text: str, encode: Callable[[str], list[int]], table: TriggerTable,
                  n_vectors: dict[str, int]) -> tuple[list[int | Slot], list[str]]:  # fmt: skip
    """(units, names of ``embedding:NAME`` references with no usable embedding) for one weighted text piece.
    ComfyUI drops such a reference with a warning; the caller says which."""
    units: list[int | Slot] = []
    missing: list[str] = []
    for part in split_embedding_refs(text):
        if isinstance(part, EmbeddingRef):
            name = name_of_ref(part)
            if name in n_vectors:
                units.append(Slot(name, n_vectors[name]))
            else:
                missing.append(name)
        else:
            units += units_of_piece(encode(part), table, n_vectors)
    return units, missing


def mentioned_names(text: str, encode: Callable[[str], list[int]], table: TriggerTable) -> list[str]:
    """Names a weighted text piece triggers (by BPE ids or ``embedding:NAME``), in order: the files to read
    before chunking, since a multi-vector embedding's length decides where chunks break."""
    names: list[str] = []
    for part in split_embedding_refs(text):
        if isinstance(part, EmbeddingRef):
            names.append(name_of_ref(part))
        else:
            names += [name for _, _, name in find_triggers(encode(part), table)]
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------------------------------
# One run's embeddings


class EmbeddingLibrary:
    """The embeddings folder of one run, seen through one model: what prompts.encode_prompt and describe_prompt
    ask for. Files are read when a prompt first mentions them (a folder can hold thousands), once each; one that
    does not fit the model is said once on stderr (A1111 lists it as skipped) and its name stays plain words.

    `widths`: {encoder key: width} of the model's text encoders (fit), or None to take every file as it is
    (``inspect --prompt``, which loads no model)."""

    def __init__(self, folder: str | Path | None, widths: dict[str, int] | None, encode: Callable[[str], list[int]],
                 warn: Callable[[str], None] = lambda line: None):  # fmt: skip
        self.root = Path(folder).expanduser() if folder else None
        self.folder = find_embeddings(self.root) if self.root else EmbeddingFolder({})
        self.widths, self.encode, self.warn = widths, encode, warn
        self.table = trigger_table(self.folder.paths, encode)
        self.loaded: dict[str, Embedding | Skipped] = {}
        self._warned: set[str] = set()

    def _load(self, name: str) -> Embedding | Skipped | None:
        if name not in self.loaded and name in self.folder.paths:
            emb = read_embedding(self.folder.paths[name])
            self.loaded[name] = emb if self.widths is None else fit(emb, self.widths)
        found = self.loaded.get(name)
        if isinstance(found, Skipped):
            self._warn_once(name, f"embedding {found.path}: skipped, {found.reason}")
        return found

    def _warn_once(self, name: str, line: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            self.warn(line)

    def units(self, piece: str) -> list[int | Slot]:
        """A weighted text piece as ids and embedding Slots (prompts.chunk_prompt's `units_of`)."""
        for name in mentioned_names(piece, self.encode, self.table):
            self._load(name)
        usable = {n: e.n_vectors for n, e in self.loaded.items() if isinstance(e, Embedding)}
        units, missing = units_of_text(piece, self.encode, self.table, usable)
        for name in missing:
            self._warn_once(name, f"embedding:{name} in the prompt: no usable embedding of that name "
                                  f"{'in ' + str(self.root) if self.root else '(no --embeddings-dir given)'}; "
                                  "left out")  # fmt: skip
        return units

    def get(self, name: str) -> Embedding:
        found = self.loaded[name]
        assert isinstance(found, Embedding), name  # units() only places usable embeddings
        return found

    def rows(self, name: str, key: str) -> Tensor:
        """The (n, width) vectors of `name` for the text encoder `key` (SDXL: clip_l to encoder 1, clip_g to 2)."""
        vectors = self.get(name).vectors
        return vectors[key] if key in vectors else vectors[ANY_ENCODER]

    def describe(self, name: str) -> dict[str, Any]:
        emb = self.get(name)
        return {"name": emb.name, "vectors": emb.n_vectors, "file": str(emb.path), "sha256": emb.sha256}

    def used_in(self, texts: Iterable[str]) -> list[Embedding]:
        """The embeddings these prompt texts place (after A1111 attention parsing), in order of first use."""
        from sdcli.text.prompts import BREAK, parse_attention

        names: dict[str, None] = {}
        for text in texts:
            for piece, weight in parse_attention(text):
                if (piece, weight) != BREAK:
                    names.update((u.name, None) for u in self.units(piece) if isinstance(u, Slot))
        return [self.get(n) for n in names]
