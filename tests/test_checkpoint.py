"""Checkpoint reading: key lists vs the real layouts, detection from headers, strictness, bad files, .ckpt
safety, --vae, hub resolution offline, hashes."""

from __future__ import annotations

import hashlib
import itertools
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers, tiny_sd2  # noqa: F401
from make_checkpoint import ldm_shapes, make_checkpoint, unet_diffusers_config, vae_diffusers_config
from safetensors.torch import load_file, save_file

from sdcli.loading import checkpoint as ck
from sdcli.loading.vae import load_vae
from sdcli.families import hub_patterns
from sdcli.families.sd2 import probe_v_prediction
from sdcli.formats.hashing import file_sha256
from sdcli.formats.hub import resolve_model
from sdcli.formats.ldm import UNET_PREFIX, VAE_PREFIX
from sdcli.formats.pickle_ckpt import convert_ckpt, load_ckpt
from sdcli.formats.safetensors import read_header
from sdcli.runtime.errors import BadInputError, ModelNotFoundError, NumericalError, UnsupportedModelError
from sdcli.models import TextConfig, UNetConfig, VAEConfig

ROOT = Path(__file__).resolve().parents[1]
# A copy of ../shared/reference/keys/sd15.tsv (the public SD1.5 single-file layout), so a clone tests alone.
SD15_TSV = ROOT / "tests" / "data" / "sd15_keys.tsv"
SD21_TSV = ROOT / "tests" / "data" / "sd21_keys.tsv"


def read_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            out[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out


def header_of(shapes: dict, **extra) -> dict:
    head = {k: {"dtype": "F16", "shape": list(s), "data_offsets": [0, 0]} for k, s in shapes.items()}
    head.update(extra)
    return head


# ---------------------------------------------------------------- key lists of the real layouts


def test_sd15_keys_equal_our_meta_models():
    ref = read_tsv(SD15_TSV)
    assert len(ref) == 1130
    assert ldm_shapes("sd1", "full") == ref


def test_sd15_header_detects_sd15_defaults():
    info = ck.detect(header_of(read_tsv(SD15_TSV)))
    assert (info.family, info.prediction, info.inpaint) == ("sd1", "eps", False)
    assert info.unet == UNetConfig() and info.vae == VAEConfig() and info.text == TextConfig()
    assert info.params["unet"] == 859_520_964 and info.params["vae"] == 83_653_863


def test_sd21_keys_equal_our_meta_models():
    assert ldm_shapes("sd2", "full") == read_tsv(SD21_TSV)


def test_sd21_header_detects_sd2_v():
    info = ck.detect(header_of(read_tsv(SD21_TSV)))
    assert info.family == "sd2" and not info.inpaint
    assert (info.prediction, info.prediction_source) == ("v", "guess")  # settled later by the probe
    u = info.unet
    assert (u.context_dim, u.head_dim, u.num_heads, u.use_linear_in_transformer) == (1024, 64, None, True)
    assert (u.model_channels, u.channel_mult, u.attention_levels) == (320, (1, 2, 4, 4), (True, True, True, False))
    t = info.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.hidden_act, t.pad_id) == (1024, 23, 16, "gelu", 0)


