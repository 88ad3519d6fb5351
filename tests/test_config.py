"""Config resolution order, strict YAML, and the shipped presets."""

import subprocess
import sys
from pathlib import Path

import pytest

from sdcli import config
from sdcli.runtime.errors import BadInputError, UsageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_sd15_like():
    from sdcli.families import DEFAULT

    cfg = config.resolve({})
    # cfg None: the model family's default, 7 for SD (FLUX: 1), decided once the model is loaded
    assert (cfg.steps, cfg.cfg, cfg.sampler, cfg.schedule, cfg.seed) == (20, None, "dpm++_2m", "auto", -1)
    assert DEFAULT.default_cfg == 7.0


def test_order_defaults_user_file_flags(tmp_path):
    _write(tmp_path / "xdg" / "sdcli" / "config.yaml", "steps: 11\ncfg: 3\nsampler: euler\n")
    job = _write(tmp_path / "job.yaml", "steps: 22\ncfg: 4.5\n")
    cfg = config.resolve({"steps": 33}, job)
    assert cfg.sampler == "euler"  # from the user config
    assert cfg.cfg == 4.5  # --config beats the user config
    assert cfg.steps == 33  # a flag beats both


def test_flag_not_given_does_not_override(tmp_path):
    job = _write(tmp_path / "job.yaml", "steps: 22\n")
    assert config.resolve({"steps": None}, job).steps == 22


@pytest.mark.parametrize(
    "text, key",
    [
        ("seed: no\n", "seed"),  # YAML 1.1 would make this False
        ("steps: 1:30\n", "steps"),  # YAML 1.1 would make this 90
        ("steps: true\n", "steps"),
        ("cfg: .inf\n", "cfg"),
        ("cfg: fast\n", "cfg"),
        ("stepz: 20\n", "stepz"),
        ("width: 513\n", "width"),
        ("width: -512\n", "width"),
        ("seed: 99999999999999999999\n", "seed"),
        ("dtype: float64\n", "dtype"),
        ("negative: [a, b]\n", "negative"),
        ("steps: 2.5\n", "steps"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, key):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(BadInputError) as e:
        config.resolve({}, path)
    assert str(path) in str(e.value) and f"'{key}'" in str(e.value)


def test_yaml11_words_stay_text_where_text_is_expected(tmp_path):
    path = _write(tmp_path / "ok.yaml", "negative: no\noutput: on\n")
    cfg = config.resolve({}, path)
    assert (cfg.negative, cfg.output) == ("no", "on")


@pytest.mark.parametrize("text", ["[1, 2]\n", "key: [unclosed\n", "\tsteps: 3\n"])
def test_malformed_yaml(tmp_path, text):
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(BadInputError, match="bad.yaml"):
        config.resolve({}, path)


def test_missing_config_file(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        config.resolve({}, tmp_path / "nope.yaml")


def test_flag_range_error_is_usage_error():
    with pytest.raises(UsageError, match="--batch-size"):
        config.resolve({"batch_size": 0})


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_resolve(preset):
    config.resolve({}, preset)


def test_required_presets_exist():
    names = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert {"default", "fast", "quality", "sd21-768-v"} <= names


def test_default_preset_matches_builtin_defaults():
    cfg = config.resolve({}, ROOT / "configs" / "default.yaml")
    assert cfg == config.RunConfig()


def test_config_module_does_not_import_torch():
    code = "import sys, sdcli.config, sdcli.cli; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
