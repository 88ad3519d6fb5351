"""A1111 prompt syntax: parser, 75-token chunks, weighted encoding with mean restoration.

Expected values are worked out from A1111's documented semantics (modules/prompt_parser.py docstring,
modules/sd_hijack_clip.py): "(x)" multiplies by 1.1, "[x]" divides by 1.1, "(x:w)" multiplies by w,
unclosed brackets apply to the rest of the prompt.
"""

import json

import pytest
import torch

from sdcli.runtime.errors import BadInputError
from sdcli.text.prompts import chunk_prompt, describe_prompt, encode_pair, encode_prompt, parse_attention
from sdcli.text.clip_tokenizer import get_tokenizer

BOS, EOS = 49406, 49407
A, B, COMMA = 320, 321, 267  # "a</w>", "b</w>", ",</w>"


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def approx_pairs(pairs):
    return [(t, pytest.approx(w, rel=1e-12)) for t, w in pairs]


# --- parser ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("(abc)", [("abc", 1.1)]),
    ("((abc))", [("abc", 1.1 * 1.1)]),
    ("[abc]", [("abc", 1 / 1.1)]),
    ("[[abc]]", [("abc", 1 / 1.1 / 1.1)]),
    ("(abc:1.3)", [("abc", 1.3)]),
    ("(abc:-0.5)", [("abc", -0.5)]),
    ("((abc:0.5))", [("abc", 0.5 * 1.1)]),
    ("a [b (c)]", [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.1 / 1.1)]),
    ("a ] b )", [("a ] b )", 1.0)]),  # closers with nothing open stay text
    ("x:y", [("x:y", 1.0)]),  # a stray colon is text
    ("(x:y)", [("x:y", 1.1)]),  # ":y)" is not a weight: plain brackets
    ("a\\\\b", [("a\\b", 1.0)]),  # escaped backslash
    ("a\\b", [("ab", 1.0)]),  # A1111 drops a lone backslash
    ("", [("", 1.0)]),
])
def test_parse_attention(text, expected):
    assert parse_attention(text) == approx_pairs(expected)


def test_parse_attention_a1111_long_example():
    text = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."
    # The outer "(" of "(((house" and of "(((sky)))." are never closed: x1.1 on everything after each.
    assert parse_attention(text) == approx_pairs([
        ("a ", 1.0),
        ("house", 1.3 * 1.1 * 1.1),
        (" ", 1.1),
        ("on", 1.1 / 1.1),
        (" a ", 1.1),
        ("hill", 0.5 * 1.1),
        (", sun, ", 1.1),
        ("sky", 1.1 ** 4),
        (".", 1.1),
    ])


def test_break_is_a_separate_marker():
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_attention("aBREAK b") == [("aBREAK b", 1.0)]
    assert parse_attention("a break b") == [("a break b", 1.0)]
    # Our one deliberate difference: inside brackets BREAK is still a break (A1111 weights it -1.1).
    assert parse_attention("(a BREAK b)") == approx_pairs([("a", 1.1), ("BREAK", -1.0), ("b", 1.1)])


def test_bad_weight_is_a_clear_error():
    with pytest.raises(BadInputError, match="1.2.3"):
        parse_attention("(a:1.2.3)")


# --- chunks ----------------------------------------------------------------------------------


def test_empty_prompt_is_one_padded_chunk(tok):
    (sd1,) = chunk_prompt("", tok, EOS)
    assert sd1.ids == [BOS] + [EOS] * 76 and sd1.weights == [1.0] * 77 and sd1.n_tokens == 0
    (sd2,) = chunk_prompt("", tok, 0)
    assert sd2.ids == [BOS, EOS] + [0] * 75


def test_exactly_75_tokens_fit_one_chunk(tok):
    (chunk,) = chunk_prompt("a " * 75, tok, EOS)
    assert chunk.ids == [BOS] + [A] * 75 + [EOS] and chunk.n_tokens == 75


def test_76_tokens_make_two_chunks(tok):
    first, second = chunk_prompt("a " * 76, tok, 0)
    assert first.ids == [BOS] + [A] * 75 + [EOS]
    assert second.ids == [BOS, A, EOS] + [0] * 74 and second.n_tokens == 1


def test_comma_backtrack_moves_the_tail_to_the_next_chunk(tok):
    # 60 a, a comma at position 60, then 20 b: the chunk fills at 60 + 1 + 14; the comma is
    # 75 - 60 = 15 <= 20 tokens back, so the 14 b after it move on with the rest.
    first, second = chunk_prompt("a " * 60 + ", " + "b " * 20, tok, EOS)
    assert first.ids == [BOS] + [A] * 60 + [COMMA] + [EOS] * 15
    assert first.n_tokens == 61
    assert second.ids == [BOS] + [B] * 20 + [EOS] * 56


def test_no_backtrack_when_the_comma_is_too_far_back(tok):
    first, second = chunk_prompt("a " * 50 + ", " + "b " * 30, tok, EOS)  # 75 - 50 = 25 > 20
    assert first.ids == [BOS] + [A] * 50 + [COMMA] + [B] * 24 + [EOS]
    assert second.ids[:8] == [BOS] + [B] * 6 + [EOS] and second.n_tokens == 6


