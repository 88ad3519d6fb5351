"""sdcli.text.clip_tokenizer against the original CLIP SimpleTokenizer (open_clip's copy) as the oracle.

open_clip/__init__ imports torchvision (which we must not install), so the oracle module is
loaded from its file path. It needs ftfy and regex: test-only dependencies.
"""

import hashlib
import importlib.util
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sdcli
from sdcli.runtime.errors import BadInputError
from sdcli.text.clip_tokenizer import ClipTokenizer, get_tokenizer

VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
DATA = Path(sdcli.__file__).parent / "data"


@pytest.fixture(scope="module")
def oracle_module():
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_oracle", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def oracle(oracle_module):
    return oracle_module.SimpleTokenizer(bpe_path=str(DATA / "bpe_simple_vocab_16e6.txt.gz"))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


# Fragments the corpus is built from: each kind of input the brief lists.
WORDS = ["a photo of a cat", "masterpiece", "best quality", "highly detailed", "portrait of an old man",
         "cinematic lighting", "8k uhd", "trending on artstation", "by greg rutkowski", "it's", "we're", "they'll",
         "I'VE", "don't", "You'd", "SHE'S", "I'm", "rock'n'roll", "o'clock", "1girl", "solo", "ultra-realistic"]
UNICODE = ["café", "naïve", "Ångström", "über", "façade", "Crème brûlée", "e\u0301te\u0301", "A\u030a",
           "東京の夜景", "猫", "고양이", "Привет мир", "Ελληνικά", "שלום עולם", "مرحبا بالعالم", "हिन्दी",
           "ไทย", "🐱", "🎨🖌️", "👩‍🚀", "🇯🇵", "❤️", "☃", "Ǆemal", "ﬁne ﬂower", "Ĳssel", "ŉ",
           "ＬＯＵＤ　ＮＯＩＳＥＳ", "ｶﾀｶﾅ", "İstanbul", "straße", "ΣΊΣΥΦΟΣ", "ſtar", "'ſ", "\u0345x \u0345",
           "x²", "½ ¾", "Ⅻ", "٣٤٥", "①②", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\U0001d400", "a\u0308\u0301"]
SPACE = [" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u2003", "\u3000", "\u200b", "\u200d", "\ufeff",
         "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x7f", "\u2060", "\u206a", "\ufff9"]
HTML = ["&amp;", "&lt;3", "&gt;", "&quot;hi&quot;", "&#39;", "&#x2019;", "&amp;amp;", "&amp;amp;amp;lt;",
        "&nbsp;", "&eacute;", "&EACUTE;", "P&EACUTE;REZ", "&hellip;", "&copy", "&notin;", "&#128512;",
        "&#xD800;", "&#0;", "a<b &amp; c", "&unknown;", "AT&T", "&#65", "&checkmark;"]
PUNCT = ["!!!", "???", "...", "…", "—", "--", "(((masterpiece)))", "[[[bad]]]", "{x}", "<lora:foo:0.8>",
         "(word:1.3)", "a, b, c", ";;;", "@#$%^&*", "\\(escaped\\)", "'quoted'", '"double"', "‘curly’",
         "“curly”", "‚low‛", "„low‟", "ʼ", "`tick`", "~~~", "|||", "___", "<start_of_text>", "<end_of_text>",
         "<|endoftext|>", "\x1b[31mred\x1b[0m", "\x80\x93\x99\x81\x9d", "€"]
DIGITS = ["0", "42", "1234567890", "3.14159", "1,000,000", "2024-01-01", "v1.5", "512x768", "-0.5", "1e-3"]
POOLS = [WORDS, UNICODE, SPACE, HTML, PUNCT, DIGITS]
# Mojibake-looking text that ftfy leaves alone (checked below), and broken UTF-16 surrogates.
# Kept out of the random mixes: next to other text some of these become repairable mojibake.
MOJIBAKE_LIKE = ["Ã", "Â", "ÃÂ", "â€", "Ð", "Ñ", "Ã?", "â„¢", "Ãâ€", "ÂÃÂÃ", "¯\\_(ツ)_/¯",
                 "\ud83d\ude00", "\ud800 lone", "\udc00", "a\udbff\udfffb"]
# True mojibake that ftfy's fix_encoding repairs and we deliberately tokenize as written.
KNOWN_MOJIBAKE = ["Ã©", "cafÃ©", "â€™ quote", "â€œquoteâ€\x9d", "ÐŸÑ€Ð¸Ð²ÐµÑ‚ world", "Ã¼ber", "æ–‡å­—åŒ–ã‘",
                  "Â£", "Ã x", "ï»¿x", "â€”"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic mixed prompts: every fragment alone, then random mixes of all kinds."""
    rng = random.Random(seed)
    out = [frag for pool in POOLS for frag in pool] + MOJIBAKE_LIKE
    while len(out) < n:
        k = rng.choice([2, 3, 5, 8, 20, 60])
        parts = [rng.choice(rng.choice(POOLS)) for _ in range(k)]
        out.append("".join(p + rng.choice(["", " ", ", ", "\t", "\n"]) for p in parts))
    out += ["", "   ", "\n\t", "a photo of a cat " * 40, "," * 300, "x" * 500]
    return out


def test_vocab_file_is_the_clip_vocabulary():
    data = (DATA / "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256
    assert "MIT License" in (DATA / "CLIP_LICENSE.txt").read_text()
    assert "Copyright (c) 2021 OpenAI" in (DATA / "CLIP_LICENSE.txt").read_text()


def test_documented_example(tok):
    ids = [tok.bos_id, *tok.encode("a photo of a cat"), tok.eos_id]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.vocab_size == 49408
    assert tok.id_to_token(2368) == "cat</w>"
    assert (tok.id_to_token(49406), tok.id_to_token(49407)) == ("<|startoftext|>", "<|endoftext|>")


def test_same_ids_as_simple_tokenizer(tok, oracle):
    texts = corpus()
    assert len(texts) >= 400
    mismatches = [(t, tok.encode(t), oracle.encode(t)) for t in texts if tok.encode(t) != oracle.encode(t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first: {mismatches[0]!r}"


def test_mojibake_like_corpus_is_not_repaired_by_ftfy():
    """So the corpus above exercises mojibake-looking text without relying on a known divergence."""
    import ftfy

    for text in MOJIBAKE_LIKE:
        assert ftfy.fix_text(text) == ftfy.fix_text(text, fix_encoding=False)


def test_vocabulary_entries_match_oracle(tok, oracle):
    for i in range(0, 49406):
        assert tok.id_to_token(i) == oracle.decoder[i]


def test_decode_matches_oracle(tok, oracle):
    for text in corpus(60, seed=1):
        ids = [i for i in tok.encode(text) if i < tok.bos_id]  # specials are named differently
        assert tok.decode(ids) == oracle.decode(ids)
    assert tok.decode([49406, 320, 2368, 49407]) == "<|startoftext|>a cat <|endoftext|>"


def test_known_divergence_mojibake_is_not_repaired(tok, oracle, oracle_module, monkeypatch):
    """ftfy re-decodes UTF-8 that was read as cp1252/latin-1; we do not (documented in the module)."""
    import ftfy

    repaired = {text: oracle.encode(text) for text in KNOWN_MOJIBAKE}
    fix_text = ftfy.fix_text
    monkeypatch.setattr(oracle_module.ftfy, "fix_text", lambda t: fix_text(t, fix_encoding=False))
    for text in KNOWN_MOJIBAKE:
        assert tok.encode(text) != repaired[text]  # the oracle repairs it ...
        assert tok.encode(text) == oracle.encode(text)  # ... and without that repair we agree


def test_bad_id_is_a_clear_error(tok):
    with pytest.raises(BadInputError, match="49408"):
        tok.id_to_token(49408)


def test_load_is_fast_and_cached():
    start = time.perf_counter()
    ClipTokenizer()
    assert time.perf_counter() - start < 0.5
    assert get_tokenizer() is get_tokenizer()


def test_import_is_light():
    code = ("import sys, sdcli.text.clip_tokenizer as t; t.get_tokenizer().encode('a cat');"
            "bad = {'torch', 'ftfy', 'regex'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
