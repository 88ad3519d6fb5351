"""Textual-inversion files, the embeddings folder, and where embeddings land in a prompt's chunks."""

from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace

import pytest
import torch
from _fixtures_embeddings import random_vectors, write_embedding
from _fixtures_pipeline import clip_tokenizer_dir  # noqa: F401

from sdcli.text import prompts
from sdcli.text.embeddings import (
    ANY_ENCODER,
    EmbeddingRef,
    Skipped,
    find_embeddings,
    find_triggers,
    fit,
    mentioned_names,
    name_of_ref,
    read_embedding,
    split_embedding_refs,
    trigger_table,
    units_of_piece,
    units_of_text,
)
from sdcli.runtime.errors import BadInputError
from sdcli.text.prompts import Slot
from sdcli.text.clip_tokenizer import get_tokenizer

SD1 = {"clip_l": 64}
SDXL = {"clip_l": 32, "clip_g": 48}

# ---------------------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("fmt,suffix", [("a1111_pt", ".pt"), ("old_pt", ".pt"), ("emb_params", ".safetensors"),
                                        ("diffusers_bin", ".bin"), ("diffusers_st", ".safetensors")])
@pytest.mark.parametrize("n", [1, 3])
def test_each_single_encoder_format(tmp_path, fmt, suffix, n):
    t = random_vectors(n, 64, seed=n)
    path = write_embedding(tmp_path / f"fooemb{suffix}", fmt, {"*": t})
    emb = read_embedding(path)
    assert emb.name == "fooemb" and emb.n_vectors == n
    assert set(emb.vectors) == {ANY_ENCODER} and torch.equal(emb.vectors[ANY_ENCODER], t)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert emb.sha256 == sha and emb.short_hash == sha[:12]
    fitted = fit(emb, SD1)
    assert set(fitted.vectors) == {"clip_l"} and torch.equal(fitted.vectors["clip_l"], t)


def test_sdxl_format_and_widths(tmp_path):
    vec = {"clip_l": random_vectors(2, 32, 1), "clip_g": random_vectors(2, 48, 2)}
    emb = read_embedding(write_embedding(tmp_path / "xlemb.safetensors", "sdxl", vec))
    assert emb.n_vectors == 2
    fitted = fit(emb, SDXL)
    assert torch.equal(fitted.vectors["clip_l"], vec["clip_l"]) and torch.equal(fitted.vectors["clip_g"], vec["clip_g"])
    # an SDXL embedding on SD1, an SD1 embedding on SDXL, a wrong width: skipped with a reason, never raised
    for emb_, widths in [(emb, {"clip_l": 64}), (emb, {"clip_l": 32, "clip_g": 64})]:
        skipped = fit(emb_, widths)
        assert isinstance(skipped, Skipped) and skipped.name == "xlemb" and "do not fit" in skipped.reason
    sd1 = read_embedding(write_embedding(tmp_path / "sd1.pt", "a1111_pt", {"*": random_vectors(1, 32)}))
    assert isinstance(fit(sd1, SDXL), Skipped)  # clip_l width, but not a clip_l/clip_g file (A1111 skips it)
    assert isinstance(fit(sd1, {"clip_h": 1024}), Skipped)


def test_sdxl_with_unequal_vector_counts_is_refused(tmp_path):
    vec = {"clip_l": random_vectors(2, 32), "clip_g": random_vectors(3, 48)}
    with pytest.raises(BadInputError, match="clip_l has 2 vectors but clip_g 3"):
        read_embedding(write_embedding(tmp_path / "bad.safetensors", "sdxl", vec))


