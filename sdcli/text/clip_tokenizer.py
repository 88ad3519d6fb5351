"""The CLIP BPE tokenizer, offline, from the vocabulary shipped in ``sdcli/data``.

Reference: OpenAI CLIP ``clip/simple_tokenizer.py`` (MIT), as copied into open_clip
``open_clip/tokenizer.py`` (``SimpleTokenizer``). Ids are the same as ``SimpleTokenizer.encode``;
``tests/test_tokenizer.py`` checks that on a few hundred varied prompts.

Only the standard library is used (no ``ftfy``, no ``regex``), so ``sdcli inspect --prompt``
stays light. The two things ``SimpleTokenizer`` gets from those packages are rebuilt here:

* ``ftfy.fix_text`` (ftfy 6.3 defaults; ftfy is Apache-2.0 by Robyn Speer, behaviour emulated,
  no code copied): per line, until nothing changes: HTML entity decoding (off for a line with
  ``<`` and all later lines, as ftfy's "auto" does), C1 controls read as Windows-1252,
  Latin ligatures split, full/half-width forms narrowed, curly quotes straightened, line
  breaks unified, surrogates joined, ANSI terminal escapes and stray control characters
  removed, then NFC.
* the ``regex`` word pattern ``'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
  (IGNORECASE): a small scanner over ``unicodedata`` categories (see ``_split_words``).

Known divergences (documented and pinned in the tests):

* true mojibake repair (``ftfy.fix_encoding``: "cafÃ©" -> "café", "â€™" -> "'") is not done;
  such text is tokenized as written.
* characters assigned after the Python build's Unicode version (``unicodedata.unidata_version``)
  are category ``Cn`` here but may be letters/digits to a newer ``regex`` release.
* special tokens: like open_clip's ``SimpleTokenizer`` the literal texts ``<start_of_text>`` and
  ``<end_of_text>`` in a prompt become ids 49406/49407; ``id_to_token``/``decode`` name them
  ``<|startoftext|>``/``<|endoftext|>``, the names of the OpenAI and Hugging Face vocabularies.
"""

from __future__ import annotations

import gzip
import html
import html.entities
import re
import unicodedata
from functools import lru_cache
from importlib import resources

from sdcli.runtime.errors import BadInputError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # 48,894 merges used by CLIP (the file has a few more lines)
_SPECIAL_TEXTS = ("<start_of_text>", "<end_of_text>")  # as matched by open_clip's pattern
_SPECIAL_NAMES = ("<|startoftext|>", "<|endoftext|>")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_CACHE_LIMIT = 100_000  # BPE results kept per tokenizer; prompts reuse few words


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable character, as GPT-2/CLIP do, so BPE never sees spaces/controls."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


# --- ftfy.fix_text, the parts that change ids -----------------------------------------------

_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_C1_RE = re.compile("[\x80-\x9f]")
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\x85]")
# Latin ligatures/digraphs split by ftfy (not e.g. æ, which is used on purpose).
_LIGATURES = [0x132, 0x133, 0x149, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4), *range(0xFB00, 0xFB07)]
# Controls that ftfy drops: C0 except tab/LF/FF/CR, DEL, deprecated format chars, BOM, annotations.
_CONTROLS = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]


@lru_cache(maxsize=1)
def _translate_table() -> dict[int, str]:
    """One str.translate table for ligatures and width forms."""
    table: dict[int, str] = {}
    for cp in _LIGATURES:  # one level of compatibility decomposition: "ﬅ" -> "ſt", not NFKC's "st"
        table[cp] = "".join(chr(int(h, 16)) for h in unicodedata.decomposition(chr(cp)).split()[1:])
    table[0x3000] = " "  # ideographic space counts as a full-width space
    for cp in range(0xFF01, 0xFFF0):
        narrow = unicodedata.normalize("NFKC", chr(cp))
        if narrow != chr(cp):
            table[cp] = narrow
    return table


_CONTROL_TABLE = dict.fromkeys(_CONTROLS)


