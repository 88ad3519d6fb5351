"""`sdcli serve` over real HTTP (issue 27): a server subprocess on a free loopback port, driven by plain
http.client, and `generate --server` / `img2img --server` run in this process against it.

What is compared: an image from the server is the very PNG file `sdcli generate` / `sdcli img2img` writes for the
same settings (bytes, so pixels and infotext), fp32 on the CPU with one thread on both sides (README: byte
identity needs the same kernels and thread count). Every route answers in A1111's shape; 8 clients at once get
each its own images, one job at a time; /interrupt and a client that disconnects end a job without stopping the
server; bad requests are 401/404/405/413/422, never a 500.

Network: the server binds 127.0.0.1 only and every request goes there; every loop below is bounded.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from PIL import Image
from typer.testing import CliRunner

from sdcli.cli import app

pytest.importorskip("starlette", reason="the server extra (make install-serve; make test installs it)")
pytest.importorskip("uvicorn", reason="the server extra (make install-serve; make test installs it)")

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "tester", "s3cret:with:colons"
FAST = ["--dtype", "fp32", "--device", "cpu", "-W", "64", "-H", "64", "--steps", "3", "--cfg", "5"]
runner = CliRunner()


# --- the server -----------------------------------------------------------------------------------------------

class Server:
    """`python -m sdcli serve ... --port 0` from the worktree, its port read from its stderr."""

    def __init__(self, args: list[str], auth: tuple[str, str] | None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SDCLI_DEBUG": ""}
        self.proc = subprocess.Popen([sys.executable, "-m", "sdcli", "serve", "--host", "127.0.0.1", "--port", "0",
                                      *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120) or self.port is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        self.auth = auth

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if "listening on http://127.0.0.1:" in line:
                self.port = int(line.split("127.0.0.1:")[1].split()[0])
                self.ready.set()
        self.ready.set()

    @property
    def url(self) -> str:
        who = f"{USER}:{PASSWORD.replace(':', '%3A')}@" if self.auth else ""
        return f"http://{who}127.0.0.1:{self.port}"

    def call(self, method: str, path: str, body=None, auth=True, raw: bytes | None = None, timeout=120):
        """(status, parsed JSON or None, headers)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Content-Type": "application/json"}
        if auth and self.auth:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        try:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError("the server exited:\n" + "".join(self.lines))
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            text = response.read()
            try:
                value = json.loads(text) if text else None
            except ValueError:
                value = text
            return response.status, value, dict(response.getheaders())
        finally:
            conn.close()

    def stop(self) -> int:
        """SIGTERM: the server ends cleanly (exit 0); its exit status."""
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_models_dir) -> dict:  # noqa: F811
    """Models folder (an inpainting model), LoRA and embeddings folders, an init image and a mask."""
    import torch
    from make_checkpoint import make_checkpoint
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("serve")
    inpaint = tiny_models_dir / "tiny_sd1_inpaint.safetensors"
    if not inpaint.exists():
        make_checkpoint(inpaint, "sd1", "tiny", seed=0, layout="single", inpaint=True)
    (root / "models").mkdir()
    (root / "models" / "inpaint.safetensors").symlink_to(inpaint)
    (root / "loras").mkdir()
    g = torch.Generator().manual_seed(3)
    key = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    save_file({f"{key}.lora_down.weight": torch.randn(2, 64, generator=g),
               f"{key}.lora_up.weight": torch.randn(64, 2, generator=g)}, str(root / "loras" / "tweak.safetensors"))
    (root / "emb").mkdir()
    save_file({"emb_params": torch.randn(2, 64, generator=g)}, str(root / "emb" / "myemb.safetensors"))
    rng = torch.Generator().manual_seed(1)
    pixels = (torch.rand(64, 64, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(root / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(root / "mask.png")
    return {"root": root, "models": root / "models", "loras": root / "loras", "emb": root / "emb",
            "init": root / "init.png", "mask": root / "mask.png", "inpaint": inpaint}


@pytest.fixture(scope="module")
def server(files, tiny_sd1):  # noqa: F811
    s = Server(["--model", str(tiny_sd1), "--models-dir", str(files["models"]), "--lora-dir", str(files["loras"]),
                "--embeddings-dir", str(files["emb"]), "--dtype", "fp32", "--device", "cpu",
                "--api-auth", f"{USER}:{PASSWORD}", "--max-request-mb", "1"], auth=(USER, PASSWORD))
    s.files = files
    yield s
    assert s.stop() == 0, "".join(s.lines)
    assert "serve: stopped" in "".join(s.lines)


def _local(command: str, *args: str, expect: int = 0):
    result = runner.invoke(app, [command, *args])
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    return result


def _png(b64: str) -> bytes:
    return base64.b64decode(b64)


def _txt2img(server, expect=200, **fields):
    body = {"prompt": "a red fox", "seed": 11, "steps": 3, "cfg_scale": 5, "width": 64, "height": 64,
            "sampler_name": "Euler a", **fields}
    status, value, _ = server.call("POST", "/sdapi/v1/txt2img", body)
    assert status == expect, value
    return value


# --- images equal a local run ---------------------------------------------------------------------------------

def test_txt2img_is_the_png_generate_writes(server, tiny_sd1, tmp_path):  # noqa: F811
    result = _txt2img(server, negative_prompt="blurry", batch_size=2, n_iter=2, scheduler="Karras")
    info = json.loads(result["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and len(result["images"]) == 4
    assert result["parameters"]["prompt"] == "a red fox" and result["parameters"]["seed"] == 11
    _local("generate", "a red fox", "-m", str(tiny_sd1), *FAST, "--sampler", "euler_a", "--schedule", "karras",
           "--negative", "blurry", "--seed", "11", "-n", "4", "--batch-size", "2", "-o", f"{tmp_path}/{{index}}.png",
           "--embeddings-dir", str(server.files["emb"]))
    for k, b64 in enumerate(result["images"]):
        local = (tmp_path / f"{k}.png").read_bytes()
        assert _png(b64) == local  # pixels, infotext and sdcli's record, byte for byte
        assert Image.open(io.BytesIO(local)).text["parameters"] == info["infotexts"][k]


def test_variation_seeds_and_noise_options_are_generate_s(server, tiny_sd1, tmp_path):  # noqa: F811
    result = _txt2img(server, subseed=5, subseed_strength=0.3, seed_resize_from_w=48, seed_resize_from_h=64,
                      batch_size=2, eta=0.5, override_settings={"randn_source": "NV", "eta_noise_seed_delta": 31337})
    info = json.loads(result["info"])
    assert info["all_seeds"] == [11, 11] and info["all_subseeds"] == [5, 6] and info["subseed_strength"] == 0.3
    _local("generate", "a red fox", "-m", str(tiny_sd1), *FAST, "--sampler", "euler_a", "--seed", "11", "-n", "2",
           "--batch-size", "2", "--subseed", "5", "--subseed-strength", "0.3", "--seed-resize-from", "48x64",
           "--eta", "0.5", "--rng", "nv", "--ensd", "31337", "-o", f"{tmp_path}/{{index}}.png",
           "--embeddings-dir", str(server.files["emb"]))
    assert [_png(b) for b in result["images"]] == [(tmp_path / f"{k}.png").read_bytes() for k in (0, 1)]


def test_hires_fix_is_the_png_generate_writes(server, tiny_sd1, tmp_path):  # noqa: F811
    result = _txt2img(server, enable_hr=True, hr_scale=2, hr_second_pass_steps=2, denoising_strength=0.5,
                      hr_upscaler="Latent")
    info = json.loads(result["info"])
    assert info["width"] == 64 and info["denoising_strength"] == 0.5  # A1111's: the first pass's size
    assert Image.open(io.BytesIO(_png(result["images"][0]))).size == (128, 128)
    _local("generate", "a red fox", "-m", str(tiny_sd1), *FAST, "--sampler", "euler_a", "--seed", "11",
           "--hires-scale", "2", "--hires-strength", "0.5", "--hires-steps", "2", "-o", str(tmp_path / "h.png"),
           "--embeddings-dir", str(server.files["emb"]))
    assert _png(result["images"][0]) == (tmp_path / "h.png").read_bytes()


def test_img2img_and_inpainting_are_the_pngs_img2img_writes(server, files, tiny_sd1, tmp_path):  # noqa: F811
    init = base64.b64encode(files["init"].read_bytes()).decode()
    result = _post_img2img(server, init_images=[init], denoising_strength=0.6)
    same = ["--dtype", "fp32", "--device", "cpu", "--steps", "3", "--cfg", "5", "--sampler", "euler_a", "--seed", "11",
            "--embeddings-dir", str(files["emb"])]
    _local("img2img", "a red fox", "-i", str(files["init"]), "-m", str(tiny_sd1), *same, "--strength", "0.6",
           "-o", str(tmp_path / "i.png"))
    assert _png(result["images"][0]) == (tmp_path / "i.png").read_bytes()
    mask = base64.b64encode(files["mask"].read_bytes()).decode()
    result = _post_img2img(server, init_images=[init], mask=mask, denoising_strength=0.9,
                           override_settings={"sd_model_checkpoint": "inpaint"})
    assert json.loads(result["info"])["is_using_inpainting_conditioning"] is True
    _local("img2img", "a red fox", "-i", str(files["init"]), "--mask", str(files["mask"]), "-m",
           str(files["models"] / "inpaint.safetensors"), *same, "--strength", "0.9", "-o", str(tmp_path / "p.png"))
    assert _png(result["images"][0]) == (tmp_path / "p.png").read_bytes()
    # any model inpaints, A1111's inpaint fields mapped onto img2img's flags
    result = _post_img2img(server, init_images=[init], mask=mask, denoising_strength=0.75, mask_blur=4,
                           inpainting_fill=0, inpaint_full_res=True, inpaint_full_res_padding=8, inpainting_mask_invert=1)
    _local("img2img", "a red fox", "-i", str(files["init"]), "--mask", str(files["mask"]), "-m", str(tiny_sd1), *same,
           "--strength", "0.75", "--mask-blur", "4", "--inpaint-fill", "fill", "--inpaint-area", "masked",
           "--inpaint-padding", "8", "--mask-invert", "-o", str(tmp_path / "q.png"))
    assert _png(result["images"][0]) == (tmp_path / "q.png").read_bytes()


def _post_img2img(server, expect=200, **fields):
    body = {"prompt": "a red fox", "seed": 11, "steps": 3, "cfg_scale": 5, "sampler_name": "Euler a", **fields}
    status, value, _ = server.call("POST", "/sdapi/v1/img2img", body)
    assert status == expect, value
    return value


def test_openai_images_generations(server, tiny_sd1, tmp_path):  # noqa: F811
    status, value, _ = server.call("POST", "/v1/images/generations",
                                   {"prompt": "a red fox", "n": 2, "size": "64x64", "seed": 11, "steps": 3,
                                    "cfg_scale": 5, "sampler_name": "Euler a", "model": "dall-e-3"})
    assert status == 200 and len(value["data"]) == 2, value
    _local("generate", "a red fox", "-m", str(tiny_sd1), *FAST, "--sampler", "euler_a", "--seed", "11", "-n", "2",
           "-o", f"{tmp_path}/{{index}}.png", "--embeddings-dir", str(server.files["emb"]))
    assert [_png(d["b64_json"]) for d in value["data"]] == [(tmp_path / f"{k}.png").read_bytes() for k in (0, 1)]
    status, value, _ = server.call("POST", "/v1/images/generations", {"prompt": "x", "response_format": "url"})
    assert status == 422 and value["error"]["param"] == "response_format"


def test_png_info_reads_back_the_infotext(server):
    result = _txt2img(server, seed=5)
    status, value, _ = server.call("POST", "/sdapi/v1/png-info", {"image": result["images"][0]})
    assert status == 200
    assert value["info"] == json.loads(result["info"])["infotexts"][0]
    assert value["parameters"]["Prompt"] == "a red fox" and value["parameters"]["Seed"] == 5
    assert value["parameters"]["Sampler"] == "Euler a" and value["parameters"]["Size-1"] == 64
    assert json.loads(value["items"]["sdcli"])["seed"] == 5


# --- listings and options -------------------------------------------------------------------------------------

def test_listings(server, tiny_sd1):  # noqa: F811
    status, models, _ = server.call("GET", "/sdapi/v1/sd-models")
    assert status == 200 and {m["model_name"] for m in models} == {tiny_sd1.stem, "inpaint"}
    loaded = next(m for m in models if m["model_name"] == tiny_sd1.stem)
    assert loaded["title"] == f"{tiny_sd1.name} [{loaded['sha256'][:10]}]"
    samplers = server.call("GET", "/sdapi/v1/samplers")[1]
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    schedulers = server.call("GET", "/sdapi/v1/schedulers")[1]
    assert schedulers[0]["name"] == "automatic" and "karras" in {s["name"] for s in schedulers}
    assert server.call("GET", "/sdapi/v1/loras")[1][0]["name"] == "tweak"
    embeddings = server.call("GET", "/sdapi/v1/embeddings")[1]
    assert embeddings["loaded"]["myemb"]["vectors"] == 2 and embeddings["loaded"]["myemb"]["shape"] == 64
    memory = server.call("GET", "/sdapi/v1/memory")[1]
    assert memory["ram"]["total"] > memory["ram"]["used"] > 0 and "cuda" in memory
    assert server.call("GET", "/sdapi/v1/upscalers")[1][1]["name"] == "Latent"


def test_options_switch_model_and_clip_skip(server, tiny_sd1):  # noqa: F811
    before = server.call("GET", "/sdapi/v1/options")[1]
    assert before["sd_model_checkpoint"].startswith(tiny_sd1.name)
    status, value, _ = server.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "inpaint.safetensors",
                                                                 "CLIP_stop_at_last_layers": 2})
    assert status == 200 and value is None
    now = server.call("GET", "/sdapi/v1/options")[1]
    assert now["sd_model_checkpoint"].startswith("inpaint.safetensors") and now["CLIP_stop_at_last_layers"] == 2
    status, value, _ = server.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": before["sd_model_checkpoint"],
                                                                 "CLIP_stop_at_last_layers": 1})
    assert status == 200 and server.call("GET", "/sdapi/v1/options")[1] == before


# --- one job at a time ----------------------------------------------------------------------------------------

def test_eight_clients_at_once_each_get_their_own_images(server):
    seeds = list(range(100, 108))
    alone = {s: _txt2img(server, seed=s, prompt=f"fox {s}", steps=2)["images"][0] for s in seeds[:2]}
    results: dict = {}

    def client(seed):
        results[seed] = _txt2img(server, seed=seed, prompt=f"fox {seed}", steps=2)

    threads = [threading.Thread(target=client, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == seeds
    for seed in seeds:
        info = json.loads(results[seed]["info"])
        assert info["all_seeds"] == [seed] and info["prompt"] == f"fox {seed}"
    assert {s: results[s]["images"][0] for s in seeds[:2]} == alone  # nothing mixed: the same bytes as alone
    spans = sorted((json.loads(r["info"])["job_started"], json.loads(r["info"])["job_finished"])
                   for r in results.values())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # never two on the device


def _running(server, deadline_s=60) -> dict:
    """Poll /progress until a job samples (bounded)."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        progress = server.call("GET", "/sdapi/v1/progress")[1]
        if progress["state"]["sampling_step"] >= 2:
            return progress
        time.sleep(0.05)
    raise AssertionError("no job started sampling")


def test_progress_preview_and_interrupt(server):
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("long", _txt2img(server, steps=1000)))
    worker.start()
    progress = _running(server)
    assert progress["state"]["job"] == "txt2img" and progress["state"]["sampling_steps"] == 1000
    assert 0 < progress["progress"] < 1
    image = None
    for _ in range(100):  # the estimate is kept once someone polls for it: the next step has it
        image = server.call("GET", "/sdapi/v1/progress")[1]["current_image"]
        if image:
            break
        time.sleep(0.05)
    assert Image.open(io.BytesIO(_png(image))).size == (64, 64)
    assert server.call("GET", "/sdapi/v1/progress?skip_current_image=true")[1]["current_image"] is None
    assert server.call("POST", "/sdapi/v1/interrupt")[0] == 200
    worker.join(60)
    assert not worker.is_alive()
    info = json.loads(results["long"]["info"])
    assert info["interrupted"] is True and results["long"]["images"] == []
    assert len(_txt2img(server)["images"]) == 1  # and the server goes on


def test_skip_drops_the_current_batch_only(server):
    results = {}
    worker = threading.Thread(target=lambda: results.setdefault("r", _txt2img(server, steps=60, n_iter=2, seed=40)))
    worker.start()
    _running(server)
    assert server.call("POST", "/sdapi/v1/skip")[0] == 200
    worker.join(120)
    info = json.loads(results["r"]["info"])
    assert info["all_seeds"] == [41] and len(results["r"]["images"]) == 1


def test_a_client_that_disconnects_does_not_hold_the_server(server):
    body = json.dumps({"prompt": "a fox", "steps": 1000, "width": 64, "height": 64}).encode()
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Basic {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    _running(server)
    sock.close()
    deadline = time.time() + 30
    while time.time() < deadline and server.call("GET", "/sdapi/v1/progress")[1]["state"]["job_count"]:
        time.sleep(0.1)
    assert server.call("GET", "/sdapi/v1/progress")[1]["state"]["job_count"] == 0
    started = time.time()
    assert len(_txt2img(server)["images"]) == 1
    assert time.time() - started < 30


# --- safety ----------------------------------------------------------------------------------------------------

BAD = [
    ("/sdapi/v1/txt2img", b"{bad json", "json_invalid"),
    ("/sdapi/v1/txt2img", b"[1, 2]", "model_attributes_type"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1e400}, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 65}, "width"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": "high"}, "cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "help"}, "sampler_name"),
    ("/sdapi/v1/txt2img", {"prompt": ["x"]}, "prompt"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "seed": 2**40}, "seed"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "n_iter": 10**6}, "n_iter"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "alwayson_scripts": {"controlnet": {"args": []}}}, "alwayson_scripts"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "script_name": "x/y/z plot"}, "script_name"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "subseed_strength": 2}, "subseed_strength"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "s_min_uncond": 0.5}, "s_min_uncond"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "seed_resize_from_w": 64}, "seed_resize_from_w"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
    ("/sdapi/v1/txt2img", {"prompt": "x (a:1000) y"}, None),
    ("/sdapi/v1/img2img", {"prompt": "x"}, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["%%%not base64"]}, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(b"GIF89a junk").decode()]}, None),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["http://127.0.0.1:1/x.png"]}, "init_images"),
    ("/sdapi/v1/png-info", {"image": base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()}, None),
    ("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 99}, "options"),
    ("/v1/images/generations", {"n": 2}, "prompt"),
    # the endpoint of --server: as untrusted as any other
    ("/sdcli/v1/render", {"protocol": 99, "prompt": "x", "config": {}, "targets": [{"index": 0, "seed": 1}]},
     "protocol"),
    ("/sdcli/v1/render", {"protocol": 1, "prompt": "x", "config": {"steps": 0}, "targets": [{"index": 0, "seed": 1}]},
     "steps"),
    ("/sdcli/v1/render", {"protocol": 1, "prompt": "x", "config": {"nonsense": 1},
                          "targets": [{"index": 0, "seed": 1}]}, "nonsense"),
    ("/sdcli/v1/render", {"protocol": 1, "prompt": "x", "config": {}, "targets": "all"}, "targets"),
    ("/sdcli/v1/render", {"protocol": 1, "prompt": "x", "config": {}, "targets": [{"index": 0, "seed": 1}],
                          "loras": [["../../etc/passwd", 1]]}, "without a folder"),
    ("/sdcli/v1/render", {"protocol": 1, "prompt": "x", "config": {"sampler": "help"},
                          "targets": [{"index": 0, "seed": 1}]}, "sampler"),
]


@pytest.mark.parametrize("path, body, field", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_are_422(server, path, body, field):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, value, _ = server.call("POST", path, raw=raw)
    assert status == 422, value
    if field is not None:
        text = json.dumps(value)
        assert field in text


@pytest.mark.parametrize("prompt, options, status", [
    ("<lora:../../etc/passwd:1> x", {}, 422), ("<lora:/etc/passwd:1> x", {}, 422), ("<lora:nope:1> x", {}, 404),
    ("x", {"sd_model_checkpoint": "/etc/passwd"}, 404), ("x", {"sd_model_checkpoint": "../serve0/x"}, 404),
    ("x", {"sd_vae": "../../etc/passwd"}, 404),
])
def test_no_file_outside_the_configured_folders(server, prompt, options, status):
    code, value, _ = server.call("POST", "/sdapi/v1/txt2img", {"prompt": prompt, "override_settings": options,
                                                               "steps": 2, "width": 64, "height": 64})
    assert code == status, value
    assert "passwd" not in json.dumps(value.get("detail", "")) or code in (404, 422)


def test_limits_auth_and_http_errors(server):
    big = json.dumps({"prompt": "x" * (1 << 20 + 1)}).encode()
    assert server.call("POST", "/sdapi/v1/txt2img", raw=big)[0] == 413
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # no length: counted as it comes
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                     + f"Authorization: Basic {token}\r\n\r\n".encode())
        chunk = b"x" * (256 << 10)
        for _ in range(5):
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 413")
    status, value, headers = server.call("GET", "/sdapi/v1/options", auth=False)
    assert status == 401 and headers.get("www-authenticate") == "Basic"
    wrong = Server.__new__(Server)
    wrong.port, wrong.auth, wrong.proc = server.port, (USER, "wrong"), None
    assert wrong.call("GET", "/sdapi/v1/options")[0] == 401
    assert server.call("GET", "/sdapi/v1/nope")[:2] == (404, {"detail": "Not Found"})
    assert server.call("GET", "/sdapi/v1/txt2img")[0] == 405
    assert len(_txt2img(server)["images"]) == 1  # still serving after all of it
    assert not any("Traceback" in line for line in server.lines)


def test_exposure_rules():
    from sdcli.app.serve import check_exposure, parse_auth
    from sdcli.runtime.errors import UsageError

    for host in ("127.0.0.1", "localhost", "::1", "127.8.9.1"):
        check_exposure(host, None, False)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(UsageError, match="--api-auth"):
            check_exposure(host, None, False)
        check_exposure(host, "a:b", False)
        check_exposure(host, None, True)
    assert parse_auth("a:b,c:d:e") == {"a": "b", "c": "d:e"}
    with pytest.raises(UsageError):
        parse_auth("nopassword")


def test_serve_refuses_an_open_host_before_binding(monkeypatch, tiny_sd1):  # noqa: F811
    import sdcli.app.serve as serve

    monkeypatch.setattr(serve, "_bind", lambda *a: pytest.fail("bound a socket"))
    monkeypatch.setattr(serve, "_start", lambda *a: pytest.fail("loaded the model"))
    result = runner.invoke(app, ["serve", "-m", str(tiny_sd1), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--api-auth" in result.stderr


# --- generate --server / img2img --server -----------------------------------------------------------------------

def test_generate_with_server_writes_the_bytes_of_a_local_run(server, tiny_sd1, tmp_path):  # noqa: F811
    jobs = tmp_path / "jobs.txt"
    jobs.write_text('a cat\n{"prompt": "a dog <lora:tweak:0.7>", "seed": 7}\n'
                    '{"prompt": "a boat", "steps": 2, "subseed": 3, "subseed_strength": 0.5, "n": 2}\n')
    common = ["--prompts-file", str(jobs), "-m", str(tiny_sd1), *FAST, "--seed", "1", "--lora-dir",
              str(server.files["loras"]), "--embeddings-dir", str(server.files["emb"]), "--json"]
    local = _local("generate", *common, "-o", f"{tmp_path}/local/{{index}}-{{seed}}.png")
    remote = _local("generate", *common, "-o", f"{tmp_path}/remote/{{index}}-{{seed}}.png", "--server", server.url)
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "remote").iterdir()) and len(names) == 4
    for name in names:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "remote" / name).read_bytes()

    def lines(result):
        return [{k: v for k, v in json.loads(x).items() if k not in ("timings", "path")}
                for x in result.stdout.splitlines()]

    assert lines(local) == lines(remote)
    grid = ["a cat", "-m", str(tiny_sd1), *FAST, "--seed", "3", "-n", "2", "--grid"]
    _local("generate", *grid, str(tmp_path / "g1.png"), "--grid-only", "-o", f"{tmp_path}/g/{{index}}.png",
           "--embeddings-dir", str(server.files["emb"]))
    result = runner.invoke(app, ["generate", *grid, str(tmp_path / "g2.png"), "--grid-only", "-o",
                                 f"{tmp_path}/g/{{index}}.png"], env={"SDCLI_SERVER": server.url})
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "g1.png").read_bytes() == (tmp_path / "g2.png").read_bytes()


def test_img2img_with_server_and_a_mask(server, files, tmp_path):
    common = ["a red fox", "-i", str(files["init"]), "--mask", str(files["mask"]), "-m",
              str(files["models"] / "inpaint.safetensors"),
              "--dtype", "fp32", "--device", "cpu", "--steps", "3", "--seed", "4", "--strength", "0.9"]
    _local("img2img", *common, "-o", str(tmp_path / "a.png"), "--embeddings-dir", str(files["emb"]))
    _local("img2img", *common, "-o", str(tmp_path / "b.png"), "--server", server.url)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_server_errors_keep_the_local_exit_codes(server, tiny_sd1, tmp_path):  # noqa: F811
    args = ["-m", str(tiny_sd1), *FAST, "-o", str(tmp_path / "x.png"), "--server", server.url]
    missing = _local("generate", "a <lora:missing:1> fox", *args, expect=4)
    assert "missing" in missing.stderr
    assert "the server runs fp32" in _local("generate", "a fox", *args[:-4], "--dtype", "bf16", "-o",
                                            str(tmp_path / "y.png"), "--server", server.url, expect=2).stderr
    (tmp_path / "x.png").write_bytes(b"taken")
    _local("generate", "a fox", *args, expect=7)  # planned here, before the server is asked
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    result = _local("generate", "a fox", *args[:-1], f"http://127.0.0.1:{port}", "--overwrite", expect=2)
    assert "cannot connect" in result.stderr
    assert "--latent-out cannot be used with --server" in _local(
        "generate", "a fox", *args, "--latent-out", str(tmp_path / "l.safetensors"), "--overwrite", expect=2).stderr