def test_break_starts_a_new_chunk(tok):
    first, second = chunk_prompt("a BREAK b", tok, EOS)
    assert first.ids[:3] == [BOS, A, EOS] and second.ids[:3] == [BOS, B, EOS]
    empty, only = chunk_prompt("BREAK a", tok, EOS)  # A1111 closes the (empty) chunk too
    assert empty.n_tokens == 0 and only.ids[:3] == [BOS, A, EOS]
    assert len(chunk_prompt("a BREAK", tok, EOS)) == 1  # nothing after it: no trailing empty chunk


def test_weights_follow_their_tokens(tok):
    (chunk,) = chunk_prompt("(a:1.5) [b]", tok, EOS)
    assert chunk.ids[:4] == [BOS, A, B, EOS]
    assert chunk.weights[:4] == pytest.approx([1.0, 1.5, 1 / 1.1, 1.0])
    assert chunk.weights[4:] == [1.0] * 73


# --- encoding --------------------------------------------------------------------------------


class LookupEncoder(torch.nn.Module):
    """Stand-in text encoder: an embedding lookup, so the expected output is easy to compute."""

    def __init__(self, dim=6):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(49408, dim)
        self.emb.weight.data += 0.3  # keep means away from zero
        self.calls = []

    def forward(self, ids, clip_skip):
        self.calls.append((ids.clone(), clip_skip))
        return self.emb(ids)


@pytest.fixture()
def enc():
    return LookupEncoder()


def plain(enc, tok, text, pad=EOS):
    ids = torch.tensor([c.ids for c in chunk_prompt(text, tok, pad)])
    return enc.emb(ids).reshape(1, -1, enc.emb.embedding_dim)


def test_weight_one_gives_exactly_the_plain_encoding(enc, tok):
    text = "a photo of a cat, " * 15 + "\\(literal\\)"
    with torch.no_grad():
        assert torch.equal(encode_prompt(text, enc, tok, EOS, clip_skip=2), plain(enc, tok, text))
    assert enc.calls[0][1] == 2 and enc.calls[0][0].shape == (2, 77)


def test_weights_with_mean_restoration(enc, tok):
    text = "a (cat:1.5) on a [mat], " * 5 + "(dog:0.2)" + " x" * 60
    with torch.no_grad():
        out = encode_prompt(text, enc, tok, EOS)
        z = plain(enc, tok, text).reshape(-1, 77, 6)
    chunks = chunk_prompt(text, tok, EOS)
    assert out.shape == (1, 77 * len(chunks), 6) and len(chunks) == 2
    w = torch.tensor([c.weights for c in chunks])[..., None]  # (2, 77, 1)
    for i in range(len(chunks)):
        expected = z[i] * w[i] * (z[i].mean() / (z[i] * w[i]).mean())
        got = out[0, 77 * i : 77 * (i + 1)]
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.mean(), z[i].mean(), rtol=1e-5, atol=1e-6)  # mean restored
    assert not torch.allclose(out, plain(enc, tok, text))  # the weights did something


def test_encoder_output_is_not_modified_in_place(tok):
    stored = torch.randn(1, 77, 4) + 1.0
    keep = stored.clone()
    encode_prompt("(a:1.4) b", lambda ids, cs: stored, tok, EOS)
    assert torch.equal(stored, keep)


@pytest.mark.parametrize("prompt,negative", [("a " * 160, "blurry"), ("cat", "b " * 80)])
def test_pair_padded_with_the_empty_prompt(enc, tok, prompt, negative):
    with torch.no_grad():
        cond, uncond = encode_pair(prompt, negative, enc, tok, EOS)
        short, long_ = (uncond, cond) if len(prompt) > len(negative) else (cond, uncond)
        n_long = len(chunk_prompt(prompt if short is uncond else negative, tok, EOS))
        assert cond.shape == uncond.shape == (1, 77 * n_long, 6)
        empty = encode_prompt("", enc, tok, EOS)
        own = encode_prompt(negative if short is uncond else prompt, enc, tok, EOS)
    assert torch.equal(short[:, :77], own)
    for k in range(1, n_long):
        assert torch.equal(short[:, 77 * k : 77 * (k + 1)], empty)


def test_pair_of_equal_length_is_not_padded(enc, tok):
    with torch.no_grad():
        cond, uncond = encode_pair("a cat", "", enc, tok, EOS)
    assert cond.shape == uncond.shape == (1, 77, 6)
    assert len(enc.calls) == 2  # no extra encoding of the empty prompt


def test_describe_prompt_is_json(tok):
    info = describe_prompt("a (cat:1.2), BREAK dog", tok, 0)
    json.dumps(info)
    assert info["ids"] == [BOS, A, 2368, COMMA, 1929, EOS]
    assert info["tokens"] == ["a</w>", "cat</w>", ",</w>", "dog</w>"]
    assert info["n_chunks"] == 2 and info["n_tokens"] == 4
    assert info["chunks"][0]["weights"][:4] == [1.0, 1.0, 1.2, 1.0]
    assert info["chunks"][1]["ids"][:4] == [BOS, 1929, EOS, 0]


def test_prompts_import_does_not_need_torch():
    import subprocess
    import sys

    code = ("import sys, sdcli.text.prompts as p, sdcli.text.clip_tokenizer as t;"
            "p.describe_prompt('(a:1.2) BREAK b', t.get_tokenizer(), 49407); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
