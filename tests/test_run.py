"""The runner: config overrides are type-checked and unknown keys are named; bad optimizer values, a bad
workdir and a signal before training end the run with one line."""

import os
import signal
import subprocess
import sys

import ml_collections
import pytest

from rlhf_jax import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  c = ml_collections.ConfigDict()
  c.num_steps = 10
  c.flag = False
  c.optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-3, name="adamw"))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1))
  c.shape = (1, 2)
  c.maybe = None
  return c


def test_overrides_are_typed():
  c = run.apply_overrides(_config(), [("num_steps", "20"), ("optimizer.learning_rate", "0.5"), ("flag", "true"),
                                      ("optimizer.name", "sgd"), ("shape", "(3,4)"), ("maybe", "7")])
  assert c.num_steps == 20 and c.optimizer.learning_rate == 0.5 and c.flag is True
  assert c.optimizer.name == "sgd" and c.shape == (3, 4) and c.maybe == 7


def test_unknown_key_names_the_key_and_valid_choices():
  with pytest.raises(run.ConfigError, match=r"unknown config key 'optimizer.lr'.*under optimizer.*\['learning_rate', 'name'\]"):
    run.apply_overrides(_config(), [("optimizer.lr", "1")])
  with pytest.raises(run.ConfigError, match=r"'nmu_steps' is not under <top level>"):
    run.apply_overrides(_config(), [("nmu_steps", "1")])


@pytest.mark.parametrize("key,value,expected", [
    ("num_steps", "ten", "an int"), ("optimizer.learning_rate", "fast", "a float"),
    ("flag", "maybe", "a bool"), ("shape", "7", "a tuple or list"),
])
def test_wrong_type_is_an_error_naming_the_key(key, value, expected):
  with pytest.raises(run.ConfigError, match=f"--config.{key}=.*expected {expected}"):
    run.apply_overrides(_config(), [(key, value)])


def test_parse_args():
  spec, overrides, workdir = run.parse_args(["e.py:runlocal", "--config.a.b=1", "--config.c", "2", "--workdir", "w"])
  assert spec == "e.py:runlocal" and overrides == [("a.b", "1"), ("c", "2")] and workdir == "w"
  with pytest.raises(run.ConfigError, match="unknown argument"):
    run.parse_args(["e.py", "--lr=3"])


def test_cli_reports_bad_key_with_exit_code_2(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.run", "experiments/sft_tiny.py", "--config.optimizer.lr=1",
       "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
  )
  assert out.returncode == 2
  assert "unknown config key 'optimizer.lr'" in out.stderr and "learning_rate" in out.stderr


