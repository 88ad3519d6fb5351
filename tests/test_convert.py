"""`sdcli convert`: .ckpt -> .safetensors through the restricted loader, refusing what it should."""

import pickle

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sdcli.cli import app

runner = CliRunner()


def test_convert_round_trip_and_no_overwrite(tmp_path):
    state = {"model.diffusion_model.out.2.bias": torch.arange(4.0), "first_stage_model.x": torch.ones(2, 3)}
    src = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, src)
    dst = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["convert", str(src), "-o", str(dst)])
    assert result.exit_code == 0, result.output
    out = load_file(dst)
    assert out.keys() == state.keys() and all(torch.equal(out[k], state[k]) for k in state)
    before = dst.read_bytes()
    result = runner.invoke(app, ["convert", str(src), "-o", str(dst)])
    assert result.exit_code == 7 and dst.read_bytes() == before


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_convert_refuses_code_in_pickle(tmp_path):
    marker = tmp_path / "marker"
    src = tmp_path / "evil.ckpt"
    src.write_bytes(pickle.dumps({"state_dict": {"a": torch.zeros(1)}, "x": _Payload(marker)}))
    dst = tmp_path / "evil.safetensors"
    result = runner.invoke(app, ["convert", str(src), "-o", str(dst)])
    assert result.exit_code == 3 and "evil.ckpt" in result.stderr
    assert not marker.exists() and not dst.exists()
    assert not list(tmp_path.glob("*.partial"))


def test_convert_wants_safetensors_output(tmp_path):
    src = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, src)
    result = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "m.bin")])
    assert result.exit_code == 2
