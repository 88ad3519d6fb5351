"""A1111 prompt syntax: attention weights, 75-token chunks, BREAK, and the weighted text encoding.

Semantics follow AUTOMATIC1111 stable-diffusion-webui (our own code, written from reading theirs):
* ``parse_attention``: ``modules/prompt_parser.py`` ``parse_prompt_attention``;
* ``chunk_prompt``: ``modules/sd_hijack_clip.py`` ``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line``
  (75 tokens per chunk, comma backtrack of 20 tokens, BREAK) and ``process_tokens`` (SD2 padding);
* ``encode_prompt``: ``modules/sd_emphasis.py`` ``EmphasisOriginal`` (weights, then mean restored);
* ``encode_pair``: ``modules/sd_samplers_cfg_denoiser.py`` ``pad_cond_uncond`` (the shorter of cond and
  uncond is extended by the empty prompt's embedding, one chunk at a time).

``split_extra_networks``: ``modules/extra_networks.py`` ``parse_prompt`` (``<lora:NAME:WEIGHT>`` tags are taken out
of the prompt text and name LoRA files; other kinds of network are refused rather than read as words).

One deliberate difference: A1111 marks BREAK with a weight of -1 and recognises it by that weight, so
"(a BREAK b)" encodes the word "BREAK" with weight -1.1 and any text weighted exactly -1 ("(cat:-1)") would be taken
for a BREAK. Here the marker is its own object (``BREAK``, recognised by identity, never by its weight): it starts a
new chunk wherever it appears, and "(cat:-1)" is the word cat weighted -1.

Weights are bounded (``MAX_WEIGHT``): A1111 accepts any number, but a weight like 1e60 overflows the text
encoding into NaN, which would surface as a numerical failure blamed on the model.

No torch at import: ``sdcli inspect --prompt`` only parses and tokenizes.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

from sdcli.runtime.errors import BadInputError, UnsupportedModelError, quote

CHUNK_LENGTH = 75  # prompt tokens per chunk; with bos and eos a chunk is CLIP's 77
COMMA_BACKTRACK = 20  # A1111 opts.comma_padding_backtrack default
ROUND_MULT = 1.1
SQUARE_MULT = 1 / 1.1
MAX_WEIGHT = 100.0  # |weight| of any token; fp16 text features (|z| up to ~30) stay far from overflow


class _BreakMarker(tuple):
    """The one BREAK marker: compares equal to ("BREAK", -1.0) for readers, but code tests `is BREAK`."""


BREAK = _BreakMarker(("BREAK", -1.0))

# Alternatives in order, as A1111's re_attention (modules/prompt_parser.py, current master): escapes, a lone
# backslash, brackets, ":weight)" (spaces allowed around the number: "(word: 1.5 )"), plain text, a stray ":".
_ATTENTION_RE = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)


_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^<>]*)>")  # A1111's re_extra_net


@dataclass(frozen=True)
class PromptLora:
    name: str  # a file stem under lora_dir, or a path
    weight: float


def split_extra_networks(prompt: str) -> tuple[str, list[PromptLora]]:
    """(the prompt without its ``<lora:NAME[:WEIGHT]>`` tags, those LoRAs in order). As in A1111 the tag's text
    is simply removed, so "a cat, <lora:x:0.8>" encodes "a cat, "."""
    loras: list[PromptLora] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), [a.strip() for a in match.group(2).split(":")]
        tag = quote(match.group(0))
        if kind.lower() != "lora":
            raise UnsupportedModelError(f"prompt tag {tag}: only <lora:NAME[:WEIGHT]> is supported, "
                                        f"not A1111 '{quote(kind, 60)}' networks")  # fmt: skip
        if not args[0]:
            raise BadInputError(f"prompt tag {tag}: no LoRA name")
        if len(args) > 2:
            raise UnsupportedModelError(f"prompt tag {tag}: separate text-encoder/UNet weights are not "
                                        "supported; use <lora:NAME:WEIGHT>")  # fmt: skip
        try:
            weight = float(args[1]) if len(args) == 2 else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise BadInputError(f"prompt tag {tag}: the weight must be a finite number")
        loras.append(PromptLora(args[0], weight))
        return ""

    return _EXTRA_NETWORK_RE.sub(take, prompt), loras


def _weight(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:  # "[.\d]+" also matches "1.2.3"; A1111 crashes here
        raise BadInputError(f"prompt weight ':{quote(value, 60)})' is not a number in: {_short(text)}") from None


def _attention_pieces(text: str) -> tuple[list[list], list[int], list[int]]:
    """Scan brackets; return [text, weight] pieces and the opening positions left unclosed."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, mult: float) -> None:
        for piece in res[start:]:
            if piece is not BREAK:  # the marker has no weight to scale (see the module docstring)
                piece[1] *= mult

    for m in _ATTENTION_RE.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight, text))
        elif tok == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULT)
        elif tok == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULT)
        else:  # plain text, or a closing bracket / ":w)" with nothing open: kept as text
            for i, part in enumerate(_BREAK_RE.split(tok)):
                if i > 0:
                    res.append(BREAK)
                res.append([part, 1.0])
    # Unclosed brackets still apply, to everything after them (A1111: "(unbalanced" -> 1.1).
    for pos in round_open:
        multiply_from(pos, ROUND_MULT)
    for pos in square_open:
        multiply_from(pos, SQUARE_MULT)
    return res, round_open, square_open


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; BREAK becomes the marker ("BREAK", -1.0).

    "(a)" x1.1, "((a))" x1.21, "(a:1.3)" x1.3, "[a]" /1.1, "\\(" a literal bracket; runs with equal
    weights are merged, and an empty prompt gives [("", 1.0)].
    """
    res, _, _ = _attention_pieces(text)
    if not res:
        res = [["", 1.0]]
    merged: list = [res[0]]
    for piece in res[1:]:
        last = merged[-1]
        if piece is not BREAK and last is not BREAK and piece[1] == last[1]:
            last[0] += piece[0]
        else:
            merged.append(piece)
    out = [BREAK if p is BREAK else (p[0], float(p[1])) for p in merged]
    _check_weights(out, text)
    return out


def _check_weights(pieces: list, text: str) -> None:
    for piece in pieces:
        if piece is not BREAK and not (math.isfinite(piece[1]) and abs(piece[1]) <= MAX_WEIGHT):
            raise BadInputError(f"prompt weight {piece[1]:g} of {quote(repr(piece[0]), 80)} is out of range "
                                f"(-{MAX_WEIGHT:g} to {MAX_WEIGHT:g}) in: {_short(text)}")


def _short(text: str) -> str:
    return quote(text, 80)


def check_prompt(text: str, where: str | None = None, steps: int = 20, tags: bool = True) -> str:
    """Everything that can be wrong in a prompt, found before the model loads: text that is not valid UTF-8
    (lone surrogates from undecodable bytes), <lora:...> tags (when `tags`: a negative prompt has none), and
    the attention weights of every text its [from:to:when] schedule produces. Errors keep their class and are
    prefixed with `where` (a FILE:LINE, or a file's key)."""
    from sdcli.text.editing import prompt_schedule

    try:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadInputError(f"not valid UTF-8 text (byte {e.object[e.start]!r} at character {e.start + 1})"
                                ) from None
        plain = split_extra_networks(text)[0] if tags else text
        for scheduled in {t for _, t in prompt_schedule(plain, steps)}:
            if "(" in scheduled:  # only a round bracket sets a weight that can be bad (1.1 up, ':W)' or not
                parse_attention(scheduled)  # a number); '[' divides by 1.1: a 100,000-line file skips most
    except (BadInputError, UnsupportedModelError) as e:
        if where is None:
            raise
        raise type(e)(f"{where}: {e}") from None
    return text


# --- chunks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """A textual-inversion embedding's place in a prompt's token stream: `n_vectors` placeholder ids, kept
    together in one chunk (embeddings.py finds them; the chunker only needs the name and the length)."""

    name: str
    n_vectors: int


PLACEHOLDER_ID = 0  # A1111 fills an embedding's places with id 0 ("!"); the text encoder replaces those rows


@dataclass
class PromptChunk:
    """One CLIP window: 77 ids (bos, up to 75 prompt tokens, eos, padding) and a weight per id.

    ``fixes``: (offset, name) of each embedding in the chunk, offset counted in prompt tokens, so the rows
    ``offset + 1 ... offset + n`` of the window (after bos) take the embedding's vectors."""

    ids: list[int]
    weights: list[float]
    n_tokens: int = 0  # prompt tokens in this chunk (not counting bos, eos, padding)
    fixes: list[tuple[int, str]] = field(default_factory=list)


@functools.lru_cache(maxsize=8)  # a chunker per prompt; the tokenizers are the run's few, held for good anyway
def _comma_id(tokenizer) -> int:
    return tokenizer.encode(",")[0]


class _Chunker:
    """A1111 tokenize_line: fill 75-token chunks; at a full chunk, move the text after a comma that is at most 20
    tokens back into the next chunk so phrases are not cut in half. An embedding (Slot) moves whole to the next
    chunk when it does not fit, and the comma backtrack carries the embeddings it moves (A1111 leaves them
    behind, a bug)."""

    def __init__(self, tokenizer, pad_id: int):
        self.tok, self.pad_id = tokenizer, pad_id
        self.comma_id = _comma_id(tokenizer)
        self.chunks: list[PromptChunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, str]] = []
        self.last_comma = -1

    def close(self) -> None:
        """Pad the open chunk to 75 with eos, wrap it in bos/eos, then SD2's pad after the first eos."""
        n = len(self.ids)
        ids = [self.tok.bos_id, *self.ids, *[self.tok.eos_id] * (CHUNK_LENGTH - n), self.tok.eos_id]
        first_eos = ids.index(self.tok.eos_id)
        ids[first_eos + 1 :] = [self.pad_id] * (len(ids) - first_eos - 1)
        weights = [1.0, *self.weights, *[1.0] * (CHUNK_LENGTH - n), 1.0]
        self.chunks.append(PromptChunk(ids, weights, n, self.fixes))
        self.ids, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def _backtrack(self) -> None:
        """Full chunk and a comma at most 20 tokens back: the text after it starts the next chunk."""
        cut = self.last_comma + 1
        moved = self.ids[cut:], self.weights[cut:], [(o - cut, n) for o, n in self.fixes if o >= cut]
        self.ids, self.weights = self.ids[:cut], self.weights[:cut]
        self.fixes = [(o, n) for o, n in self.fixes if o < cut]
        self.close()
        self.ids, self.weights, self.fixes = moved

    def add(self, unit: int | Slot, weight: float) -> None:
        n = len(self.ids)
        if unit == self.comma_id:
            self.last_comma = n
        elif n == CHUNK_LENGTH and self.last_comma != -1 and CHUNK_LENGTH - self.last_comma <= COMMA_BACKTRACK:
            self._backtrack()
        if len(self.ids) == CHUNK_LENGTH:
            self.close()
        if isinstance(unit, Slot):
            self._add_slot(unit, weight)
        else:
            self.ids.append(unit)
            self.weights.append(weight)

    def _add_slot(self, slot: Slot, weight: float) -> None:
        if slot.n_vectors > CHUNK_LENGTH:
            raise BadInputError(f"embedding {slot.name} has {slot.n_vectors} vectors: more than the "
                                f"{CHUNK_LENGTH} tokens of a prompt chunk")  # fmt: skip
        if len(self.ids) + slot.n_vectors > CHUNK_LENGTH:
            self.close()
        self.fixes.append((len(self.ids), slot.name))
        self.ids += [PLACEHOLDER_ID] * slot.n_vectors
        self.weights += [weight] * slot.n_vectors


