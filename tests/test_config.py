"""Bad config values fail with one line naming the value and exit code 2, before compiling."""
import json

import pytest

from lmtrain import config as config_lib
from tests.conftest import REPO, cli_args, run_module, small_config


def test_tiny_config_is_valid():
  cfg = small_config()
  config_lib.validate(cfg)  # raises ConfigError on any bad value
  # resolved: the kind's options sit under model.attention.<kind>, filled from its dataclass
  assert cfg.model.attention.kind == "softmax"
  assert cfg.model.attention.softmax.position == "rope"


@pytest.mark.parametrize("overrides, needle", [
    ({"model.num_heads": 3}, "model.num_heads=3"),
    ({"model.attention.kind": "quantum"}, "model.attention.kind='quantum'"),
    ({"model.num_kv_heads": 3, "model.num_heads": 4, "model.d_model": 128}, "num_kv_heads=3"),
    ({"train.steps": 0}, "train.steps=0"),
    ({"train.lr": -1.0}, "train.lr=-1.0"),
    ({"train.grad_accum": 3}, "train.grad_accum=3"),
    ({"model.attention.softmax.position": "sinusoid"},
     "model.attention.softmax.position='sinusoid'"),
    ({"model.dtype": "float8"}, "model.dtype='float8'"),
    ({"data.source": "text"}, "data.path must be set"),
    ({"data.source": "text", "data.path": "/nonexistent/corpus.txt"}, "/nonexistent/corpus.txt"),
    ({"data.path": "/tmp"}, "data.path='/tmp' is not used"),
    ({"mesh.data": 0}, "mesh.data=0"),
    ({"model.attention.moba.top_k": 4}, "no layer uses attention kind 'moba'"),
])
def test_validate_names_the_bad_value(overrides, needle):
  cfg = small_config(resolve=False, **overrides)
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


@pytest.mark.parametrize("setter, needle", [
    (lambda c: c.train.update(warmup=10), "train.warmup does not exist (did you mean train.warmup_steps?)"),
    (lambda c: c.model.attention.update(windw=3),
     "model.attention.windw does not exist (did you mean model.attention.sliding_window.window?)"),
    (lambda c: c.model.attention.moba.update(topk=3),
     "model.attention.moba.topk does not exist (did you mean model.attention.moba.top_k?)"),
    (lambda c: c.model.update(position="alibi"), "model.position is not a field any more"),
])
def test_unknown_fields_in_a_config_file_name_the_nearest(setter, needle):
  from configs import tiny
  cfg = tiny.get_config()
  setter(cfg)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.finalize(cfg)
  assert needle in str(e.value), str(e.value)


def test_a_misspelled_field_in_a_config_file_exits_2_in_one_line(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text("from configs import tiny\n\n"
                  "def get_config(arg=None):\n"
                  "  c = tiny.get_config('attention=sliding_window')\n"
                  "  c.model.attention.sliding_window.update(windw=3)\n"
                  "  return c\n")
  proc = run_module("lmtrain.train", ["--config", str(path), "--workdir", str(tmp_path / "w")],
                    timeout=120, env={"PYTHONPATH": REPO})
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert "model.attention.sliding_window.windw" in lines[0]
  assert "did you mean model.attention.sliding_window.window?" in lines[0]
  assert not (tmp_path / "w").exists()


def test_sizes_that_derive_from_seq_len_are_resolved_after_overrides():
  from configs import tiny
  cfg = tiny.get_config("attention=sliding_window")
  cfg.data.seq_len = 4096  # what --config.data.seq_len=4096 does, after get_config
  assert config_lib.finalize(cfg).model.attention.sliding_window.window == 1024
  cfg = tiny.get_config("attention=moba")
  cfg.data.seq_len = 4096
  moba = config_lib.finalize(cfg).model.attention.moba
  assert (moba.block_size, moba.top_k) == (512, 3)
  cfg = tiny.get_config("attention=sliding_window")
  cfg.model.attention.sliding_window.window = 100  # an explicit value is kept
  cfg.data.seq_len = 4096
  assert config_lib.finalize(cfg).model.attention.sliding_window.window == 100


def test_the_resolved_config_keeps_only_the_kinds_in_use_with_every_default():
  from configs import tiny
  resolved = config_lib.finalize(tiny.get_config("attention=hybrid"))
  a = resolved.model.attention
  kinds = sorted(k for k in a.keys() if k not in ("kind", "impl", "layer_pattern"))
  assert kinds == ["linear", "softmax"]
  assert a.linear.chunk_size == 64 and a.linear.normalize is True
  assert a.softmax.position == "rope"
  assert "null" not in json.dumps(a.to_dict())
  assert resolved.model.head_dim == 64  # derived sizes are recorded, not null


def test_a_config_saved_before_a_field_existed_loads_with_its_default():
  """evaluate / generate without --config rebuild the checkpoint's config: a field added to
  lmtrain after the run was saved takes its default instead of failing."""
  from lmtrain import config as config_lib
  saved = config_lib.finalize(config_lib.base_config()).to_dict()
  del saved["train"]["remat"]
  saved["train"]["lr"] = 1e-4
  cfg = config_lib.finalize(config_lib.from_saved(saved))
  assert cfg.train.remat == config_lib.base_config().train.remat
  assert cfg.train.lr == 1e-4
