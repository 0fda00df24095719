"""Bad config values fail with one line naming the value and exit code 2, before compiling."""
import pytest

from lmtrain import config as config_lib
from tests.conftest import cli_args, run_module, small_config


def test_tiny_config_is_valid():
  config_lib.validate(small_config())


@pytest.mark.parametrize("overrides, needle", [
    ({"model.num_heads": 3}, "model.num_heads=3"),
    ({"model.attention.kind": "quantum"}, "model.attention.kind='quantum'"),
    ({"model.num_kv_heads": 3, "model.num_heads": 4, "model.d_model": 128}, "num_kv_heads=3"),
    ({"train.steps": 0}, "train.steps=0"),
    ({"train.lr": -1.0}, "train.lr=-1.0"),
    ({"train.grad_accum": 3}, "train.grad_accum=3"),
    ({"model.position": "sinusoid"}, "model.position='sinusoid'"),
    ({"model.dtype": "float8"}, "model.dtype='float8'"),
    ({"data.source": "text"}, "data.path must be set"),
    ({"data.source": "text", "data.path": "/nonexistent/corpus.txt"}, "/nonexistent/corpus.txt"),
    ({"data.path": "/tmp"}, "data.path='/tmp' is not used"),
    ({"mesh.data": 0}, "mesh.data=0"),
    ({"model.attention.window": 64}, "model.attention.window=64"),
])
def test_validate_names_the_bad_value(overrides, needle):
  cfg = small_config(**overrides)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg)
  assert needle in str(e.value)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, needle", [
    ("--config.model.num_heads=3", "model.num_heads=3"),
    ("--config.data.source=text", "data.path must be set"),
    ("--config.model.attention.kind=quantum", "'quantum'"),
])
def test_cli_exits_2_with_one_line(tmp_path, override, needle):
  args = ["--config", "configs/tiny.py", override, "--workdir", str(tmp_path / "w")]
  if "data.source=text" in override:
    args.append("--config.data.path=/nonexistent/file.txt")
    needle = "/nonexistent/file.txt"
  proc = run_module("lmtrain.train", args, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert needle in lines[0]
  assert not (tmp_path / "w").exists(), "nothing may be written for a bad config"


def test_cli_rejects_unknown_field_and_bad_variant(tmp_path):
  for args in (["--config", "configs/tiny.py", "--config.model.no_such_field=1"],
               ["--config", "configs/tiny.py:attention=telepathy"],
               ["--config", "configs/missing.py"]):
    proc = run_module("lmtrain.train", args + ["--workdir", str(tmp_path)], timeout=120)
    assert proc.returncode == 2, (args, proc.stderr)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, (args, proc.stderr)


def test_parse_arg_types_and_errors():
  v = config_lib.parse_arg("attention=moba,steps=7,lr=0.5,flag=true", attention="softmax",
                           steps=1, lr=1.0, flag=False)
  assert (v.attention, v.steps, v.lr, v.flag) == ("moba", 7, 0.5, True)
  with pytest.raises(config_lib.ConfigError, match="'nope'"):
    config_lib.parse_arg("nope=1", attention="softmax")