def chunk_prompt(text: str, tokenizer, pad_id: int, units_of=None) -> list[PromptChunk]:
    """Token chunks of a prompt as A1111 builds them: at least one; BREAK closes the current chunk
    (even an empty one); an empty prompt gives bos, eos, then padding. `units_of(piece)` turns a weighted text
    piece into ids and embedding Slots (embeddings.EmbeddingLibrary.units); without it, the tokenizer's ids."""
    units_of = units_of or tokenizer.encode
    pieces = (None if item is BREAK else (units_of(item[0]), item[1]) for item in parse_attention(text))
    return chunk_units(pieces, tokenizer, pad_id)


def chunk_units(pieces, tokenizer, pad_id: int) -> list[PromptChunk]:
    """Chunks of weighted pieces already cut into units, (ids and Slots, weight), None for a BREAK."""
    chunker = _Chunker(tokenizer, pad_id)
    for piece in pieces:
        if piece is None:
            chunker.close()
            continue
        units, weight = piece
        for unit in units:
            chunker.add(unit, weight)
    if chunker.ids or not chunker.chunks:
        chunker.close()
    return chunker.chunks


# --- encoding ------------------------------------------------------------------------------------


def _device_of(encoder):
    """Where the encoder's weights live (a plain callable without parameters: the CPU)."""
    params = getattr(encoder, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return None


def _apply_weights(z, weights):
    """A1111 EmphasisOriginal, per chunk: scale each token's vector by its weight, then rescale the
    chunk so its overall mean is what it was before weighting.

    z (n, 77, D), weights (n, 77). Chunks whose weights are all 1 are returned untouched, so an
    unweighted prompt encodes exactly as without this step (and a zero mean cannot divide by 0).
    """
    import torch

    plain = (weights == 1).all(dim=1)  # (n,)
    if bool(plain.all()):
        return z
    w = weights.to(device=z.device, dtype=z.dtype)[..., None]  # (n, 77, 1)
    original_mean = z.float().mean(dim=(1, 2), keepdim=True)  # (n, 1, 1)
    weighted = z * w  # (n, 77, D), a new tensor: the encoder's output is not modified
    new_mean = weighted.float().mean(dim=(1, 2), keepdim=True)
    scale = (original_mean / new_mean).to(z.dtype)
    out = weighted * scale
    return torch.where(plain[:, None, None].to(z.device), z, out)


def encode_prompt(text: str, encoder, tokenizer, pad_id: int, clip_skip: int = 1, embeddings=None, key: str = ""):
    """Encode a prompt of any length: (1, 77 * n_chunks, D), chunks encoded independently and
    concatenated along the token axis, with A1111's weighting and mean restoration.

    `embeddings` (embeddings.EmbeddingLibrary, or None): textual-inversion embeddings the prompt may trigger;
    their rows for encoder `key` ("clip_l", "clip_g", "clip_h") replace the placeholder ids' token embeddings."""
    def run(ids, fixes):
        return encoder(ids, clip_skip, fixes) if fixes else encoder(ids, clip_skip)  # (n, 77, D)

    return _encode_chunks(text, encoder, tokenizer, pad_id, embeddings, key, run)


def _encode_chunks(text: str, encoder, tokenizer, pad_id: int, embeddings, key: str, run):
    """The prompt's 77-token windows through `run(ids (n, 77), fixes) -> (n, 77, D)`, weighted, concatenated."""
    import torch

    chunks = chunk_prompt(text, tokenizer, pad_id, embeddings.units if embeddings is not None else None)
    device = _device_of(encoder)
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=device)  # (n, 77)
    weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32)  # (n, 77)
    fixes = [(k, offset + 1, embeddings.rows(name, key))  # +1: the window starts with bos
             for k, c in enumerate(chunks) for offset, name in c.fixes]
    z = run(ids, fixes)  # (n, 77, D)
    z = _apply_weights(z, weights)
    return z.reshape(1, -1, z.shape[-1])  # (1, 77 * n, D)