@lru_cache(maxsize=1)
def _html_entities() -> dict[str, str]:
    """HTML5 entities that end in ';', plus upper-cased Latin ones ("&EACUTE;") as ftfy decodes."""
    out = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            out["&" + name] = char
            upper = "&" + name.upper()
            if name == name.lower() and html.unescape(upper) == upper:
                out[upper] = char.upper()
    return out


def _unescape_entity(match: re.Match) -> str:
    text = match.group(0)
    if text in _html_entities():
        return _html_entities()[text]
    if text.startswith("&#"):
        decoded = html.unescape(text)
        return text if ";" in decoded else decoded  # only whole numeric references
    return text


def _c1_as_cp1252(match: re.Match) -> str:
    # Bytes 0x81, 0x8D, 0x8F, 0x90, 0x9D are holes in cp1252: leave those characters as they are.
    try:
        return match.group(0).encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:
        return match.group(0)


def _join_surrogates(match: re.Match) -> str:
    hi, lo = match.group(0)
    return chr(0x10000 + (ord(hi) - 0xD800) * 0x400 + (ord(lo) - 0xDC00))


def _fix_segment(text: str, unescape: bool) -> str:
    """One ftfy segment: apply the fixes in ftfy's order until the text stops changing."""
    while True:
        before = text
        if unescape:
            text = _HTML_ENTITY_RE.sub(_unescape_entity, text)
        text = _C1_RE.sub(_c1_as_cp1252, text)
        text = _DOUBLE_QUOTES.sub('"', _SINGLE_QUOTES.sub("'", text.translate(_translate_table())))
        text = _LINE_BREAKS.sub("\n", text)
        if _SURROGATE_RE.search(text):
            text = _SURROGATE_RE.sub("\ufffd", _SURROGATE_PAIR_RE.sub(_join_surrogates, text))
        # ANSI escapes first: removing controls first would strip ESC and leave "[31m".
        text = _ANSI_RE.sub("", text).translate(_CONTROL_TABLE)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


# Printable ASCII without '&', and tab, LF, FF: text no fix below changes (no entity, C1 byte, ligature, curly
# quote, CR, surrogate, escape sequence or control; NFC keeps ASCII), returned as it is.
_UNFIXED_RE = re.compile(r"[\t\n\f\x20-\x25\x27-\x7e]*")


def fix_text(text: str) -> str:
    """Our stand-in for ``ftfy.fix_text`` with default settings, minus mojibake repair."""
    if _UNFIXED_RE.fullmatch(text):  # most prompts: the fixes cost 20 us a prompt for nothing
        return text
    return _fix_lines(text)


def _fix_lines(text: str) -> str:
    """fix_text line by line."""
    out, pos, unescape = [], 0, True
    while pos < len(text):
        end = text.find("\n", pos) + 1 or len(text)
        segment = text[pos:end]
        unescape = unescape and "<" not in segment  # ftfy's "auto": once off, off for the rest
        out.append(_fix_segment(segment, unescape))
        pos = end
    return "".join(out)


def clean_text(text: str) -> str:
    """SimpleTokenizer's 'lower' cleaning: fix text, unescape HTML twice, collapse spaces, lowercase."""
    text = html.unescape(html.unescape(fix_text(text))).strip()
    return " ".join(text.split()).lower()


# --- the word pattern, without the regex module ------------------------------------------------


def _kind(ch: str) -> str:
    """'L' letter, 'N' number, ' ' space, '-' none (dropped), 'P' anything else."""
    if ch.isspace():
        return " "
    if ch == "\u0345":
        # Mn, but it case-folds to a Greek iota, so under IGNORECASE `regex` finds it in
        # neither [\p{L}] nor [^\s\p{L}\p{N}]: findall skips it.
        return "-"
    return {"L": "L", "N": "N"}.get(unicodedata.category(ch)[0], "P")


def _match_literal(text: str, i: int) -> str | None:
    """Special tokens, then contractions, tried first at each position as in the pattern."""
    for lit in _SPECIAL_TEXTS:
        if text.startswith(lit, i):
            return lit
    if text[i] == "'":
        for lit in _CONTRACTIONS:
            cand = text[i : i + len(lit)]
            # IGNORECASE: text is already lower-case; "ſ" (long s) still folds to "s".
            if cand.replace("ſ", "s") == lit:
                return cand
    return None