def _meta(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_sd21_keys_cross_checked_by_diffusers_converters():
    """diffusers' own converters map the SD2.1 list exactly onto diffusers/transformers SD2.1 models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    ref = _meta(read_tsv(SD21_TSV))
    info = ck.detect(header_of(read_tsv(SD21_TSV)))
    ucfg = unet_diffusers_config(info.unet, "sd2")
    assert ucfg["attention_head_dim"] == [5, 10, 20, 20]  # the published SD2.1 unet/config.json
    vcfg = vae_diffusers_config(info.vae)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in ucfg.items() if not k.startswith("_")})
        vae = AutoencoderKL(**{k: v for k, v in vcfg.items() if not k.startswith("_")})
        text = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                            num_attention_heads=16, hidden_act="gelu"))  # fmt: skip
    for model, converted in ((unet, convert_ldm_unet_checkpoint(ref, ucfg)), (vae, convert_ldm_vae_checkpoint(ref, vcfg))):
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in converted.items()} == want
    converted = {k.removeprefix("text_model."): tuple(v.shape) for k, v in convert_open_clip_checkpoint(text, ref).items()}
    want = {k.removeprefix("text_model."): tuple(v.shape) for k, v in text.state_dict().items()}
    # diffusers drops layer 23 and text_projection (SD2 conditions on the penultimate layer)
    assert converted == {k: s for k, s in want.items() if "layers.23." not in k}


# ---------------------------------------------------------------- detection


def test_detect_tiny_files(tiny_sd1, tiny_sd2, tiny_sd1_diffusers):
    one, two, folder = ck.detect(tiny_sd1), ck.detect(tiny_sd2), ck.detect(tiny_sd1_diffusers)
    assert (one.family, one.prediction, one.unet.num_heads, one.text_layout) == ("sd1", "eps", 8, "openai")
    assert (two.family, two.prediction, two.prediction_source) == ("sd2", "v", "metadata")
    assert (two.unet.head_dim, two.unet.use_linear_in_transformer, two.text_layout) == (64, True, "openclip")
    assert two.text.num_layers == 2  # 3 resblocks stored, the last one unused
    assert folder.unet == one.unet and folder.vae == one.vae and folder.text == one.text
    assert one.dtypes["unet"] == {"F32": len([k for k in read_header(tiny_sd1) if k.startswith(UNET_PREFIX)])}
    assert ck.detect(tiny_sd2, prediction="eps").prediction == "eps"


def test_detect_inpaint_and_prediction_hints():
    shapes = read_tsv(SD21_TSV)
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    info = ck.detect(header_of(shapes))
    assert info.inpaint and info.unet.in_channels == 9 and info.prediction == "eps"
    v = ck.detect(header_of(read_tsv(SD15_TSV), v_pred={"dtype": "F32", "shape": [], "data_offsets": [0, 4]}))
    assert (v.prediction, v.prediction_source) == ("v", "metadata")
    meta = ck.detect(header_of(read_tsv(SD21_TSV), __metadata__={"modelspec.prediction_type": "epsilon"}))
    assert (meta.prediction, meta.prediction_source) == ("eps", "metadata")
    with pytest.raises(BadInputError, match="prediction"):
        ck.detect(header_of(read_tsv(SD15_TSV)), prediction="x0")


def test_detect_vae_only_file_is_bad_input():
    shapes = {k: v for k, v in read_tsv(SD15_TSV).items() if k.startswith("first_stage_model.")}
    with pytest.raises(BadInputError, match="no UNet"):
        ck.detect(header_of(shapes))


class _FakeUNet(torch.nn.Module):
    def __init__(self, sign: float):
        super().__init__()
        self.config = UNetConfig(context_dim=8)
        self.w = torch.nn.Parameter(torch.ones(()))
        self.sign = sign

    def forward(self, x, t, context):
        assert t.tolist() == [999.0] and context.shape == (1, 2, 8)
        return self.sign * 3 * x


def test_v_probe_follows_a1111_rule():
    assert probe_v_prediction(_FakeUNet(-1.0))  # output far below the input: v
    assert not probe_v_prediction(_FakeUNet(1.0))


# ---------------------------------------------------------------- strict loading


def _rewrite(src: Path, dst: Path, edit) -> Path:
    state = load_file(src)
    edit(state)
    save_file(state, str(dst))
    return dst


def test_missing_extra_and_misshaped_keys_are_listed(tiny_sd1, tmp_path):
    drop = "model.diffusion_model.input_blocks.1.0.in_layers.2.bias"
    extra = "model.diffusion_model.surprise.weight"
    bad = "model.diffusion_model.out.2.bias"

    def edit(state):
        del state[drop]
        state[extra] = torch.zeros(3)
        state[bad] = torch.zeros(5)

    path = _rewrite(tiny_sd1, tmp_path / "broken.safetensors", edit)
    with pytest.raises(BadInputError) as e:
        ck.load_models(path)
    msg = str(e.value)
    assert str(path) in msg and "UNet" in msg
    assert f"missing: {drop[len(UNET_PREFIX):]}" in msg
    assert f"unexpected: {extra}" in msg
    assert f"wrong shape: {bad} [5] != [4]" in msg


def test_missing_text_key_is_listed(tiny_sd2, tmp_path):
    key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    path = _rewrite(tiny_sd2, tmp_path / "no_qkv.safetensors", lambda s: s.pop(key))
    with pytest.raises(BadInputError, match=r"text encoder.*missing:.*layers\.1\.self_attn\.k_proj\.weight"):
        ck.load_models(path)


def test_known_extras_are_ignored_and_old_clip_names_load(tiny_sd1, tmp_path):
    def edit(state):
        for k in [k for k in state if k.startswith("cond_stage_model.transformer.text_model.")]:
            state[k.replace("text_model.", "")] = state.pop(k)  # pre-4.x transformers naming
        state["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
        state["alphas_cumprod"] = torch.rand(1000)
        state["betas"] = torch.rand(1000)
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.diffusion_modelout2bias"] = torch.zeros(4)  # EMA copies are flattened names

    path = _rewrite(tiny_sd1, tmp_path / "extras.safetensors", edit)
    assert ck.detect(path).ignored_keys == 5
    a, b = ck.load_models(path), ck.load_models(tiny_sd1)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_nan_weight_is_a_numerical_error(tiny_sd1, tmp_path):
    key = "first_stage_model.decoder.conv_out.weight"

    def edit(state):
        state[key][0, 0, 0, 0] = float("nan")

    with pytest.raises(NumericalError, match=key.replace(".", r"\.")):
        ck.load_models(_rewrite(tiny_sd1, tmp_path / "nan.safetensors", edit))


@pytest.mark.parametrize("bad, where", [(float("inf"), 0), (float("nan"), 0), (float("-inf"), -1), (float("nan"), -1)])
def test_non_finite_value_in_any_piece_is_found(tiny_sd1, tmp_path, monkeypatch, bad, where):
    """Each weight is cast and checked in pieces: a bad value in the first or last piece of many counts."""
    from sdcli.formats import strict

    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"

    def edit(state):
        state[key].view(-1)[where] = bad

    monkeypatch.setattr(strict, "CAST_CHUNK", 7)  # every tensor read in many pieces
    with pytest.raises(NumericalError, match=key.replace(".", r"\.")):
        ck.load_models(_rewrite(tiny_sd1, tmp_path / "bad.safetensors", edit), dtype=torch.bfloat16)


def test_huge_finite_weights_load(tiny_sd1, tmp_path):
    """Finite values near float32's limit load as they are (a float32 sum of them would overflow)."""
    key = "first_stage_model.decoder.conv_out.weight"

    def edit(state):
        state[key].fill_(3.0e38)
        state[key][0].fill_(-3.0e38)

    models = ck.load_models(_rewrite(tiny_sd1, tmp_path / "huge.safetensors", edit))
    assert torch.equal(models.vae.decoder.conv_out.weight, load_file(tmp_path / "huge.safetensors")[key])


def test_half_to_half_cast_is_torchs_bit_for_bit():
    """cast_copy_ goes fp16 <-> bf16 through float32 (faster): the same bits as torch's own cast, every pattern."""
    from sdcli.formats.source import cast_copy_

    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for src_dtype, dst_dtype in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)):
        src = every.view(src_dtype)
        out = torch.empty(src.shape, dtype=dst_dtype)
        cast_copy_(out, src)
        ref = src.to(dst_dtype)
        nan = torch.isnan(ref)
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(out.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])


