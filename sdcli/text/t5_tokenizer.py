"""The T5 SentencePiece-unigram tokenizer (SD3's and FLUX.1's third / second text encoder), offline and in plain
Python, from the tokenizer JSON shipped in ``sdcli/data/t5_tokenizer.json.gz`` (see T5_LICENSE.txt there).

Ids equal transformers' ``T5TokenizerFast`` built on that JSON (``tokenizers`` 0.23; ``tests/test_t5.py`` checks
hundreds of prompts), which is what diffusers' SD3/Flux pipelines and ComfyUI feed the encoder. The JSON's pipeline,
rebuilt here step by step:

1. special tokens (``<pad>``, ``</s>``, ``<unk>``, ``<extra_id_N>``) are cut out of the raw text first, leftmost-
   longest, and become their ids; the pieces between them go through steps 2-5 separately;
2. ``Precompiled`` normalizer: SentencePiece's "nmt_nfkc" character map, a double-array trie of UTF-8 keys ->
   replacement strings (NFKC plus whitespace/control clean-up). tokenizers applies it per extended grapheme cluster:
   a cluster of under 6 bytes is replaced whole by the value of the SHORTEST key that prefixes it (so
   "a" + U+0302 + U+0301 becomes "â", the second accent dropped), otherwise each character is looked up alone;
3. ``Replace`` runs of 2+ spaces by one;
4. ``Metaspace``: spaces -> "▁", a "▁" prepended unless the text starts with one, split before each "▁";
5. ``Unigram`` per word: the best-scoring segmentation into vocabulary pieces (Viterbi; ties keep the first
   path found), characters without a piece become ``<unk>`` and consecutive ``<unk>`` merge into one;
then ``</s>`` (1) is appended and the ids padded with ``<pad>`` (0). `encode` tokenizes a long prompt's head first
and stops there when the head alone fills max_length (see _tokenize_plain): the same ids, far less work.

Known divergences (not seen on the test prompts): grapheme clusters follow the Unicode rules with this Python's
``unicodedata`` (14.0 for 3.11) where tokenizers bundles a newer table, so text using characters assigned after
that version may cluster differently; Extended_Pictographic is an inline range list. transformers >= 5's
``T5TokenizerFast.from_pretrained`` on a folder rebuilds the pipeline (WhitespaceSplit before Metaspace, no space
collapsing): it agrees with this one except on whitespace that the JSON keeps as a "▁" token (trailing spaces).
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import struct
import unicodedata
from functools import lru_cache
from importlib import resources

PAD_ID = 0
EOS_ID = 1
UNK_PENALTY = 10.0  # tokenizers' K_UNK_PENALTY: <unk> scores min(vocabulary score) - 10
DATA_FILE = "t5_tokenizer.json.gz"
_CACHE_LIMIT = 100_000  # words kept per tokenizer; prompts reuse few words


class CharsMap:
    """SentencePiece's precompiled normalization map: [u32 trie size][Darts-clone double array][NUL-separated
    replacement strings]. Upstream: sentencepiece normalizer.cc, huggingface/spm_precompiled (DoubleArray)."""

    def __init__(self, blob: bytes):
        (size,) = struct.unpack_from("<I", blob)
        self.units = struct.unpack_from(f"<{size // 4}I", blob, 4)
        self.strings = blob[4 + size :]

    def shortest_prefix(self, key: bytes) -> str | None:
        """Replacement of the shortest key that is a prefix of `key` (spm_precompiled's transform takes the first
        common-prefix match); None when no key prefixes it."""
        units, pos = self.units, 0
        pos ^= _offset(units[0])
        for byte in key:
            if byte == 0:
                return None
            pos ^= byte
            unit = units[pos]
            if unit & 0x800000FF != byte:  # the label of the unit (bit 31 set marks a leaf, never a label)
                return None
            pos ^= _offset(unit)
            if unit >> 8 & 1:  # has a leaf: its value is the offset of the replacement
                start = units[pos] & 0x7FFFFFFF
                return self.strings[start : self.strings.index(b"\0", start)].decode("utf-8")
        return None


def _offset(unit: int) -> int:
    return (unit >> 10) << ((unit & (1 << 9)) >> 6)


# --- extended grapheme clusters (UAX #29), the part that changes the normalizer's output -----------------------

_CR, _LF, _CONTROL, _EXTEND, _ZWJ, _RI, _PREPEND, _SPACING, _L, _V, _T, _LV, _LVT, _OTHER = range(14)
_PREPEND_CHARS = {*range(0x600, 0x606), 0x6DD, 0x70F, 0x890, 0x891, 0x8E2, 0xD4E, 0x110BD, 0x110CD, 0x111C2,
                  0x111C3, 0x1193F, 0x11941, *range(0x11A84, 0x11A8A), 0x11D46, 0x11F02}  # fmt: skip
# Other_Grapheme_Extend (PropList.txt) outside Mn/Me, and the emoji skin-tone modifiers: both extend a cluster.
_EXTEND_CHARS = {0x9BE, 0x9D7, 0xB3E, 0xB57, 0xBBE, 0xBD7, 0xCC2, 0xCD5, 0xCD6, 0xD3E, 0xD57, 0xDCF, 0xDDF, 0x1B35,
                 0x200C, 0x302E, 0x302F, 0xFF9E, 0xFF9F, 0x1133E, 0x11357, 0x114B0, 0x114BD, 0x115AF, 0x11930, 0x1D165,
                 *range(0x1D16E, 0x1D173), *range(0x1F3FB, 0x1F400), *range(0xE0020, 0xE0080)}  # fmt: skip
# Spacing marks (Mc) that do NOT join the previous character (GraphemeBreakProperty: not SpacingMark).
_MC_NOT_SPACING = {0x102B, 0x102C, 0x1038, *range(0x1062, 0x1065), *range(0x1067, 0x106E), 0x1083,
                   *range(0x1087, 0x108D), 0x108F, *range(0x109A, 0x109D), 0x1A61, 0x1A63, 0x1A64, 0xAA7B, 0xAA7D,
                   0x11720, 0x11721}  # fmt: skip
# Unassigned default-ignorable code points: Control.
_IGNORABLE_UNASSIGNED = ((0x2065, 0x2065), (0xFFF0, 0xFFF8), (0xE0000, 0xE0000), (0xE0002, 0xE001F),
                         (0xE0080, 0xE00FF), (0xE01F0, 0xE0FFF))  # fmt: skip
# Extended_Pictographic (emoji-data.txt), as ranges; only rule GB11 (emoji ZWJ sequences) reads it.
_PICTOGRAPHIC = ((0xA9, 0xA9), (0xAE, 0xAE), (0x203C, 0x203C), (0x2049, 0x2049), (0x2122, 0x2122), (0x2139, 0x2139),
                 (0x2194, 0x2199), (0x21A9, 0x21AA), (0x231A, 0x231B), (0x2328, 0x2328), (0x2388, 0x2388),
                 (0x23CF, 0x23CF), (0x23E9, 0x23F3), (0x23F8, 0x23FA), (0x24C2, 0x24C2), (0x25AA, 0x25AB),
                 (0x25B6, 0x25B6), (0x25C0, 0x25C0), (0x25FB, 0x25FE), (0x2600, 0x2605), (0x2607, 0x2612),
                 (0x2614, 0x2685), (0x2690, 0x2705), (0x2708, 0x2712), (0x2714, 0x2714), (0x2716, 0x2716),
                 (0x271D, 0x271D), (0x2721, 0x2721), (0x2728, 0x2728), (0x2733, 0x2734), (0x2744, 0x2744),
                 (0x2747, 0x2747), (0x274C, 0x274C), (0x274E, 0x274E), (0x2753, 0x2755), (0x2757, 0x2757),
                 (0x2763, 0x2767), (0x2795, 0x2797), (0x27A1, 0x27A1), (0x27B0, 0x27B0), (0x27BF, 0x27BF),
                 (0x2934, 0x2935), (0x2B05, 0x2B07), (0x2B1B, 0x2B1C), (0x2B50, 0x2B50), (0x2B55, 0x2B55),
                 (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299), (0x1F000, 0x1F0FF),
                 (0x1F10D, 0x1F10F), (0x1F12F, 0x1F12F), (0x1F16C, 0x1F171), (0x1F17E, 0x1F17F), (0x1F18E, 0x1F18E),
                 (0x1F191, 0x1F19A), (0x1F1AD, 0x1F1E5), (0x1F201, 0x1F20F), (0x1F21A, 0x1F21A), (0x1F22F, 0x1F22F),
                 (0x1F232, 0x1F23A), (0x1F23C, 0x1F23F), (0x1F249, 0x1F3FA), (0x1F400, 0x1F53D), (0x1F546, 0x1F64F),
                 (0x1F680, 0x1F6FF), (0x1F774, 0x1F77F), (0x1F7D5, 0x1F7FF), (0x1F80C, 0x1F80F), (0x1F848, 0x1F84F),
                 (0x1F85A, 0x1F85F), (0x1F888, 0x1F88F), (0x1F8AE, 0x1F8FF), (0x1F90C, 0x1F93A), (0x1F93C, 0x1F945),
                 (0x1F947, 0x1FAFF), (0x1FC00, 0x1FFFD))  # fmt: skip


# Indic conjuncts (GB9c, Unicode 15.1): consonant, then linkers (viramas) and extends, then another consonant.
_INCB_LINKERS = {"\u094d", "\u09cd", "\u0acd", "\u0b4d", "\u0c4d", "\u0d4d"}
_INCB_CONSONANTS = ((0x915, 0x939), (0x958, 0x95F), (0x978, 0x97F), (0x995, 0x9A8), (0x9AA, 0x9B0), (0x9B2, 0x9B2),
                    (0x9B6, 0x9B9), (0x9DC, 0x9DD), (0x9DF, 0x9DF), (0x9F0, 0x9F1), (0xA95, 0xAA8), (0xAAA, 0xAB0),
                    (0xAB2, 0xAB3), (0xAB5, 0xAB9), (0xAF9, 0xAF9), (0xB15, 0xB28), (0xB2A, 0xB30), (0xB32, 0xB33),
                    (0xB35, 0xB39), (0xB5C, 0xB5D), (0xB5F, 0xB5F), (0xB71, 0xB71), (0xC15, 0xC28), (0xC2A, 0xC39),
                    (0xC58, 0xC5A), (0xD15, 0xD3A))  # fmt: skip


def _in(cp: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(a <= cp <= b for a, b in ranges)


def _hangul(cp: int) -> int | None:
    if 0x1100 <= cp <= 0x115F or 0xA960 <= cp <= 0xA97C:
        return _L
    if 0x1160 <= cp <= 0x11A7 or 0xD7B0 <= cp <= 0xD7C6:
        return _V
    if 0x11A8 <= cp <= 0x11FF or 0xD7CB <= cp <= 0xD7FB:
        return _T
    if 0xAC00 <= cp <= 0xD7A3:
        return _LV if (cp - 0xAC00) % 28 == 0 else _LVT
    return None


@lru_cache(maxsize=8192)
def _properties(ch: str) -> tuple[int, bool, bool]:
    """(Grapheme_Cluster_Break, Extended_Pictographic?, InCB=Consonant?) of one character."""
    cp = ord(ch)
    return _break_class(ch), _in(cp, _PICTOGRAPHIC), _in(cp, _INCB_CONSONANTS)


def _break_class(ch: str) -> int:
    """Grapheme_Cluster_Break of one character, from unicodedata plus the lists above."""
    cp = ord(ch)
    special = {0x0D: _CR, 0x0A: _LF, 0x200D: _ZWJ, 0x0E33: _SPACING, 0x0EB3: _SPACING}.get(cp)
    if special is not None:
        return special
    if cp in _PREPEND_CHARS:
        return _PREPEND
    category = unicodedata.category(ch)
    if category in ("Mn", "Me") or cp in _EXTEND_CHARS:
        return _EXTEND
    if category in ("Cc", "Cf", "Zl", "Zp") or (category == "Cn" and _in(cp, _IGNORABLE_UNASSIGNED)):
        return _CONTROL
    if category == "Mc":
        return _OTHER if cp in _MC_NOT_SPACING else _SPACING
    if 0x1F1E6 <= cp <= 0x1F1FF:
        return _RI
    hangul = _hangul(cp)
    return _OTHER if hangul is None else hangul


_HANGUL_JOINS = {(_L, _L), (_L, _V), (_L, _LV), (_L, _LVT), (_LV, _V), (_LV, _T), (_V, _V), (_V, _T), (_LVT, _T),
                 (_T, _T)}  # fmt: skip


def _joins(prev: int, cur: int, context: bool) -> bool:
    """No break between two characters of these classes (rules GB3-GB13)? `context`: the cluster so far ends in
    the first half of a longer rule (GB9c Indic conjunct, GB11 emoji ZWJ sequence, GB12/13 flag pair) that this
    character completes."""
    if prev == _CR:
        return cur == _LF
    if prev in (_CONTROL, _LF) or cur in (_CONTROL, _CR, _LF):
        return False
    return (prev, cur) in _HANGUL_JOINS or cur in (_EXTEND, _ZWJ, _SPACING) or prev == _PREPEND or context


def graphemes(text: str) -> list[str]:
    """Split `text` into extended grapheme clusters (UAX #29, as the unicode-segmentation crate does)."""
    out: list[str] = []
    start, prev = 0, None
    pict = pict_zwj = conjunct = conjunct_linked = False  # states of GB11 and GB9c over the cluster's tail
    ri_run = 0  # regional indicators ending the cluster (GB12/13 pair them)
    for i, ch in enumerate(text):
        cur, is_pict, is_consonant = _properties(ch)
        context = (pict_zwj and is_pict) or (conjunct_linked and is_consonant) or (cur == prev == _RI and ri_run % 2)
        if prev is not None and not _joins(prev, cur, context):
            out.append(text[start:i])
            start, ri_run, pict, conjunct, conjunct_linked = i, 0, False, False, False
        pict_zwj = pict and cur == _ZWJ
        pict = is_pict or (pict and cur == _EXTEND)
        extends = cur in (_EXTEND, _ZWJ)
        linker = ch in _INCB_LINKERS
        conjunct_linked = (conjunct or conjunct_linked) and (linker or (conjunct_linked and extends))
        conjunct = is_consonant or (conjunct and extends and not linker)
        ri_run = ri_run + 1 if cur == _RI else 0
        prev = cur
    if text:
        out.append(text[start:])
    return out


# --- the tokenizer -----------------------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_SPACES = re.compile(" {2,}")
_METASPACE = "\u2581"


class T5Tokenizer:
    """T5 v1.1 tokenizer from a ``tokenizers`` JSON (a Unigram model behind the Precompiled normalizer)."""

    def __init__(self, spec: dict):
        normalizers = spec["normalizer"]["normalizers"]
        if [n["type"] for n in normalizers] != ["Precompiled", "Replace"] or spec["model"]["type"] != "Unigram":
            raise ValueError("not a T5 tokenizer JSON (Precompiled + Replace normalizer, Unigram model expected)")
        self.charsmap = CharsMap(base64.b64decode(normalizers[0]["precompiled_charsmap"]))
        self.pieces: dict[str, tuple[int, float]] = {}  # piece -> (id, log-probability score)
        self.longest: dict[str, int] = {}  # first character -> length of the longest piece starting with it
        lowest = float("inf")
        for i, (piece, score) in enumerate(spec["model"]["vocab"]):
            self.pieces[piece] = (i, score)
            lowest = min(lowest, score)
            if len(piece) > self.longest.get(piece[0], 0):
                self.longest[piece[0]] = len(piece)
        self.unk_id = spec["model"]["unk_id"]
        self.unk_score = lowest - UNK_PENALTY
        specials = sorted((t["content"] for t in spec["added_tokens"]), key=len, reverse=True)
        self.special_ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
        self.special_re = re.compile("|".join(map(re.escape, specials)))
        self._chars: dict[str, str] = {}
        self._words: dict[str, list[int]] = {}

    def encode(self, text: str, max_length: int) -> list[int]:
        """Ids of `text` ending with </s> (1), truncated to keep the </s>, padded with <pad> (0) to max_length."""
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        ids = self.tokenize(text, limit=max_length - 1)[: max_length - 1] + [EOS_ID]
        return ids + [PAD_ID] * (max_length - len(ids))

    def tokenize(self, text: str, limit: int | None = None) -> list[int]:
        """Ids of `text` without </s> or padding: special tokens cut out first, the rest normalized and split.
        With a `limit`, the first `limit` ids are exact and the rest may be missing (a long prompt's tail is not
        tokenized)."""
        if limit == 0:
            return []
        if _SURROGATE.search(text):  # from undecodable command-line bytes: pair what pairs, U+FFFD for the rest
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids: list[int] = []
        start = 0
        for m in self.special_re.finditer(text):
            ids += self._tokenize_plain(text[start : m.start()], limit)
            ids.append(self.special_ids[m.group()])
            start = m.end()
            if limit is not None and len(ids) >= limit:
                return ids
        return ids + self._tokenize_plain(text[start:], limit)

    def _tokenize_plain(self, text: str, limit: int | None = None) -> list[int]:
        """A long text is first tokenized only up to a space past ~8 characters per wanted id: before a space
        (not after a Prepend character) is a cluster boundary, so the head's ids are the whole text's, except
        that a head ending in whitespace gets one extra "▁"; more than `limit` ids are therefore all exact."""
        cut = text.find(" ", 8 * limit) if limit is not None else -1
        while cut > 0 and _properties(text[cut - 1])[0] == _PREPEND:
            cut = text.find(" ", cut + 1)
        if cut > 0 and len(head := self._pieces(text[:cut])) > limit:
            return head
        return self._pieces(text)

    def _pieces(self, text: str) -> list[int]:
        text = self.normalize(text).replace(" ", _METASPACE)
        if text and not text.startswith(_METASPACE):
            text = _METASPACE + text
        ids: list[int] = []
        for word in re.findall(f"{_METASPACE}[^{_METASPACE}]*", text):  # split before each "▁"
            ids += self._word(word)
        return ids

    def normalize(self, text: str) -> str:
        """The JSON's normalizer: the precompiled map per grapheme cluster, then runs of spaces -> one space."""
        out = []
        plain = text.isascii() and "\r\n" not in text  # ASCII clusters are single characters, except CR LF
        for cluster in text if plain else graphemes(text):
            if len(cluster) > 1:
                key = cluster.encode("utf-8")
                whole = self.charsmap.shortest_prefix(key) if len(key) < 6 else None
                out.append(whole if whole is not None else "".join(map(self._char, cluster)))
            else:
                out.append(self._char(cluster))
        return _SPACES.sub(" ", "".join(out))

    def _char(self, ch: str) -> str:
        mapped = self._chars.get(ch)
        if mapped is None:
            found = self.charsmap.shortest_prefix(ch.encode("utf-8"))
            mapped = self._chars[ch] = ch if found is None else found
        return mapped

    def _word(self, word: str) -> list[int]:
        ids = self._words.get(word)
        if ids is None:
            if len(self._words) >= _CACHE_LIMIT:
                self._words.clear()
            ids = self._words[word] = self._viterbi(word)
        return ids

    def _viterbi(self, word: str) -> list[int]:
        """tokenizers' Unigram.encode_optimized: best[j] = the best score of a segmentation of word[:j]; pieces are
        tried by start, then by length, and only a strictly better score replaces a path. A character without a
        one-character piece also gets an <unk> edge."""
        n = len(word)
        best = [0.0] * (n + 1)
        back: list[tuple[int, int] | None] = [(0, -1)] + [None] * n  # (start, piece id) of the best path's last piece
        for i in range(n):
            base, single = best[i], False
            for j in range(i + 1, min(n, i + self.longest.get(word[i], 0)) + 1):
                entry = self.pieces.get(word[i:j])
                if entry is not None:
                    single = single or j == i + 1
                    score = entry[1] + base
                    if back[j] is None or score > best[j]:
                        best[j], back[j] = score, (i, entry[0])
            if not single and (back[i + 1] is None or self.unk_score + base > best[i + 1]):
                best[i + 1], back[i + 1] = self.unk_score + base, (i, self.unk_id)
        return self._backtrack(word, back)

    def _backtrack(self, word: str, back: list) -> list[int]:
        """The best path's ids, each run of consecutive <unk> pieces fused into one, whose text is looked up again
        as tokenizers does (an <unk> unless the fused text happens to be a piece)."""
        ids: list[int] = []
        end, unk_end = len(word), None  # unk_end: where the run of <unk> pieces being walked ends
        while end > 0:
            start, piece = back[end]
            if piece == self.unk_id:
                unk_end = end if unk_end is None else unk_end
            else:
                if unk_end is not None:
                    ids.append(self.pieces.get(word[end:unk_end], (self.unk_id,))[0])
                    unk_end = None
                ids.append(piece)
            end = start
        if unk_end is not None:
            ids.append(self.pieces.get(word[:unk_end], (self.unk_id,))[0])
        return ids[::-1]


@lru_cache(maxsize=1)
def t5_tokenizer() -> T5Tokenizer:
    """The tokenizer of the vocabulary shipped with sdcli, loaded once (about 0.2 s: a 2.4 MB JSON)."""
    with resources.files("sdcli.data").joinpath(DATA_FILE).open("rb") as f:
        return T5Tokenizer(json.loads(gzip.decompress(f.read())))