# The pattern itself on ASCII text, where \p{L} is [a-zA-Z] and \p{N} is [0-9]: the `re` module runs it in C.
# Same alternatives in the same order, so the same words (tests/test_prompts_file_scale.py compares the two).
_ASCII_WORDS_RE = re.compile("|".join(re.escape(lit) for lit in (*_SPECIAL_TEXTS, *_CONTRACTIONS))
                             + r"|[a-zA-Z]+|[0-9]|[^\sa-zA-Z0-9]+")


def _split_words(text: str) -> list[str]:
    """Equivalent of ``regex.findall(pattern, text)`` on cleaned, lower-cased text."""
    if text.isascii():  # most prompts: the scan below costs a Python call per character
        return _ASCII_WORDS_RE.findall(text)
    return _scan_words(text)


def _scan_words(text: str) -> list[str]:
    """_split_words for any text, a character at a time."""
    words, i, n = [], 0, len(text)
    while i < n:
        lit = _match_literal(text, i)
        if lit is not None:
            words.append(lit)
            i += len(lit)
            continue
        kind = _kind(text[i])
        if kind in " -":
            i += 1
            continue
        j = i + 1
        if kind != "N":  # letters and "other" are runs; each digit is its own word
            while j < n and _kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


# --- vocabulary and BPE --------------------------------------------------------------------


def _read_merges() -> list[tuple[str, str]]:
    try:
        raw = resources.files("sdcli").joinpath("data", VOCAB_FILE).read_bytes()
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
    except (OSError, EOFError) as exc:
        raise BadInputError(f"cannot read the CLIP vocabulary sdcli/data/{VOCAB_FILE}: {exc}") from exc
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a version header
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise BadInputError(f"sdcli/data/{VOCAB_FILE} is not the CLIP vocabulary (bad merge list)")
    return merges  # type: ignore[return-value]


class ClipTokenizer:
    """CLIP BPE tokenizer: 256 byte symbols, the same with ``</w>``, 48,894 merges, 2 specials."""

    bos_id = 49406
    eos_id = 49407

    def __init__(self) -> None:
        merges = _read_merges()
        symbols = list(_bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(_SPECIAL_NAMES)
        self._encoder = {tok: i for i, tok in enumerate(vocab)}
        self._decoder = vocab
        self._ranks = {m: i for i, m in enumerate(merges)}
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self._cache: dict[str, list[int]] = {}
        self.vocab_size = len(vocab)

    def _bpe(self, word: str) -> list[str]:
        """Merge the lowest-ranked adjacent pair until no known pair is left (CLIP ``bpe``)."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = zip(parts, parts[1:])
            best = min(pairs, key=lambda p: self._ranks.get(p, N_MERGES))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _word_ids(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            if word in _SPECIAL_TEXTS:
                ids = [self.bos_id if word == _SPECIAL_TEXTS[0] else self.eos_id]
            else:
                mapped = "".join(_bytes_to_unicode()[b] for b in word.encode("utf-8", "surrogatepass"))
                ids = [self._encoder[p] for p in self._bpe(mapped)]
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without bos/eos, as ``SimpleTokenizer.encode``."""
        ids: list[int] = []
        for word in _split_words(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry of id ``i`` in CLIP's byte-symbol alphabet (e.g. 'cat</w>')."""
        if not 0 <= i < self.vocab_size:
            raise BadInputError(f"token id {i} is outside the CLIP vocabulary (0..{self.vocab_size - 1})")
        return self._decoder[i]

    def decode(self, ids) -> str:
        """Text of ``ids``; '</w>' word ends become spaces, as ``SimpleTokenizer.decode``."""
        symbols = "".join(self.id_to_token(int(i)) for i in ids)
        data = bytearray(self._byte_decoder[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache(maxsize=1)
def get_tokenizer() -> ClipTokenizer:
    """The shared tokenizer; the vocabulary is read on first call, not at import."""
    return ClipTokenizer()
