"""Model residency (loading/residency.py): the policies keep, lean and offload write the same bytes, parts are built
when first used and really let go when released, a rebuilt part gets what changed its modules (LoRA merges,
seamless padding), and a rebuild never reads a file rewritten since the load.

Every render runs once per policy (SDCLI_RESIDENCY), on the CPU, and on CUDA too when one is there."""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from make_checkpoint import make_checkpoint, make_controlnet
from PIL import Image
from safetensors.torch import load_file, save_file

from _cli import invoker
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from _fixtures_sdxl import tiny_sdxl, tiny_sdxl_dir, tiny_sdxl_refiner  # noqa: F401
from sdcli import pipeline
from sdcli.loading import residency
from sdcli.loading.checkpoint import load_models
from sdcli.runtime.errors import BadInputError
from sdcli.loading.lora import _part_targets
from sdcli.loading.residency import Residency

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RENDER = ["--dtype", "fp32", "--steps", "3", "-W", "64", "-H", "64", "--sampler", "euler", "--cfg", "5",
          "--seed", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_inpaint(tiny_models_dir: Path) -> Path:  # noqa: F811
    out = tiny_models_dir / "tiny_sd1_inpaint.safetensors"
    if not out.exists():
        make_checkpoint(out, "sd1", "tiny", seed=0, layout="single", inpaint=True)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_sd1):  # noqa: F811
    """A picture, a mask, a ControlNet and a kohya LoRA touching UNet and text encoder."""
    folder = tmp_path_factory.mktemp("residency_inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "in.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    make_controlnet(folder / "cn.safetensors", "sd1")
    (folder / "loras").mkdir()
    _make_lora(load_models(tiny_sd1), folder / "loras" / "style.safetensors")
    return folder


def _make_lora(models, path: Path) -> None:
    """Rank-2 kohya LoRA on every 4th adapted Linear of the UNet and of the text encoder (LDM spellings)."""
    gen = torch.Generator().manual_seed(1)
    state = {}
    for part, modules in (("unet", (models.unet,)), ("text", models.text_encoders)):
        seen = set()
        linears = [(name, m) for name, m in _part_targets(part, modules, models.info.unet).items()
                   if isinstance(m, torch.nn.Linear) and not (id(m) in seen or seen.add(id(m)))]
        for name, module in linears[::4]:
            out_f, in_f = module.weight.shape
            state[f"{name}.lora_down.weight"] = torch.randn(2, in_f, generator=gen) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(out_f, 2, generator=gen) * 0.3
            state[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))