def encode_with(text: str, encoders, specs, tokenizer, clip_skip: int = 1, embeddings=None):
    """(context (1, 77 * n, sum of widths), pooled (1, P) or None) of a prompt for a family's text encoders
    (`specs`: families/base.TextEncoderSpec, one per encoder). As A1111 does for SDXL, each encoder chunks the
    prompt itself (the same tokens, its own pad id), is weighted on its own (EmphasisOriginal per encoder), and
    the chunks' contexts are concatenated along the channels; the pooled vector is the first chunk's, unweighted.
    A single-encoder family encodes with encode_prompt. `embeddings`: as for encode_prompt, each encoder taking
    the rows of its own key (SDXL: clip_l, clip_g)."""
    import torch

    contexts, pooled = [], None
    for encoder, spec in zip(encoders, specs, strict=True):
        if spec.hidden_layer != "penultimate-raw":
            contexts.append(encode_prompt(text, encoder, tokenizer, spec.pad_id, clip_skip, embeddings,
                                          spec.embedding_key))
            continue

        def run(ids, fixes, encoder=encoder, spec=spec):  # SDXL: penultimate state, no final norm; no clip skip
            nonlocal pooled
            z, chunk_pooled = encoder.encode_xl(ids, -2, fixes or None)  # (n, 77, D), (n, P) or None
            pooled = chunk_pooled[:1] if spec.pooled else pooled
            return z

        contexts.append(_encode_chunks(text, encoder, tokenizer, spec.pad_id, embeddings, spec.embedding_key, run))
    return (contexts[0] if len(contexts) == 1 else torch.cat(contexts, dim=-1)), pooled


