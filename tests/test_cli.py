"""The command line: --help, one-line user errors, tuple overrides, exit codes, resume messages, metric names."""

import json
import os
import signal
import textwrap

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import run
from rlhf_jax.train import loop, writers

EXPERIMENT = '''
"""A tiny experiment for the CLI tests.

This second paragraph is not part of --help.
"""

import json
import os
import signal
import types

import ml_collections

from rlhf_jax.errors import ConfigError

CONFIG_HELP = {
    "mode": "what main() does: write, config_error, runtime_error, sigint, sigterm or interrupt",
    "data.train_files": "JSONL files to train on",
    "lora.targets": "which projections get adapters",
}


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.mode = "write"
  c.num_steps = 10
  c.learning_rate = 1e-3
  c.data = ml_collections.ConfigDict(dict(train_files=("a.jsonl",)))
  c.lora = ml_collections.ConfigDict(dict(targets=("wq", "wk", "wv"), rank=4))
  return c


def main(config, workdir):
  mode = config.mode
  if mode == "config_error":
    raise ConfigError("config.data.train_files=('missing.jsonl',): no such file")
  if mode == "runtime_error":
    raise RuntimeError("a bug")
  if mode == "interrupt":
    raise KeyboardInterrupt
  if mode in ("sigint", "sigterm"):
    return types.SimpleNamespace(preempted=True, signum=signal.SIGINT if mode == "sigint" else signal.SIGTERM)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f)
  return types.SimpleNamespace(preempted=False, signum=None)
'''


@pytest.fixture
def experiment(tmp_path):
  path = tmp_path / "tiny_cli.py"
  path.write_text(EXPERIMENT)
  return str(path)


def _run(experiment, tmp_path, *args):
  return run.main([experiment, "--workdir", str(tmp_path / "w"), *args])