def _render_everywhere(tmp_path, monkeypatch, model: Path, command: str, *args: str, device: str = "cpu") -> dict:
    """{policy: {file name: bytes}} of one command run under each policy in its own folder."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    out = {}
    for policy in residency.POLICIES:
        folder = tmp_path / policy
        folder.mkdir()
        monkeypatch.chdir(folder)
        monkeypatch.setenv(residency.POLICY_ENV, policy)
        run = invoker({})
        run(command, *args, "-m", str(model), "--device", device, *(RENDER if command == "generate" else RENDER[:2]))
        out[policy] = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".png"}
        assert out[policy], f"{policy}: nothing written"
    return out


def _assert_same(outputs: dict) -> None:
    keep = outputs["keep"]
    for policy, files in outputs.items():
        assert files.keys() == keep.keys(), policy
        for name in keep:
            assert files[name] == keep[name], f"{policy}: {name} differs from keep's"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["batch", "seamless", "hires", "controlnet"])
def test_txt2img_bytes_equal_under_every_policy(case, device, tiny_sd1, inputs, tmp_path, monkeypatch):  # noqa: F811
    args = {"batch": ["-n", "2", "--batch-size", "2", "-o", "b-{index}.png"],
            "seamless": ["--seamless", "-n", "2", "-o", "s-{index}.png"],
            "hires": ["--hires-scale", "1.5", "-o", "h.png"],
            "controlnet": ["--controlnet", str(inputs / "cn.safetensors"), "--control-image",
                           str(inputs / "in.png"), "-o", "c.png"]}[case]
    _assert_same(_render_everywhere(tmp_path, monkeypatch, tiny_sd1, "generate", "a fox", *args, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_prompts_file_switching_loras_bytes_equal(device, tiny_sd1, inputs, tmp_path, monkeypatch):  # noqa: F811
    """Three jobs: LoRA, none, LoRA again: merged into parts built (and rebuilt) at different moments."""
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"prompt": "a fox <lora:style:0.8>", "output": "j1.png"}, {"prompt": "a fox", "output": "j2.png"},
             {"prompt": "a cat <lora:style:-0.5>", "output": "j3.png", "seamless": True}]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    outputs = _render_everywhere(tmp_path, monkeypatch, tiny_sd1, "generate", "--prompts-file", str(jobs),
                                 "--lora-dir", str(inputs / "loras"), device=device)
    _assert_same(outputs)
    files = outputs["keep"]
    assert files["j1.png"] != files["j2.png"]  # the LoRA changed something, both times it was merged


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["img2img", "inpaint"])
def test_img2img_bytes_equal_under_every_policy(case, device, tiny_sd1, tiny_inpaint, inputs, tmp_path,
                                                monkeypatch):  # noqa: F811
    model, extra = (tiny_sd1, ["--strength", "0.6"]) if case == "img2img" else \
        (tiny_inpaint, ["--mask", str(inputs / "mask.png")])  # fmt: skip
    _assert_same(_render_everywhere(tmp_path, monkeypatch, model, "img2img", "a fox", "-i", str(inputs / "in.png"),
                                    "--steps", "3", "--seed", "3", "--sampler", "euler", "-o", "i.png", *extra,
                                    "--lora", str(inputs / "loras" / "style.safetensors"), device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_sdxl_with_refiner_bytes_equal(device, tiny_sdxl, tiny_sdxl_refiner, tmp_path, monkeypatch):  # noqa: F811
    """Two text encoders, the vector y, and a second model joining the first one's group."""
    _assert_same(_render_everywhere(tmp_path, monkeypatch, tiny_sdxl, "generate", "a fox", "-n", "2", "--refiner",
                                    str(tiny_sdxl_refiner), "--refiner-switch", "0.6", "-o", "x-{index}.png",
                                    device=device))


# --- what is resident when -----------------------------------------------------------------------------------

def _stages(models):
    """Encode, sample, decode one 64px image, reporting what is resident after each stage."""
    plan = pipeline.make_plan("euler", "auto", 2, cfg=5.0, family=models.family)
    seen = {}
    cond, uncond = pipeline.encode_text(models, "a fox", "")
    seen["text"] = models.parts.resident()
    latents = pipeline.txt2img(models, plan, cond, uncond, [1], 64, 64)
    seen["unet"] = models.parts.resident()
    models.parts.done_sampling()
    pipeline.decode_latents(models, latents)
    seen["vae"] = models.parts.resident()
    return seen


def test_lean_builds_each_part_when_needed_and_lets_it_go(tiny_sd1):  # noqa: F811
    models = load_models(tiny_sd1, residency="lean")
    assert models.parts.resident() == {}  # headers checked, nothing read
    encoders = weakref.ref(models.text_encoder)
    seen = _stages(models)
    assert seen == {"text": {"text": "cpu"}, "unet": {"unet": "cpu"}, "vae": {"vae": "cpu"}}
    gc.collect()
    assert encoders() is None  # released means gone, not merely forgotten by the residency
    assert [e for e in models.parts.events if e[1] == "vae"] == [("build", "vae")]  # at the decode, once
    unet = weakref.ref(models.unet)  # asked for again: rebuilt
    assert models.parts.resident() == {"unet": "cpu", "vae": "cpu"}
    models.parts.done_sampling()
    gc.collect()
    assert unet() is None and models.parts.resident() == {"vae": "cpu"}


def test_offload_keeps_one_part_and_keep_keeps_all(tiny_sd1):  # noqa: F811
    seen = _stages(load_models(tiny_sd1, residency="offload"))
    assert seen == {"text": {"text": "cpu"}, "unet": {"unet": "cpu"}, "vae": {"vae": "cpu"}}
    seen = _stages(load_models(tiny_sd1, residency="keep"))
    assert all(parts == {"text": "cpu", "unet": "cpu", "vae": "cpu"} for parts in seen.values())


