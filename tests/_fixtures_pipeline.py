"""Session fixtures for the end-to-end tests (test_pipeline_oracle.py, test_commands.py).

- ``one_thread``: run torch on one intra-op thread for these modules. The tiny models do microseconds of
  work per op; with two OpenMP threads on a shared, oversubscribed 2-core machine every op waits at a
  barrier for a descheduled thread, which made a 6-step 8x8 run take 5-30 s instead of 0.1 s.
- ``clip_tokenizer_dir``: a Hugging Face CLIP tokenizer folder (vocab.json + merges.txt) written from
  sdcli's shipped BPE file the way OpenAI CLIP's ``SimpleTokenizer`` builds its vocabulary: 256 byte
  symbols, the same with ``</w>``, one token per merge (the first 48,894), then the two special tokens.
- ``sd1_models`` / ``sd2_models``: our pipeline's models, loaded once from the tiny single files.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd2  # noqa: F401


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdcli.text.clip_tokenizer import N_MERGES, VOCAB_FILE, _bytes_to_unicode

    data = resources.files("sdcli").joinpath("data", VOCAB_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is the "#version" header
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    out = tmp_path_factory.mktemp("clip_tokenizer")
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


@pytest.fixture(scope="session")
def sd1_models(tiny_sd1):  # noqa: F811
    from sdcli.loading.checkpoint import load_models

    return load_models(tiny_sd1)


@pytest.fixture(scope="session")
def sd2_models(tiny_sd2):  # noqa: F811
    from sdcli.loading.checkpoint import load_models

    return load_models(tiny_sd2)