class _WritesAFile:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_pickle_with_any_other_object_is_refused_without_running_it(tmp_path):
    target = tmp_path / "was_run"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 64)}, "payload": _WritesAFile(str(target))}, path)
    with pytest.raises(BadInputError, match="refused or unreadable embedding pickle"):
        read_embedding(path)
    assert not target.exists()
    # a pickled module (not the ParameterDict data we allow) is refused too
    torch.save({"string_to_param": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(BadInputError, match="refused"):
        read_embedding(tmp_path / "module.pt")


@pytest.mark.parametrize("content,message", [
    (None, "empty"),
    ({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, "not a textual-inversion embedding"),
    ({"string_to_param": {"*": torch.zeros(1, 4), "x": torch.zeros(1, 4)}}, "exactly one"),
    ({"string_to_param": {"*": "text"}}, "not a float tensor"),
    ({"emb_params": torch.zeros(2, 3, 4)}, "expected \\(vectors, width\\)"),
    ({"emb_params": torch.zeros(2, 4, dtype=torch.int64)}, "not a float tensor"),
    ({"emb_params": torch.full((2, 4), float("nan"))}, "NaN"),
    ([1, 2, 3], "not an embedding"),
    ("just a string", "not an embedding"),
])  # fmt: skip
def test_odd_files_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "odd.pt"
    if content is None:
        path.write_bytes(b"")
    else:
        torch.save(content, path)
    with pytest.raises(BadInputError, match=message) as err:
        read_embedding(path)
    assert str(path) in str(err.value)


def test_odd_safetensors(tmp_path):
    html = tmp_path / "page.safetensors"
    html.write_bytes(b"<html>404</html>")
    with pytest.raises(BadInputError, match="HTML"):
        read_embedding(html)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(BadInputError, match="refused or unreadable"):
        read_embedding(garbage)


# ---------------------------------------------------------------------------------------------------------
# Folder


def test_folder_with_sub_folders_and_duplicates(tmp_path):
    t = {"*": random_vectors(1, 8)}
    top = write_embedding(tmp_path / "dup.pt", "a1111_pt", t)
    sub = write_embedding(tmp_path / "b" / "dup.safetensors", "emb_params", t)
    deeper = write_embedding(tmp_path / "a" / "c" / "Other.bin", "diffusers_bin", t)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "dup.preview.png").write_bytes(b"\x89PNG")
    found = find_embeddings(tmp_path)
    assert found.paths == {"dup": sub, "Other": deeper}  # a sub-folder's file wins, as in A1111's top-down walk
    assert found.shadowed == [top]
    with pytest.raises(BadInputError, match="no such folder"):
        find_embeddings(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------
# Triggers


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_trigger_is_a_whole_bpe_sequence(tok):
    table = trigger_table(["myemb", "bad-hands-5"], tok.encode)
    assert find_triggers(tok.encode("a MyEmb, b"), table) == [(1, 2, "myemb")]  # CLIP lowercases
    assert find_triggers(tok.encode("xmyembx"), table) == []  # inside another word: other BPE ids
    ids = tok.encode("a bad-hands-5 b myemb")
    assert find_triggers(ids, table) == [(1, 5, "bad-hands-5"), (7, 2, "myemb")]


def test_longest_name_first(tok):
    table = trigger_table(["foo", "foo bar"], tok.encode)
    assert find_triggers(tok.encode("foo bar foo"), table) == [(0, 2, "foo bar"), (2, 1, "foo")]


def test_units_keep_skipped_triggers_as_words(tok):
    table = trigger_table(["myemb", "other"], tok.encode)
    ids = tok.encode("a myemb and other")
    units = units_of_piece(ids, table, {"myemb": 3})  # "other" was skipped (width): stays as its words
    assert units == [ids[0], Slot("myemb", 3), *ids[3:]]


def test_comfyui_embedding_syntax(tok):
    assert split_embedding_refs("a embedding:foo, b") == ["a ", EmbeddingRef("foo"), ", b"]
    assert split_embedding_refs("xembedding:foo") == ["xembedding:foo"]
    assert name_of_ref(EmbeddingRef("sub/foo.pt")) == "foo" and name_of_ref(EmbeddingRef("foo.v2")) == "foo.v2"
    table = trigger_table(["bar"], tok.encode)
    units, missing = units_of_text("embedding:sub/foo.safetensors bar embedding:nope", tok.encode, table,
                                   {"foo": 2, "bar": 1})
    assert units == [Slot("foo", 2), Slot("bar", 1)] and missing == ["nope"]
    assert mentioned_names("(a embedding:foo bar) bar", tok.encode, table) == ["foo", "bar"]


# ---------------------------------------------------------------------------------------------------------
# Chunks


def layout_chunks(pieces, tok):
    """The chunks' prompt tokens (no bos/eos/padding), weights and embedding places: prompts' one chunker."""
    return [SimpleNamespace(ids=c.ids[1:1 + c.n_tokens], weights=c.weights[1:1 + c.n_tokens], fixes=c.fixes)
            for c in prompts.chunk_units(pieces, tok, tok.eos_id)]


def _pieces(text: str, tok, table, n_vectors):
    out = []
    for piece, weight in prompts.parse_attention(text):
        if (piece, weight) == prompts.BREAK:
            out.append(None)
        else:
            out.append((units_of_text(piece, tok.encode, table, n_vectors)[0], weight))
    return out


def test_embedding_positions_and_weights(tok):
    table = trigger_table(["fooemb"], tok.encode)
    (chunk,) = layout_chunks(_pieces("a photo of (fooemb:1.2) on a table", tok, table, {"fooemb": 2}), tok)
    plain = tok.encode("a photo of")
    assert chunk.fixes == [(len(plain), "fooemb")]
    assert chunk.ids[:5] == [*plain, 0, 0] and chunk.weights[3:5] == [1.2, 1.2]
    assert len(chunk.ids) == len(tok.encode("a photo of x x on a table"))  # it counts as n tokens


def test_multi_vector_embedding_moves_whole_to_the_next_chunk(tok):
    table = trigger_table(["fooemb"], tok.encode)
    x = tok.encode("x")[0]
    chunks = layout_chunks([([x] * 74 + [Slot("fooemb", 3)] + [x], 1.0)], tok)
    assert [len(c.ids) for c in chunks] == [74, 4]  # 74 + 3 > 75: the first chunk is closed short
    assert chunks[0].fixes == [] and chunks[1].fixes == [(0, "fooemb")]
    # exactly fitting: 72 + 3 = 75 stays
    chunks = layout_chunks([([x] * 72 + [Slot("fooemb", 3)] + [x], 1.0)], tok)
    assert [len(c.ids) for c in chunks] == [75, 1] and chunks[0].fixes == [(72, "fooemb")]
    # through the text path: the name starting at token 74
    text = " ".join(["x"] * 74) + " fooemb y"
    chunks = layout_chunks(_pieces(text, tok, table, {"fooemb": 2}), tok)
    assert chunks[1].fixes == [(0, "fooemb")] and chunks[1].ids[:2] == [0, 0]


def test_comma_backtrack_carries_the_embedding(tok):
    x, comma = tok.encode("x")[0], tok.encode(",")[0]
    units = [x] * 60 + [comma] + [x] * 5 + [Slot("e", 2)] + [x] * 7 + [x]  # 75 tokens, then the 76th forces the cut
    chunks = layout_chunks([(units, 1.0)], tok)
    assert [len(c.ids) for c in chunks] == [61, 15]  # 14 moved after the comma, then the new one
    assert chunks[0].fixes == [] and chunks[1].fixes == [(5, "e")]
    assert chunks[1].ids[5:7] == [0, 0]


def test_too_many_vectors_is_a_clear_error(tok):
    with pytest.raises(BadInputError, match="76 vectors"):
        layout_chunks([([Slot("huge", 76)], 1.0)], tok)


def test_positions_match_diffusers_textual_inversion_tokens(clip_tokenizer_dir):  # noqa: F811
    """diffusers: fooemb -> added tokens "fooemb fooemb_1" (maybe_convert_prompt); the rows it replaces must be
    the rows our fixes name, and every other id the same."""
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(clip_tokenizer_dir, pad_token="<|endoftext|>", model_max_length=77)
    hf.add_tokens(["fooemb", "fooemb_1"])
    prompt = "a photo of fooemb on a table, fooemb"
    converted = TextualInversionLoaderMixin._maybe_convert_prompt(None, prompt, hf)
    want = hf(converted).input_ids  # bos ... eos
    tok = get_tokenizer()
    (chunk,) = layout_chunks(_pieces(prompt, tok, trigger_table(["fooemb"], tok.encode), {"fooemb": 2}), tok)
    added = [i for i, t in enumerate(want) if t >= 49408]
    ours = [offset + 1 + k for offset, _ in chunk.fixes for k in range(2)]  # +1: bos
    assert ours == added
    window = [tok.bos_id, *chunk.ids, tok.eos_id]
    assert [t for i, t in enumerate(window) if i not in added] == [t for i, t in enumerate(want) if i not in added]