def test_offload_cli_run_never_holds_two_parts(tiny_sdxl, tiny_sdxl_refiner, tmp_path, monkeypatch):  # noqa: F811
    """Across a whole run with a refiner (two models, one group): at most one part in memory at any build."""
    most = []
    build = Residency._build

    def counting(self, part):
        build(self, part)
        most.append(sum(len(member.parts) for member in self.group))

    monkeypatch.setattr(Residency, "_build", counting)
    monkeypatch.delenv(residency.POLICY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    run = invoker({})
    run("generate", "a fox", "-m", str(tiny_sdxl), "--device", "cpu", *RENDER, "-n", "2", "--offload",
        "--refiner", str(tiny_sdxl_refiner), "-o", "x-{index}.png")
    assert most == [1] * 8  # two texts for the job, then 2 images x (2 UNets, a VAE): each alone


def test_policy_choice(monkeypatch):
    monkeypatch.delenv(residency.POLICY_ENV, raising=False)
    assert (residency.choose(False, "cpu"), residency.choose(False, "cuda"), residency.choose(True, "cuda"),
            residency.choose(False, "cuda", lazy=True)) == ("lean", "keep", "offload", "lean")
    monkeypatch.setenv(residency.POLICY_ENV, "keep")
    assert residency.choose(True, "cpu") == "keep"
    monkeypatch.setenv(residency.POLICY_ENV, "sometimes")
    with pytest.raises(Exception, match="SDCLI_RESIDENCY"):
        residency.choose(False, "cpu")


def test_seamless_pads_a_part_built_inside_and_undoes_what_is_resident(tiny_sd1):  # noqa: F811
    models = load_models(tiny_sd1, residency="lean")

    def modes(module):
        return {m.padding_mode for m in module.modules() if isinstance(m, torch.nn.Conv2d) and max(m.padding) > 0}

    with pipeline.seamless(models):
        vae = models.vae  # built inside
        assert modes(vae) == {"circular"}
    assert modes(vae) == {"zeros"}


# --- rebuilds refused or failing cleanly ---------------------------------------------------------------------

def test_rebuild_after_the_file_changed_is_refused(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    """Job 2 needs the text encoder lean released after job 1: the file was rewritten meanwhile -> exit 3."""
    from sdcli.app import save

    model = tmp_path / "m.safetensors"
    model.write_bytes(tiny_sd1.read_bytes())
    write = save.save_rendered

    def write_then_touch(*args, **kwargs):  # the file changes once the first image is out
        write(*args, **kwargs)
        st = model.stat()
        os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    monkeypatch.setattr(save, "save_rendered", write_then_touch)
    monkeypatch.setenv(residency.POLICY_ENV, "lean")
    monkeypatch.chdir(tmp_path)
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a fox\na cat\n")
    result = invoker({})("generate", "--prompts-file", str(jobs), "-m", str(model), "--device", "cpu", *RENDER,
                         "-o", "j-{index}.png", expect=3)
    assert f"error: {model}: changed on disk since it was loaded" in result.stderr
    assert (tmp_path / "j-0.png").exists() and not (tmp_path / "j-1.png").exists()
    with pytest.raises(BadInputError, match="changed on disk"):  # the library says it the same way
        models = load_models(model, residency="lean")
        models.text_encoders
        model.write_bytes(model.read_bytes() + b"")  # same bytes, a new mtime
        os.utime(model, ns=(0, 1))
        models.unet


def test_nan_in_a_lazily_read_vae_is_exit_5_with_nothing_written(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    state = load_file(str(tiny_sd1))
    state["first_stage_model.decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp_path / "nan_vae.safetensors"
    save_file(state, str(bad))
    assert load_models(bad, residency="lean").parts.resident() == {}  # the load itself reads no value
    monkeypatch.setenv(residency.POLICY_ENV, "lean")
    monkeypatch.chdir(tmp_path)
    result = invoker({})("generate", "a fox", "-m", str(bad), "--device", "cpu", *RENDER, "-n", "2",
                         "-o", "o-{index}.png", expect=5)
    assert "NaN or Inf" in result.stderr
    assert not list(tmp_path.glob("o-*.png"))


def test_header_problems_still_fail_at_load(tiny_sd1, tmp_path):  # noqa: F811
    state = load_file(str(tiny_sd1))
    state["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3, dtype=torch.int32)
    bad = tmp_path / "int_vae.safetensors"
    save_file(state, str(bad))
    with pytest.raises(BadInputError, match="conv_out.bias has dtype I32"):
        load_models(bad, residency="lean")


def test_encode_and_decode_read_only_the_part_they_use(tiny_sd1, inputs, tmp_path, monkeypatch):  # noqa: F811
    built = []
    build = Residency._build
    monkeypatch.setattr(Residency, "_build", lambda self, part: (built.append(part), build(self, part)))
    monkeypatch.delenv(residency.POLICY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    run = invoker({name: ["-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32"]
                   for name in ("encode", "decode")})
    run("encode", str(inputs / "in.png"), "-o", "in.latent")
    run("decode", "in.latent", "-o", "back.png")
    assert built == ["vae", "vae"]
    built.clear()
    run("encode", "--text", "a fox <lora:style:0.5>", "--lora-dir", str(inputs / "loras"), "-o", "fox.emb.safetensors")
    assert built == ["text"]  # the LoRA's UNet half is checked against names and shapes, never read


def test_offload_from_a_config_is_not_recorded(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    """`offload: true` in YAML picks the policy; the image does not record it (the bytes are the same)."""
    policies = []
    build = Residency._build
    monkeypatch.setattr(Residency, "_build", lambda self, part: (policies.append(self.policy), build(self, part)))
    monkeypatch.delenv(residency.POLICY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "low.yaml").write_text("offload: true\n")
    run = invoker({"generate": ["-m", str(tiny_sd1), "--device", "cpu", *RENDER]})
    run("generate", "a fox", "--config", "low.yaml", "-o", "low.png")
    assert set(policies) == {"offload"}
    policies.clear()
    run("generate", "a fox", "-o", "plain.png")
    assert set(policies) == {"lean"}
    assert (tmp_path / "low.png").read_bytes() == (tmp_path / "plain.png").read_bytes()


def test_a_pickle_checkpoint_is_read_once_at_load_and_rebuilt_equal(tiny_sd1, tmp_path):  # noqa: F811
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": load_file(str(tiny_sd1))}, path)
    models = load_models(path, residency="lean")
    assert models.parts.resident() == {"text": "cpu", "unet": "cpu", "vae": "cpu"}  # one unpickling for all
    before = {k: v.clone() for k, v in models.text_encoder.state_dict().items()}
    models.stage("unet")
    assert "text" not in models.parts.resident()
    after = models.text_encoder.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_offload_on_an_accelerator_moves_parts_and_companions(monkeypatch):
    """The device bookkeeping of offload on CUDA, without a GPU: the one move function records instead of moving.
    Parts are read into CPU RAM, each goes to the device for its stage and home after; a ControlNet follows the
    UNet; nothing is released."""
    moves = []
    monkeypatch.setattr(residency, "_to", lambda module, device: moves.append((module, device.type)))
    made = {part: torch.nn.Linear(2, 2) for part in ("unet", "vae")}
    made["text"] = (torch.nn.Linear(2, 2),)
    parts = Residency({part: (lambda part=part: made[part]) for part in made}, {}, "offload",
                      torch.device("cuda"), torch.float16, {})
    assert parts.home.type == "cpu"
    net = torch.nn.Linear(2, 2)
    parts.attach("unet", net)
    assert parts.stage("text") is made["text"] and parts.resident() == {"text": "cuda"}
    parts.stage("unet")
    assert parts.resident() == {"text": "cpu", "unet": "cuda"}
    assert (net, "cpu") in moves and moves[-1] == (net, "cuda")  # built at home with the UNet, then moved with it
    parts.stage("vae")
    assert parts.resident() == {"text": "cpu", "unet": "cpu", "vae": "cuda"}
    assert moves[-3:] == [(made["unet"], "cpu"), (net, "cpu"), (made["vae"], "cuda")]
    assert [e for e in parts.events if e[0] == "release"] == []


def test_offload_is_per_run(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "a fox", "offload": true}\n')
    result = invoker({})("generate", "--prompts-file", "jobs.jsonl", "-m", str(tiny_sd1), *RENDER, expect=3)
    assert "'offload' cannot change per job" in result.stderr
    result = invoker({})("sweep", "a fox", "--x", "offload=true,false", "-m", str(tiny_sd1), "-o", "p.png",
                         expect=2)
    assert "offload: cannot be swept" in result.stderr