def encode_pair(prompt: str, negative: str, encoder, tokenizer, pad_id: int, clip_skip: int = 1, embeddings=None,
                key: str = ""):
    """(cond, uncond) with the same number of chunks, so they batch together for CFG: the shorter
    one is extended by the empty prompt's embedding, repeated (A1111 pad_cond_uncond)."""
    def encode(text: str):
        return encode_prompt(text, encoder, tokenizer, pad_id, clip_skip, embeddings, key)

    cond = encode(prompt)  # (1, 77 * a, D)
    uncond = encode(negative)  # (1, 77 * b, D)
    return pad_chunks(cond, uncond, lambda: encode(""))


def pad_chunks(cond, uncond, empty):
    """(cond, uncond) with the same number of 77-token chunks: the shorter one is extended by the empty prompt's
    embedding `empty()` (1, 77, D), repeated (A1111 pad_cond_uncond). The one padding rule of sdcli."""
    import torch

    missing = (cond.shape[1] - uncond.shape[1]) // (CHUNK_LENGTH + 2)
    if missing == 0:
        return cond, uncond
    pad = empty().to(uncond)  # (1, 77, D)
    if missing > 0:
        return cond, torch.cat([uncond, pad.repeat(1, missing, 1)], dim=1)
    return torch.cat([cond, pad.repeat(1, -missing, 1)], dim=1), uncond