def test_fp16_file_loads_in_bf16_as_torch_casts(tmp_path):
    path = make_checkpoint(tmp_path / "half.safetensors", family="sd1", dtype=torch.float16)
    models, ref = ck.load_models(path, dtype=torch.bfloat16), load_file(path)
    w = models.unet.input_blocks[0][0].weight  # a conv weight: read into the layout it runs in
    assert torch.equal(w, ref["model.diffusion_model.input_blocks.0.0.weight"].to(torch.bfloat16))
    assert torch.equal(models.vae.decoder.conv_out.weight, ref["first_stage_model.decoder.conv_out.weight"].bfloat16())


def test_integer_weight_is_bad_input(tiny_sd1, tmp_path):
    key = "model.diffusion_model.out.2.bias"
    path = _rewrite(tiny_sd1, tmp_path / "int.safetensors", lambda s: s.update({key: torch.zeros(4, dtype=torch.int32)}))
    with pytest.raises(BadInputError, match=f"{key} has dtype I32"):
        ck.load_models(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_files_load_cast_once(tmp_path, dtype):
    path = make_checkpoint(tmp_path / "half.safetensors", family="sd1", dtype=dtype)
    models = ck.load_models(path, dtype=torch.float32)
    ref = load_file(path)
    w = models.unet.out[2].weight
    assert w.dtype == torch.float32 and torch.equal(w, ref["model.diffusion_model.out.2.weight"].float())
    assert not any(p.requires_grad or p.is_meta for p in models.unet.parameters())
    assert ck.detect(path).dtypes["vae"] == {"F16" if dtype == torch.float16 else "BF16": len(models.vae.state_dict())}


# ---------------------------------------------------------------- files that are not safetensors

BAD_FILES = {
    "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "git-LFS pointer"),
    "html": (b"<!DOCTYPE html><html><body>Not found</body></html>", "HTML"),
    "zip": (b"PK\x03\x04" + b"\0" * 100, "zip"),
    "pickle": (b"\x80\x04\x95" + b"\0" * 100, "pickle"),
    "gguf": (b"GGUF\x03\0\0\0" + b"\0" * 100, "GGUF"),
    "empty": (b"", "empty"),
    "short": (b"\x10\0\0", "too short"),
    "truncated_header": ((10**6).to_bytes(8, "little") + b'{"a":', "past the end"),
    "not_json": ((4).to_bytes(8, "little") + b"\xff\xfe{}", "not JSON"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_read_header_names_the_problem(tmp_path, kind):
    data, expect = BAD_FILES[kind]
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(data)
    with pytest.raises(BadInputError, match=expect) as e:
        read_header(path)
    assert str(path) in str(e.value)


def test_truncated_tensor_data(tiny_sd1, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(tiny_sd1.read_bytes()[:-1000])
    with pytest.raises(BadInputError, match="truncated"):
        read_header(path)


# ---------------------------------------------------------------- .ckpt (pickle), restricted


@pytest.fixture()
def lightning_ckpt(tiny_sd1, tmp_path, monkeypatch):
    """An old-style SD .ckpt: state_dict plus a pickled pytorch_lightning ModelCheckpoint callback."""
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = "val/loss"

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": load_file(tiny_sd1), "global_step": 470000, "callbacks": {"cb": ModelCheckpoint()}}, path)
    monkeypatch.delitem(sys.modules, mod.__name__)  # loading must not need Lightning
    return path


def test_ckpt_loads_and_converts(lightning_ckpt, tiny_sd1, tmp_path):
    state = load_ckpt(lightning_ckpt)
    ref = load_file(tiny_sd1)
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    out = convert_ckpt(lightning_ckpt, tmp_path / "old.safetensors")
    conv = load_file(out)
    assert conv.keys() == ref.keys() and all(torch.equal(conv[k], ref[k]) for k in ref)
    models = ck.load_models(lightning_ckpt)
    assert torch.equal(models.unet.out[2].bias, ref["model.diffusion_model.out.2.bias"])


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.safetensors", "evil.pt", "evil"])
@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_never_runs(tmp_path, name, fmt):
    marker = tmp_path / "marker.txt"
    path = tmp_path / name
    payload = {"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "evil": _Evil(marker)}
    if fmt == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    for call in (ck.load_models, ck.detect, load_ckpt, read_header, lambda p: convert_ckpt(p, tmp_path / "o.safetensors")):
        with pytest.raises(BadInputError):
            call(path)
    assert not marker.exists()
    assert not (tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------- --vae, hub, hashes


def test_vae_override_from_standalone_and_diffusers_files(tiny_sd1, tiny_sd1_diffusers, tmp_path):
    other = load_file(make_checkpoint(tmp_path / "seed7.safetensors", family="sd1", seed=7))
    standalone = {k[len(VAE_PREFIX):]: v for k, v in other.items() if k.startswith(VAE_PREFIX)}
    standalone["model_ema.decay"] = torch.tensor(0.999)
    save_file(standalone, str(tmp_path / "vae-ft-mse.safetensors"))
    models = ck.load_models(tiny_sd1, vae=tmp_path / "vae-ft-mse.safetensors")
    assert torch.equal(models.vae.decoder.conv_out.weight, standalone["decoder.conv_out.weight"])
    assert models.vae_source == tmp_path / "vae-ft-mse.safetensors"
    base = ck.load_models(tiny_sd1)
    folder_vae = load_vae(tiny_sd1_diffusers / "vae")
    sa, sb = folder_vae.state_dict(), base.vae.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)
    with pytest.raises(ModelNotFoundError):
        load_vae(tmp_path / "nope.safetensors")


def test_missing_local_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve_model(str(tmp_path / "missing.safetensors"), hub_patterns())


def test_hub_id_offline_with_cold_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("stable-diffusion-v1-5/stable-diffusion-v1-5", hub_patterns())
    msg = str(e.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "offline" in msg and "local" in msg


def test_file_sha256(tiny_sd1):
    assert file_sha256(tiny_sd1) == hashlib.sha256(tiny_sd1.read_bytes()).hexdigest()
    assert file_sha256(tiny_sd1) == file_sha256(str(tiny_sd1))  # cached, same answer


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("target", [torch.bfloat16, torch.float32])
def test_stream_reads_pieces_into_final_dtype_and_layout(tmp_path, stored, target):
    """WeightSource.stream fills the final tensor by blocks of whole rows (one reused buffer, or straight in when
    dtype and layout agree), contiguous or channels_last: the same values as reading the whole tensor and
    casting it, for any piece size, every element written exactly once."""
    from safetensors.torch import save_file

    from sdcli.formats.diffusers import open_source

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(5, 7, generator=g).to(stored), "b": torch.randn(3, generator=g).to(stored),
               "conv": torch.randn(6, 4, 3, 3, generator=g).to(stored), "empty": torch.zeros(0, 4, dtype=stored)}
    save_file(tensors, tmp_path / "w.safetensors")
    source = open_source(tmp_path / "w.safetensors")
    for key, want in tensors.items():
        layouts = [torch.contiguous_format] + ([torch.channels_last] if want.dim() == 4 else [])
        for layout, piece in itertools.product(layouts, (1, 6, 35, 100, 1000)):
            out = torch.full(want.shape, float("nan"), dtype=target).contiguous(memory_format=layout)
            blocks = list(source.stream(key, out, piece))
            assert torch.equal(out, want.to(target)), (key, layout, piece)
            assert out.is_contiguous(memory_format=layout)
            assert sum(b.numel() for b in blocks) == want.numel()
            row = want[0].numel() if want.dim() and want.shape[0] else 1
            assert all(b.numel() <= max(piece, row) and b.numel() % row == 0 for b in blocks)
    source.close()


def test_bf16_cpu_conv_weights_load_in_channels_last(tiny_sd1, monkeypatch):  # noqa: F811
    """On a bf16 CPU run the UNet's and VAE's conv weights are read straight into channels_last (the layout they
    run in: converting them at the first call left the contiguous copies in the heap); fp32 too on an x86-64 CPU;
    everything stays contiguous with SDCLI_CPU_CHANNELS_LAST=0."""
    from sdcli.loading.checkpoint import load_models
    from sdcli.runtime.device import cpu_onednn

    def layouts(models):
        convs = [m.weight for part in (models.unet, models.vae) for m in part.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
        return {w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs}

    assert layouts(load_models(tiny_sd1, dtype=torch.bfloat16)) == {True}
    assert layouts(load_models(tiny_sd1, dtype=torch.float32)) == {cpu_onednn()}
    monkeypatch.setenv("SDCLI_CPU_CHANNELS_LAST", "0")
    assert layouts(load_models(tiny_sd1, dtype=torch.bfloat16)) == {False}
    assert layouts(load_models(tiny_sd1, dtype=torch.float32)) == {False}
