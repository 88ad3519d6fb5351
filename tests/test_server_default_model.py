"""`generate --server URL` / `img2img --server URL` without -m: rendered with the model the server has loaded
(A1111's rule for a request that names no checkpoint), read from its /sdapi/v1/options when the run starts.

Through a real `sdcli serve` on a free loopback port (tests/test_serve.py's Server): the image is the very PNG
file a local run with that model writes (fp32, CPU, one thread on both sides: byte identity), also after the
server was switched to a model in a subfolder of its --models-dir, and --skip-existing recognises it. A server
that answers with no model loaded (a stand-in answering /sdapi/v1/options: a real `sdcli serve` always has one)
is exit 4 with one line.
"""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from typer.testing import CliRunner

from sdcli.cli import app

pytest.importorskip("starlette", reason="the server extra (make install-serve; make test installs it)")
pytest.importorskip("uvicorn", reason="the server extra (make install-serve; make test installs it)")

from test_serve import FAST, Server  # noqa: E402  (after the skips: it needs the server extra too)

runner = CliRunner()


def _run(*args: str, expect: int = 0):
    result = runner.invoke(app, list(args))
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_sd1):  # noqa: F811
    root = tmp_path_factory.mktemp("served")
    (root / "models" / "sub").mkdir(parents=True)
    (root / "models" / "sub" / "other.safetensors").symlink_to(tiny_sd1)  # the same weights, another name
    s = Server(["--model", str(tiny_sd1), "--models-dir", str(root / "models"), "--dtype", "fp32", "--device",
                "cpu"], auth=None)
    s.root = root
    yield s
    assert s.stop() == 0, "".join(s.lines)


def test_without_a_model_the_server_s_loaded_one_renders(served, tiny_sd1, tmp_path):  # noqa: F811
    args = ["a red fox", *FAST, "--seed", "5"]
    _run("generate", *args, "-m", str(tiny_sd1), "-o", str(tmp_path / "local.png"))
    remote = _run("generate", *args, "-o", str(tmp_path / "remote.png"), "--server", served.url)
    assert (tmp_path / "remote.png").read_bytes() == (tmp_path / "local.png").read_bytes()
    assert "the server's model tiny_sd1.safetensors" in remote.stderr
    again = _run("generate", *args, "-o", str(tmp_path / "remote.png"), "--server", served.url, "--skip-existing")
    assert "nothing to render" in again.stderr  # the model it records is the one asked for

    status, _, _ = served.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "sub/other.safetensors"})
    assert status == 200
    try:
        title = served.call("GET", "/sdapi/v1/options")[1]["sd_model_checkpoint"]
        assert title.startswith("sub/other.safetensors [")  # A1111's "name [hash]": the hash is dropped
        _run("generate", *args, "-m", str(served.root / "models" / "sub" / "other.safetensors"), "-o",
             str(tmp_path / "local-other.png"))
        _run("generate", *args, "-o", str(tmp_path / "remote-other.png"), "--server", served.url)
        assert (tmp_path / "remote-other.png").read_bytes() == (tmp_path / "local-other.png").read_bytes()
    finally:
        served.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": tiny_sd1.name})


def test_img2img_without_a_model(served, tiny_sd1, tmp_path):  # noqa: F811
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 40, 90)).save(tmp_path / "in.png")
    args = ["a watercolor", "-i", str(tmp_path / "in.png"), "--dtype", "fp32", "--device", "cpu", "--steps", "3",
            "--seed", "2", "--strength", "0.6"]
    _run("img2img", *args, "-m", str(tiny_sd1), "-o", str(tmp_path / "a.png"))
    _run("img2img", *args, "-o", str(tmp_path / "b.png"), "--server", served.url)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


class _NoModel(http.server.BaseHTTPRequestHandler):
    """A server whose options name no checkpoint (as A1111's before one is loaded)."""

    def do_GET(self):  # noqa: N802
        body = json.dumps({"sd_model_checkpoint": None} if self.path == "/sdapi/v1/options" else {}).encode()
        self.send_response(200 if self.path == "/sdapi/v1/options" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


def test_a_server_without_a_model_is_exit_4(tmp_path):
    stand_in = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoModel)
    threading.Thread(target=stand_in.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{stand_in.server_address[1]}"
        result = _run("generate", "a fox", *FAST, "-o", str(tmp_path / "x.png"), "--server", url, expect=4)
        assert result.stderr.count("\n") == 1 and "the server has no model loaded" in result.stderr
        assert "pass -m NAME" in result.stderr and not (tmp_path / "x.png").exists()
    finally:
        stand_in.shutdown()
        stand_in.server_close()


def test_a_dry_run_does_not_ask_the_server(tmp_path):
    result = _run("generate", "a fox", *FAST, "-o", str(tmp_path / "x.png"), "--server", "http://127.0.0.1:9",
                  "--dry-run")
    assert "no model given" in result.stdout  # planned with SD1's tokenizer, as without --server