def test_bad_model_choice_names_the_field_and_choices(tmp_path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("sft_tiny", os.path.join(REPO, "experiments", "sft_tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("runlocal")
  run.apply_overrides(c, [("model.remat", "sometimes")])
  with pytest.raises(ValueError, match=r"ModelConfig.remat='sometimes'; valid choices: \('none', 'full'"):
    mod.main(c, str(tmp_path))
  with pytest.raises(ValueError, match="unknown experiment argument"):
    mod.get_config("fast")


# ---------------------------------------------------------------------------------------------
# Bad optimizer values, a bad workdir, a signal before training: one line each.

SFT_TINY = os.path.join(REPO, "experiments", "sft_tiny.py")


@pytest.mark.parametrize("kw,message", [
    (dict(learning_rate=-1e-3), "optimizer.learning_rate=-0.001 must be a positive number"),
    (dict(learning_rate=0.0), "optimizer.learning_rate=0.0 must be a positive number"),
    (dict(learning_rate=float("nan")), "optimizer.learning_rate=nan must be a positive number"),
    (dict(learning_rate=1e-3, warmup_steps=-5), "optimizer.warmup_steps=-5 must be >= 0"),
    (dict(learning_rate=1e-3, end_value_ratio=-0.1), "optimizer.end_value_ratio=-0.1 must be >= 0"),
    (dict(learning_rate=1e-3, max_grad_norm=-1.0), r"optimizer.max_grad_norm=-1.0 must be >= 0 \(0 disables"),
])
def test_make_optimizer_rejects_non_positive_learning_rates_and_negative_counts(kw, message):
  from rlhf_jax.train import optim

  with pytest.raises(run.ConfigError, match=f"^{message}"):
    optim.make_optimizer(kw, total_steps=10)
  with pytest.raises(run.ConfigError, match=r"^num_steps=-1 \(the schedule's total steps\) must be >= 0$"):
    optim.make_schedule(learning_rate=1e-3, total_steps=-1)
  with pytest.raises(run.ConfigError, match=r"^sft.learning_rate=-1 must be a positive number$"):
    optim.make_optimizer({"learning_rate": -1}, total_steps=10, prefix="sft")
  optim.make_optimizer({"learning_rate": 1e-3, "warmup_steps": 0, "max_grad_norm": 0.0}, total_steps=0)


def test_cli_negative_learning_rate_is_one_line_with_exit_code_2(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.run", SFT_TINY, "--config.optimizer.learning_rate=-1",
       "--config.progress=false", "--workdir", str(tmp_path / "w")],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines()[-1] == "error: optimizer.learning_rate=-1.0 must be a positive number"
  assert "Traceback" not in out.stderr


def _read_only_dir(path):
  """``path`` made read-only for this process (chmod, or ``chattr +i`` for root); None if impossible."""
  os.makedirs(path)
  os.chmod(path, 0o555)
  probe = os.path.join(path, "probe")
  try:
    open(probe, "w").close()
  except OSError:
    return path
  os.remove(probe)
  if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
    return None
  return path


def test_a_workdir_that_is_a_file_or_read_only_is_one_line_with_exit_code_2(tmp_path, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  assert run.main([SFT_TINY, "--workdir", str(a_file)]) == 2
  assert capsys.readouterr().err == (f"error: --workdir {str(a_file)!r} is a file, not a directory; give a "
                                     "directory (created if missing)\n")
  assert run.main([SFT_TINY, "--workdir", str(a_file / "run")]) == 2
  assert capsys.readouterr().err == f"error: --workdir {str(a_file / 'run')!r} cannot be created: Not a directory\n"
  ro = _read_only_dir(tmp_path / "ro")
  if ro is None:
    pytest.skip("no way to make a read-only directory here")
  try:
    assert run.main([SFT_TINY, "--workdir", str(ro)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --workdir {str(ro)!r} is not writable: ") and err.count("\n") == 1, err
    assert os.listdir(ro) == []
  finally:
    subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
    os.chmod(ro, 0o755)


_BLOCKS_AT_IMPORT = '''
import sys
print("importing", flush=True)
sys.stdin.readline()  # a slow import: the signal arrives here
def get_config(arg=None):
  import ml_collections
  return ml_collections.ConfigDict()
def main(config, workdir):
  return None
'''

_BLOCKS_IN_MODEL_BUILD = '''
import os, sys
import ml_collections


def get_config(arg=None):
  return ml_collections.ConfigDict({"progress": False})


def main(config, workdir):
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from rlhf_jax.checkpoint import Checkpointer
  from rlhf_jax.train import loop, state as state_lib, step as step_lib

  class Lin(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((3,)))

  print("building", flush=True)
  sys.stdin.readline()  # the model build: the signal arrives here
  graphdef, state, _ = state_lib.create_train_state(Lin(), optax.sgd(0.1))
  step = step_lib.make_train_step(lambda m, b, r: (jnp.sum(m.w.get_value() ** 2), {}), optax.sgd(0.1), graphdef)
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    return loop.train_loop(step_fn=step, state=state, batches=iter([{}] * 10), num_steps=5, workdir=workdir,
                           checkpointer=ck, progress=False, count_tokens=lambda b: 0, plot_keys=())
  finally:
    ck.close()
'''


def _signal_at_marker(tmp_path, source, marker, signum, answer=False):
  """Runs ``python -m rlhf_jax.run`` on an experiment ``source``; sends ``signum`` once it prints ``marker``
  (then, with ``answer``, unblocks its stdin); returns ``(exit status, output, workdir)``."""
  exp = tmp_path / "exp.py"
  exp.write_text(source)
  workdir = tmp_path / "wd"
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  p = subprocess.Popen([sys.executable, "-m", "rlhf_jax.run", str(exp), "--workdir", str(workdir)], cwd=REPO,
                       env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  try:
    for line in p.stdout:
      seen.append(line)
      if line.strip() == marker:
        break
    assert seen and seen[-1].strip() == marker, "".join(seen)
    p.send_signal(signum)
    rest, _ = p.communicate("\n" if answer else None, timeout=120)
  finally:
    if p.poll() is None:
      p.kill()
      p.wait()
  return p.returncode, "".join(seen) + rest, workdir


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_the_experiment_imports_exits_cleanly(tmp_path, signum, status):
  rc, out, workdir = _signal_at_marker(tmp_path, _BLOCKS_AT_IMPORT, "importing", signum)
  name = signal.Signals(signum).name
  assert rc == status, out
  assert out.splitlines()[-1] == (f"stopped by {name} before training started (exit {status}): no checkpoint was "
                                  "written; rerun the same command to start"), out
  assert "Traceback" not in out and not workdir.exists()


def test_a_sigterm_during_the_model_build_stops_the_loop_before_its_first_step(tmp_path):
  rc, out, workdir = _signal_at_marker(tmp_path, _BLOCKS_IN_MODEL_BUILD, "building", signal.SIGTERM, answer=True)
  assert rc == 143, out
  assert "stopped by signal at step 0" in out and "Traceback" not in out, out
  assert os.listdir(workdir / "checkpoints") == [] and not (workdir / "result.json").exists()