def test_help_lists_keys_defaults_and_meanings(experiment, tmp_path, capsys):
  for flag in ("--help", "-h"):
    assert run.main([experiment, flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("A tiny experiment for the CLI tests.") and "second paragraph" not in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "('a.jsonl',)" in lines["data.train_files"] and "JSONL files to train on" in lines["data.train_files"]
    assert "0.001" in lines["learning_rate"] and lines["lora.rank"].split() == ["lora.rank", "4"]
    assert not (tmp_path / "w").exists()
  assert run.main(["--help"]) == 0
  assert capsys.readouterr().out.startswith(run.USAGE)


def test_config_help_helpers():
  mod, _ = run.load_experiment(os.path.join(os.path.dirname(__file__), "..", "experiments", "sft_tiny.py"))
  config = mod.get_config()
  lines = run.config_help_lines(config, {"optimizer.learning_rate": "peak learning rate"})
  assert any(line.split()[:2] == ["optimizer.learning_rate", "0.003"] and line.endswith("peak learning rate")
             for line in lines)
  assert len(lines) == len(run.undocumented_keys(config, {})) == len(loop.flatten_config(config))
  assert "optimizer.learning_rate" not in run.undocumented_keys(config, {"optimizer.learning_rate": "x"})
  assert "data.task" in run.undocumented_keys(config, {"optimizer.learning_rate": "x"})


def test_user_error_in_main_is_one_line_exit_2(experiment, tmp_path, capsys):
  assert _run(experiment, tmp_path, "--config.mode=config_error") == 2
  err = capsys.readouterr().err
  assert err == "error: config.data.train_files=('missing.jsonl',): no such file\n"
  assert "Traceback" not in err
  with pytest.raises(RuntimeError, match="a bug"):  # not a user error: a traceback
    _run(experiment, tmp_path, "--config.mode=runtime_error")


def test_bad_override_is_exit_2_naming_the_key(experiment, tmp_path, capsys):
  assert _run(experiment, tmp_path, "--config.data.train_files=7") == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --config.data.train_files='7': expected a tuple or list of str") and err.count("\n") == 1


def test_tuple_overrides_bare_comma_and_literal(experiment, tmp_path):
  def config_after(*args):
    assert _run(experiment, tmp_path, *args) == 0
    with open(tmp_path / "w" / "config.json") as f:
      return json.load(f)

  c = config_after("--config.data.train_files=my.jsonl", "--config.lora.targets=wq,wv")
  assert c["data"]["train_files"] == ["my.jsonl"] and c["lora"]["targets"] == ["wq", "wv"]
  c = config_after("--config.data.train_files=('a.jsonl', 'b.jsonl')", "--config.lora.targets=wq, wo",
                   "--config.learning_rate=1", "--config.mode=write")
  assert c["data"]["train_files"] == ["a.jsonl", "b.jsonl"] and c["lora"]["targets"] == ["wq", "wo"]
  assert c["learning_rate"] == 1.0


def test_tuple_override_types():
  import ml_collections

  c = ml_collections.ConfigDict(dict(files=("a",), shape=(1, 2), scales=(0.5, 1.0), steps=3, name="x"))
  run.apply_overrides(c, [("files", "/data/x.jsonl"), ("shape", "3,4"), ("scales", "(1, 2)"), ("name", "1e-3")])
  assert c.files == ("/data/x.jsonl",) and c.shape == (3, 4) and c.scales == (1.0, 2.0) and c.name == "1e-3"
  assert isinstance(c.scales[0], float)
  for key, raw in (("files", "(1, 2)"), ("shape", "a,b"), ("shape", "7"), ("steps", "1e-3")):
    with pytest.raises(run.ConfigError, match=rf"--config.{key}="):
      run.apply_overrides(c, [(key, raw)])


@pytest.mark.parametrize("mode,code", [("sigint", 130), ("sigterm", 143), ("interrupt", 130), ("write", 0)])
def test_exit_codes(experiment, tmp_path, capsys, mode, code):
  assert _run(experiment, tmp_path, f"--config.mode={mode}") == code
  if mode == "interrupt":
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


def test_metric_names_are_valid_tensorboard_tags(tmp_path):
  w = writers.MetricWriter(str(tmp_path), tensorboard=True)
  out = w.write(1, {"data/skipped_by_reason/empty completion": 2.0, "loss": 1.0, "a (b)": 3.0}, prefix="x/")
  w.write_text(1, "samples/step 1", "prompt -> completion")
  w.close()
  assert set(out) == {"x/data/skipped_by_reason/empty_completion", "x/loss", "x/a_b_"}
  rows = writers.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert set(rows[0]) == {"step"} | set(out)
  assert os.listdir(tmp_path / "tensorboard")


# A real train_loop on a 3-parameter quadratic, with real checkpoints.


def _quadratic():
  from rlhf_jax.train import state as state_lib, step as step_lib

  class Lin(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((3,)), axes=("embed",))

  tx = optax.sgd(0.1)
  graphdef, state, _ = state_lib.create_train_state(Lin(), tx)

  def loss_fn(m, batch, rng):
    return jnp.sum((m.w.get_value() - batch["x"]) ** 2), {}

  return state, step_lib.make_train_step(loss_fn, tx, graphdef, donate=False)


def _batches(interrupt_at=None):
  i = 0
  while True:
    if i == interrupt_at:
      os.kill(os.getpid(), signal.SIGINT)  # the loop's handler turns it into a stop flag
    i += 1
    yield {"x": jnp.zeros((3,))}


def _train(tmp_path, num_steps, run_config, **kw):
  from rlhf_jax.checkpoint import Checkpointer

  state, step = _quadratic()
  ck = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  try:
    return loop.train_loop(step_fn=step, state=state, batches=kw.pop("batches", _batches()), num_steps=num_steps,
                           workdir=str(tmp_path), checkpointer=ck, progress=False, count_tokens=lambda b: 0,
                           plot_keys=(), run_config=run_config, **kw), ck.directory
  finally:
    ck.close()


def test_train_loop_resume_messages_and_config_drift(tmp_path, capsys):
  cfg = {"num_steps": 3, "seed": 0, "optimizer": {"learning_rate": 0.001, "schedule": "cosine"}, "files": ("a",)}
  res, ckdir = _train(tmp_path, 3, cfg)
  out = capsys.readouterr().out
  assert res.end_step == 3 and res.signum is None and "resumed" not in out
  with open(tmp_path / "run_config.json") as f:
    assert json.load(f)["optimizer"]["learning_rate"] == 0.001

  cfg2 = {"num_steps": 5, "seed": 1, "optimizer": {"learning_rate": 0.002, "schedule": "cosine"}, "files": ("a",)}
  res, _ = _train(tmp_path, 5, cfg2)
  out = capsys.readouterr().out
  assert res.start_step == 3 and res.end_step == 5
  assert f"resumed from step 3 of 5 ({ckdir})" in out
  drift = [line for line in out.splitlines() if line.startswith("config changed since the checkpoint")]
  assert drift == [
      "config changed since the checkpoint: num_steps 3 -> 5 (the run resumes with the new value)",
      "config changed since the checkpoint: optimizer.learning_rate 0.001 -> 0.002 (the run resumes with the new value)",
  ]  # seed is not watched; the tuple read back as a list is no change
  with open(tmp_path / "run_config.json") as f:
    assert json.load(f)["optimizer"]["learning_rate"] == 0.002

  res, _ = _train(tmp_path, 5, cfg2)
  out = capsys.readouterr().out
  assert f"already complete at step 5 ({ckdir}): nothing to train" in out
  assert "config changed" not in out and res.start_step == res.end_step == 5


def test_train_loop_records_sigint(tmp_path):
  res, _ = _train(tmp_path, 50, None, batches=_batches(interrupt_at=2))
  assert res.preempted and res.signum == signal.SIGINT and res.end_step < 50
  assert run.exit_status(res) == 130
  assert not (tmp_path / "run_config.json").exists()


def test_run_online_resume_messages(tmp_path, capsys):
  from rlhf_jax.checkpoint import Checkpointer
  from rlhf_jax.train import online

  def rollout_fn(params, ids, mask, rng, group_ids):
    b = len(group_ids)
    return online.Rollout(
        input_ids_BxT=np.ones((b, 3), np.int32), attention_mask_BxT=np.ones((b, 3), np.int32),
        targets_BxT=np.ones((b, 3), np.int32), response_mask_BxN=np.ones((b, 2), np.float32),
        tokens_BxN=np.ones((b, 2), np.int32), sampler_logps_BxN=np.zeros((b, 2), np.float32),
        group_ids_B=np.asarray(group_ids, np.int32))

  def go(num_iterations, run_config):
    state, _ = _quadratic()
    ck = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    try:
      online.run_online(
          state=state, state_shardings=None, graphdef=None,
          step_fn=lambda s, b: (s, {"loss": 0.0, "nonfinite_streak": 0}), rollout_fn=rollout_fn,
          prompt_fn=lambda i: ([[1, 2], [1, 2]], np.array([0, 0])),
          reward_fn=lambda p, t, n: np.array([0.0, 1.0]), advantage_fn=lambda r, m, g: np.zeros_like(m),
          num_iterations=num_iterations, workdir=str(tmp_path), put_batch=lambda b: b, checkpointer=ck,
          progress=False, run_config=run_config)
    finally:
      ck.close()
    return ck.directory

  go(2, {"num_iterations": 2})
  assert "resumed" not in capsys.readouterr().out
  ckdir = go(3, {"num_iterations": 3})
  out = capsys.readouterr().out
  assert f"resumed from iteration 2 of 3 ({ckdir})" in out
  assert "config changed since the checkpoint: num_iterations 2 -> 3" in out
  go(3, {"num_iterations": 3})
  assert f"already complete at iteration 3 ({ckdir}): nothing to train" in capsys.readouterr().out


def test_user_error_while_loading_is_exit_2(tmp_path, capsys):
  bad = tmp_path / "bad.py"
  bad.write_text(textwrap.dedent('''
      from rlhf_jax.errors import ConfigError

      def get_config(arg=None):
        raise ConfigError(f"unknown experiment argument {arg!r}")

      def main(config, workdir):
        pass
  '''))
  assert run.main([f"{bad}:fast"]) == 2
  assert capsys.readouterr().err == "error: unknown experiment argument 'fast'\n"