def describe_prompt(text: str, tokenizer, pad_id: int, embeddings=None, arrays: bool = True) -> dict:
    """What ``sdcli inspect --prompt`` shows: the parsed weights, the tokens, the 77-id chunks, and the
    textual-inversion embeddings the prompt triggers (`embeddings`: an embeddings.EmbeddingLibrary, or None).
    Without `arrays` the chunks leave out their padded ids and weights (--dry-run does not show them: 154
    numbers a job, rounded one by one)."""
    parsed = parse_attention(text)
    chunks = chunk_prompt(text, tokenizer, pad_id, embeddings.units if embeddings is not None else None)
    prompt_ids = [i for c in chunks for i in c.ids[1 : 1 + c.n_tokens]]
    used = [embeddings.describe(name) for name in dict.fromkeys(n for c in chunks for _, n in c.fixes)]
    lengths = {e["name"]: e["vectors"] for e in used}
    return {
        "text": text,
        "parsed": [{"text": t, "weight": round(w, 6)} for t, w in parsed],
        "n_tokens": len(prompt_ids),
        "n_chunks": len(chunks),
        "tokens": [t for c in chunks for t in _token_names(c, tokenizer, lengths)],
        "ids": [tokenizer.bos_id, *prompt_ids, tokenizer.eos_id],
        "embeddings": used,
        "chunks": [_chunk_report(c, tokenizer, lengths, arrays) for c in chunks],
    }


def _chunk_report(chunk: PromptChunk, tokenizer, lengths: dict[str, int], arrays: bool) -> dict:
    report = {"n_tokens": chunk.n_tokens}
    if arrays:
        report["ids"] = chunk.ids
    report["tokens"] = _token_names(chunk, tokenizer, lengths)
    if arrays:
        report["weights"] = [round(w, 6) for w in chunk.weights]
    report["embeddings"] = [{"offset": offset, "name": name} for offset, name in chunk.fixes]
    return report


def _token_names(chunk: PromptChunk, tokenizer, lengths: dict[str, int]) -> list[str]:
    """The chunk's prompt tokens as text; an embedding's places show as <NAME>, <NAME#1>, ..."""
    names = [tokenizer.id_to_token(i) for i in chunk.ids[1 : 1 + chunk.n_tokens]]
    for offset, name in chunk.fixes:
        for k in range(lengths[name]):
            names[offset + k] = f"<{name}>" if k == 0 else f"<{name}#{k}>"
    return names


# --- text encoders of the flow transformers (SD3, FLUX): CLIP windows and a T5 sequence ---------------------------


def t5_units(text: str, tokenizer, length: int) -> tuple[list[int], list[float]]:
    """(ids, weights) of a prompt for T5, `length` long: the attention-weighted pieces tokenized one by one (each
    without its surrounding spaces, so an unweighted prompt gives exactly the tokenizer's ids of the whole text),
    truncated to keep the end token, then padded. BREAK has no meaning for a single T5 sequence: it only
    separates pieces. Weights as Forge's T5 engine (A1111's EmphasisOriginal on T5 tokens)."""
    from sdcli.text.t5_tokenizer import EOS_ID, PAD_ID

    pieces = [item for item in parse_attention(text) if item is not BREAK and item[0].strip()]
    ids: list[int] = []
    weights: list[float] = []
    for piece_text, weight in pieces:
        piece = tokenizer.tokenize(piece_text if len(pieces) == 1 else piece_text.strip(), limit=length)
        ids += piece
        weights += [weight] * len(piece)
    ids, weights = ids[: length - 1] + [EOS_ID], weights[: length - 1] + [1.0]
    pad = length - len(ids)
    return ids + [PAD_ID] * pad, weights + [1.0] * pad


def encode_t5(text: str, encoder, tokenizer, length: int):
    """(1, length, D) T5 hidden states of a prompt, weighted as `_apply_weights` (the mean restored)."""
    import torch

    ids, weights = t5_units(text, tokenizer, length)
    device = _device_of(encoder)
    z = encoder(torch.tensor([ids], dtype=torch.long, device=device))  # (1, L, D)
    return _apply_weights(z, torch.tensor([weights], dtype=torch.float32))


@dataclass(frozen=True)
class JointText:
    """One prompt through a flow transformer's text encoders, before cond and uncond are lined up."""

    clip: object | None  # (1, 77 * n, sum of CLIP widths): the CLIP contexts, or None (FLUX uses none)
    sequence: object | None  # (1, L, D): T5's tokens (zeros for an optional encoder that is absent)
    pooled: object | None  # (1, P): the pooled CLIP vectors side by side

    def context(self, width: int):
        """[CLIP contexts zero-padded to `width` | T5 tokens] on the token axis (SD3's layout; FLUX: T5 alone)."""
        import torch
        import torch.nn.functional as F

        parts = [] if self.clip is None else [F.pad(self.clip, (0, width - self.clip.shape[-1]))]
        parts += [] if self.sequence is None else [self.sequence.to(parts[0].dtype if parts else self.sequence)]
        return torch.cat(parts, dim=1)


def encode_joint(text: str, encoders, specs, tokenizers: dict, width: int, embeddings=None) -> JointText:
    """A prompt through every text encoder of a flow transformer (`specs`: families/base.TextEncoderSpec; an
    encoder may be None where the spec is optional). CLIP encoders chunk and weight the prompt as for SDXL
    (penultimate state without the final norm, pooled from the first chunk); the contexts of those that give one
    are joined on the channels; T5 gives the sequence; `width`: T5's width (the zeros of an absent one)."""
    import torch

    contexts, pooled, sequence = [], [], None
    for encoder, spec in zip(encoders, specs, strict=True):
        if spec.kind == "t5":
            sequence = torch.zeros(1, spec.length, width) if encoder is None else \
                encode_t5(text, encoder, tokenizers["t5"], spec.length).float()  # fmt: skip
            continue
        context, vector = encode_with(text, (encoder,), (spec,), tokenizers["clip"], 1, embeddings)
        contexts += [context.float()] if spec.context else []
        pooled += [vector.float()] if spec.pooled else []
    return JointText(torch.cat(contexts, dim=-1) if contexts else None, sequence,
                     torch.cat(pooled, dim=-1) if pooled else None)
