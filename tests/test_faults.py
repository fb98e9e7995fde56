"""Faults: preemption of multi-stage runs, poisoned and damaged checkpoints, duplicated metrics.

The two-stage experiments run in subprocesses through the real CLI with a SIGTERM sent
at a chosen step of a chosen stage (``_DRIVER`` wraps the stage's step function); the
loops and checkpoints are also checked in process on a 3-parameter model.
"""

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.checkpoint import Checkpointer, abstract_like
from rlhf_jax.checkpoint.manager import INTEGRITY_FILE, CheckpointDamagedError
from rlhf_jax.train import loop, online, writers
from tests import _subprocess as sp

# ---------------------------------------------------------------------------------------------
# Subprocess runs of the two-stage experiments, with a SIGTERM at a chosen point.

_DRIVER = '''
"""python driver.py ARGS...: `python -m rlhf_jax.run ARGS` with a SIGTERM sent to itself.

FAULT_STAGE names a stage by its workdir's last folder (sft, rl, dpo, ...); FAULT_AT=N
sends SIGTERM just before the N-th call of that stage's step function, FAULT_AT=0 when
the stage's loop is called (between stages, before the loop installs its handler).
"""
import os, signal, sys
from rlhf_jax import run
from rlhf_jax.train import loop, online, writers

# Not under test here, and seconds per process: TensorBoard events (tensorboardX imports torch), PNGs.
_init = writers.MetricWriter.__init__
writers.MetricWriter.__init__ = lambda self, *a, **k: _init(self, *a, **dict(k, tensorboard=False))
writers.plot_curves = loop.plot_curves = lambda *a, **k: None

stage, at = os.environ.get("FAULT_STAGE", ""), int(os.environ.get("FAULT_AT", "-1"))


def wrap(kw):
  if os.path.basename(os.path.normpath(kw["workdir"])) != stage:
    return kw
  if at == 0:
    os.kill(os.getpid(), signal.SIGTERM)
    return kw
  inner, calls = kw["step_fn"], [0]

  def step_fn(*a, **k):
    calls[0] += 1
    if calls[0] == at:
      os.kill(os.getpid(), signal.SIGTERM)
    return inner(*a, **k)

  return dict(kw, step_fn=step_fn)


_train, _online = loop.train_loop, online.run_online
loop.train_loop = lambda **kw: _train(**wrap(kw))
online.run_online = lambda **kw: _online(**wrap(kw))
sys.exit(run.main(sys.argv[1:]))
'''

GRPO_SMALL = ("--config.progress=false", "--config.sft.num_steps=8", "--config.sft.checkpoint_every=4",
              "--config.sft.batch_size=8", "--config.rl.num_iterations=4", "--config.checkpoint_every=2",
              "--config.rl.prompts_per_iteration=2", "--config.rl.group_size=4",
              "--config.rl.dynamic_sampling_max_tries=1", "--config.eval.num_prompts=8", "--config.eval.every=0")
DPO_SMALL = ("--config.progress=false", "--config.sft.num_steps=10", "--config.dpo.num_steps=6",
             "--config.checkpoint_every=4", "--config.sft.batch_size=8", "--config.dpo.batch_size=8",
             "--config.data.num_sft=256", "--config.data.num_pairs=64", "--config.eval.num_prompts=8")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
  d = tmp_path_factory.mktemp("faults")
  path = d / "driver.py"
  path.write_text(_DRIVER)
  return str(path), str(d / "jax_cache")


def _run(driver, experiment, workdir, args, stage="", at=-1):
  path, cache = driver
  env = sp.env(1, FAULT_STAGE=stage, FAULT_AT=at, JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0, JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0)
  cmd = [sys.executable, path, os.path.join(sp.REPO, "experiments", experiment), "--workdir", str(workdir), *args]
  p = subprocess.run(cmd, cwd=sp.REPO, env=env, capture_output=True, text=True, timeout=300)
  return p.returncode, p.stdout + p.stderr


def _steps(workdir, stage):
  d = os.path.join(str(workdir), stage, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _saved(workdir, stage, step):
  return sp.flat(sp.saved_state(os.path.join(str(workdir), stage), step))


def _logged_steps(path):
  return [r["step"] for r in writers.read_jsonl(str(path)) if any(not k.startswith("eval/") for k in r if k != "step")]


def test_grpo_sigterm_in_each_stage_stops_there_and_resumes_stage_by_stage(driver, tmp_path):
  clean, killed = tmp_path / "clean", tmp_path / "killed"
  rc, out = _run(driver, "grpo_tiny.py", clean, GRPO_SMALL)
  assert rc == 0, out

  # SIGTERM at SFT step 6: the run stops in the SFT stage, saves, exits 143; no RL at all.
  rc, out = _run(driver, "grpo_tiny.py", killed, GRPO_SMALL, stage="sft", at=6)
  assert rc == 143, out
  assert "stopped by signal at step 6" in out and not (killed / "rl").exists(), out
  assert _steps(killed, "sft")[-1] == 6 and not (killed / "result.json").exists()

  # Restart, SIGTERM in the RL stage (minibatch step 3 = iteration 2): SFT resumes and completes,
  # RL stops after its current iteration with a checkpoint.
  rc, out = _run(driver, "grpo_tiny.py", killed, GRPO_SMALL, stage="rl", at=3)
  assert rc == 143, out
  assert "resumed from step 6 of 8" in out and "stopped by signal at iteration 2" in out, out
  assert _steps(killed, "rl")[-1] == 2 and not (killed / "result.json").exists()

  # Restart: SFT already complete, RL resumes; the result is the uninterrupted run's, bit for bit.
  rc, out = _run(driver, "grpo_tiny.py", killed, GRPO_SMALL)
  assert rc == 0, out
  assert "already complete at step 8" in out and "resumed from iteration 2 of 4" in out, out
  for stage, step in (("sft", 8), ("rl", 4)):
    a, b = _saved(killed, stage, step), _saved(clean, stage, step)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{stage}{k}")
  ra, rb = (json.loads((w / "result.json").read_text()) for w in (killed, clean))
  assert ra["headline"] == rb["headline"] and ra["final_metrics"].keys() == rb["final_metrics"].keys()
  # Metrics files read as one run each: every step once.
  assert _logged_steps(killed / "sft" / "metrics.jsonl") == list(range(1, 9))
  assert _logged_steps(killed / "rl" / "metrics.jsonl") == [1, 2, 3, 4]


def test_dpo_sigterm_between_stages_and_in_the_first_stage(driver, tmp_path):
  w = tmp_path / "dpo"
  # SIGTERM in the SFT stage (step 3): no DPO stage is started.
  rc, out = _run(driver, "dpo_tiny.py", w, DPO_SMALL, stage="sft", at=3)
  assert rc == 143, out
  assert _steps(w, "sft") == [3] and not (w / "dpo").exists(), out
  # SIGTERM between the stages (after SFT, while the reference log-probs are computed): the DPO
  # stage stops before its first step; exit 143, nothing saved for DPO.
  rc, out = _run(driver, "dpo_tiny.py", w, DPO_SMALL, stage="dpo", at=0)
  assert rc == 143, out
  assert "resumed from step 3 of 10" in out and _steps(w, "sft")[-1] == 10 and _steps(w, "dpo") == [], out
  rc, out = _run(driver, "dpo_tiny.py", w, DPO_SMALL)
  assert rc == 0, out
  assert "already complete at step 10" in out and _steps(w, "dpo")[-1] == 6, out
  assert _logged_steps(w / "sft" / "metrics.jsonl") == list(range(1, 11))
  assert _logged_steps(w / "dpo" / "metrics.jsonl") == list(range(1, 7))
  assert (w / "result.json").exists()


# ---------------------------------------------------------------------------------------------
# In process: a 3-parameter model with Adam.


def _quadratic(lr=0.1):
  from rlhf_jax.train import state as state_lib, step as step_lib

  class Lin(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones((3,)), axes=("embed",))

  tx = optax.adam(lr)
  graphdef, state, _ = state_lib.create_train_state(Lin(), tx)

  def loss_fn(m, batch, rng):
    return jnp.sum((m.w.get_value() - batch["x"]) ** 2), {}

  return state, step_lib.make_train_step(loss_fn, tx, graphdef, donate=False)


class _Batches:
  """Batches ``x = 0`` (NaN on the steps in ``nan_steps``), with a checkpointable position."""

  def __init__(self, nan_steps=(), signal_at=None, signum=signal.SIGTERM):
    self.i, self.nan_steps, self.signal_at, self.signum = 0, set(nan_steps), signal_at, signum

  def __next__(self):
    self.i += 1
    if self.i == self.signal_at:
      os.kill(os.getpid(), self.signum)
    return {"x": jnp.full((3,), jnp.nan if self.i in self.nan_steps else 0.0)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = int(s["i"])


def _train(workdir, num_steps, *, keep=2, every=1, batches=None, async_save=False, **kw):
  state, step = _quadratic()
  ck = Checkpointer(os.path.join(str(workdir), "checkpoints"), max_to_keep=keep, async_save=async_save)
  try:
    res = loop.train_loop(step_fn=step, state=state, batches=batches or _Batches(), num_steps=num_steps,
                          workdir=str(workdir), checkpointer=ck, checkpoint_every=every, progress=False,
                          count_tokens=lambda b: 0, plot_keys=(), **kw)
  finally:
    ck.close()
  return res, ck


def test_poisoned_streak_keeps_the_last_healthy_checkpoint_with_keep_2(tmp_path, caplog):
  # Updates skipped as non-finite from step 4 on; the run stops at a streak of 4 (step 7).
  with pytest.raises(loop.NonFiniteError, match="max_nonfinite_streak=4"):
    _train(tmp_path, 20, batches=_Batches(nan_steps=range(4, 100)), max_nonfinite_streak=4)
  ck = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2)
  assert ck.all_steps() == [3, 5, 6]  # the newest two (saved mid-streak) and the last healthy one
  assert ck.is_healthy(3) and ck.is_healthy(5) is False and ck.is_healthy(6) is False
  ck.close()
  # The fixed run resumes from the healthy step, not from a streak that kills it at once.
  with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
    res, ck = _train(tmp_path, 10, max_nonfinite_streak=4)
  assert res.start_step == 3 and res.end_step == 10 and ck.restored_step == 3
  assert any("saved during a non-finite streak (3 updates skipped): resuming from step 3" in w for w in ck.warnings)
  assert os.path.isdir(tmp_path / "checkpoints" / "6.nonfinite")
  assert _logged_steps(tmp_path / "metrics.jsonl") == list(range(1, 11))


def _flip(path, n=64):
  b = bytearray(open(path, "rb").read())
  for i in range(min(n, len(b))):
    b[len(b) // 2 - n // 2 + i] ^= 0xFF
  open(path, "wb").write(bytes(b))


def _largest_chunk(step_dir):
  files = [p for p in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))]
  return max(files, key=os.path.getsize)


DAMAGES = {
    "delete manifest.ocdbt": lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
    "delete a data chunk": lambda d: os.remove(_largest_chunk(d)),
    "truncate a data chunk": lambda d: open(_largest_chunk(d), "r+b").truncate(10),
    "flip 64 bytes of a data chunk": lambda d: _flip(_largest_chunk(d)),
    "corrupt _METADATA": lambda d: open(os.path.join(d, "state", "_METADATA"), "w").write("{"),
    "delete the state item": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "rewrite the data position": lambda d: open(os.path.join(d, "data", "metadata"), "w").write('{"i": 99}'),
    "empty step folder": lambda d: (shutil.rmtree(d), os.makedirs(d)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
  res, ck = _train(tmp_path, 10, every=5, async_save=True)
  assert ck.all_steps() == [5, 10]
  DAMAGES[damage](os.path.join(ck.directory, "10"))
  res, ck = _train(tmp_path, 15, every=5, async_save=True)
  assert res.start_step == 5 and res.end_step == 15 and ck.restored_step == 5, ck.warnings
  assert len(ck.warnings) == 1 and ck.warnings[0].startswith(f"checkpoint {ck.step_dir(10)} is damaged (")
  assert "falling back to step 5" in ck.warnings[0] and "\n" not in ck.warnings[0]
  assert ck.all_steps() == [10, 15] and os.path.isdir(os.path.join(ck.directory, "10.damaged"))
  assert _logged_steps(tmp_path / "metrics.jsonl") == list(range(1, 16))
  # The resumed run equals one that was never damaged.
  ref, _ = _train(tmp_path / "ref", 15, every=5)
  for a, b in zip(jax.tree.leaves(res.state), jax.tree.leaves(ref.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flipped_bytes_in_the_optimizer_state_are_detected(tmp_path):
  _, ck = _train(tmp_path, 4, every=2)
  step_dir = ck.step_dir(4)
  assert all(os.path.exists(os.path.join(ck.step_dir(s), INTEGRITY_FILE)) for s in (2, 4))
  # Adam's moments and the parameters live in the data chunks; flip bytes in each in turn.
  for chunk in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
    backup = open(chunk, "rb").read()
    _flip(chunk, 16)
    ck = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2)
    state, _ = _quadratic()
    with pytest.raises(CheckpointDamagedError, match=r"checksum mismatch in state/ocdbt.process_0/d/"):
      ck.restore(abstract_like(state), 4, fallback=False)
    assert ck.verify(2) is None and "checksum mismatch" in ck.verify(4)
    ck.close()
    open(chunk, "wb").write(backup)
  ck = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2)
  assert ck.verify(4) is None
  ck.close()


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
  _, ck = _train(tmp_path, 4, every=2)
  for s in (2, 4):
    _flip(_largest_chunk(ck.step_dir(s)))
  with pytest.raises(CheckpointDamagedError, match=r"no intact checkpoint in .*step 4: checksum mismatch .*step 2: "):
    _train(tmp_path, 6, every=2)


def test_metrics_have_each_step_once_after_a_restart_from_scratch_or_when_complete(tmp_path):
  state, step = _quadratic()
  kw = dict(step_fn=step, num_steps=5, workdir=str(tmp_path), progress=False, count_tokens=lambda b: 0, plot_keys=())
  loop.train_loop(state=state, batches=_Batches(), **kw)  # no checkpoint: a rerun starts from scratch
  state, step = _quadratic()
  loop.train_loop(state=state, batches=_Batches(), **kw)
  assert _logged_steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5]
  # A file left with duplicated steps by an older version, and a stage that is already complete.
  res, _ = _train(tmp_path / "b", 5, every=5)
  rows = writers.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
  with open(tmp_path / "b" / "metrics.jsonl", "w") as f:
    for r in rows + rows:
      f.write(json.dumps(r) + "\n")
    f.write('{"step": 6, "lo')  # a torn last line
  res, _ = _train(tmp_path / "b", 5, every=5)
  assert res.start_step == res.end_step == 5
  assert _logged_steps(tmp_path / "b" / "metrics.jsonl") == [1, 2, 3, 4, 5]


def test_signal_between_stages_stops_the_next_stage_before_its_first_step(tmp_path):
  before = signal.getsignal(signal.SIGTERM)
  with loop._StopFlag() as outer:
    first, _ = _train(tmp_path / "a", 3)
    os.kill(os.getpid(), signal.SIGTERM)  # e.g. during an evaluation between the stages
    assert outer.signum == signal.SIGTERM
    second, ck = _train(tmp_path / "b", 3)
  assert not first.preempted and second.preempted and second.signum == signal.SIGTERM
  assert second.start_step == second.end_step == 0 and ck.all_steps() == []
  assert signal.getsignal(signal.SIGTERM) is before
  # A signal inside a stage reaches the enclosing flag too.
  with loop._StopFlag() as outer:
    res, _ = _train(tmp_path / "c", 50, batches=_Batches(signal_at=3, signum=signal.SIGINT))
  assert res.preempted and res.signum == signal.SIGINT and outer.signum == signal.SIGINT


# ---------------------------------------------------------------------------------------------
# run_online: handlers restored on every exit, the non-finite limit.


def _online(tmp_path, num_iterations, step_fn, **kw):
  def rollout_fn(params, ids, mask, rng, group_ids):
    b = len(group_ids)
    return online.Rollout(
        input_ids_BxT=np.ones((b, 3), np.int32), attention_mask_BxT=np.ones((b, 3), np.int32),
        targets_BxT=np.ones((b, 3), np.int32), response_mask_BxN=np.ones((b, 2), np.float32),
        tokens_BxN=np.ones((b, 2), np.int32), sampler_logps_BxN=np.zeros((b, 2), np.float32),
        group_ids_B=np.asarray(group_ids, np.int32))

  state, _ = _quadratic()
  ck = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  try:
    return online.run_online(
        state=state, state_shardings=None, graphdef=None, step_fn=step_fn, rollout_fn=rollout_fn,
        prompt_fn=lambda i: ([[1, 2], [1, 2]], np.array([0, 0])),
        reward_fn=lambda p, t, n: np.array([0.0, 1.0]), advantage_fn=lambda r, m, g: np.zeros_like(m),
        num_iterations=num_iterations, workdir=str(tmp_path), put_batch=lambda b: b, checkpointer=ck,
        progress=False, **kw), ck
  finally:
    ck.close()


def test_run_online_sigterm_saves_and_handlers_are_always_restored(tmp_path):
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  calls = [0]

  def step_fn(s, b):
    calls[0] += 1
    if calls[0] == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return s, {"loss": 0.0, "nonfinite_streak": 0}

  res, ck = _online(tmp_path, 10, step_fn)
  assert res.preempted and res.signum == signal.SIGTERM and res.end == 2 and ck.all_steps() == [2]
  assert {s: signal.getsignal(s) for s in before} == before

  def failing(s, b):
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    _online(tmp_path / "f", 3, failing)
  assert {s: signal.getsignal(s) for s in before} == before


def test_run_online_max_nonfinite_streak(tmp_path):
  streak = [0]

  def step_fn(s, b):
    streak[0] += 1
    return s, {"loss": float("nan"), "nonfinite_streak": streak[0], "update_skipped": 1.0}

  with pytest.raises(loop.NonFiniteError) as e:
    _online(tmp_path, 10, step_fn, max_nonfinite_streak=3)
  assert str(e.value) == ("iteration 3: 3 consecutive updates skipped as non-finite (limit max_nonfinite_streak=3); "
                          "non-finite metrics at this iteration: ['loss']")
  streak[0] = 0
  with pytest.raises(loop.NonFiniteError, match="limit max_nonfinite_streak=10"):
    _online(tmp_path / "d", 20, step_fn)


# ---------------------------------------------------------------------------------------------
# Resume with a changed config.


def test_resume_refuses_changed_model_optimizer_data_keys_unless_told(tmp_path, capsys):
  from rlhf_jax.errors import ConfigError

  cfg = {"seed": 0, "model": {"param_dtype": "float32", "remat": "none"},
         "optimizer": {"b2": 0.98, "learning_rate": 0.001}, "data": {"seed": 0, "files": ["a.jsonl"]},
         "resume_changed": ""}
  _train(tmp_path, 3, run_config=cfg)
  changed = json.loads(json.dumps(cfg))
  changed["model"]["param_dtype"], changed["data"]["seed"], changed["optimizer"]["b2"] = "bfloat16", 1, 0.95
  with pytest.raises(ConfigError) as e:
    _train(tmp_path, 5, run_config=changed)
  msg = str(e.value)
  assert msg.startswith(f"cannot resume {tmp_path}: config changed since its checkpoint: data.seed 0 -> 1; "
                        "model.param_dtype 'float32' -> 'bfloat16'; optimizer.b2 0.98 -> 0.95 ("), msg
  assert msg.endswith("--config.resume_changed=ok to resume with the new values") and "\n" not in msg
  # Layout keys pass; schedule keys pass with a warning.
  layout = json.loads(json.dumps(cfg))
  layout["model"]["remat"], layout["optimizer"]["learning_rate"] = "full", 0.002
  res, _ = _train(tmp_path, 5, run_config=layout)
  assert res.start_step == 3 and "optimizer.learning_rate 0.001 -> 0.002" in capsys.readouterr().out
  # The explicit override resumes, and says what changed.
  res, _ = _train(tmp_path, 6, run_config=dict(changed, resume_changed="ok"))
  out = capsys.readouterr().out
  assert res.start_step == 5 and "data.seed 0 -> 1 (the run resumes with the new value: resume_changed=ok)" in out
  assert "optimizer.b2 0.98 -> 0.95" in out


# ---------------------------------------------------------------------------------------------
# Readers.


def test_a_non_utf8_byte_is_one_bad_line_not_a_bad_file(tmp_path):
  from rlhf_jax.data import formats

  path = tmp_path / "pairs.jsonl"
  good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
  path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good[:-2] + b"\xff\"}\n" + good + b"\n")
  stats = formats.new_stats()
  rows = list(formats.read_examples(str(path), "preference", on_error="skip", stats=stats))
  assert len(rows) == 2 and stats["skipped_by_reason"] == {"invalid UTF-8": 1}, stats
  with pytest.raises(formats.DataError, match=rf"^{path}:2: invalid UTF-8: byte \d+ of the line is b'\\xff'"):
    list(formats.read_examples(str(path), "preference"))


# ---------------------------------------------------------------------------------------------
# A batch that does not split over the data-parallel devices.


def test_a_batch_that_does_not_split_over_the_data_parallel_devices_is_an_error(tmp_path):
  from rlhf_jax import parallel
  from rlhf_jax.errors import ConfigError

  state, _ = _quadratic()
  calls = []

  def step_fn(s, b):
    calls.append(b["input_ids"].shape)
    return s, {"loss": np.float32(0.0), "nonfinite_streak": 0}

  def train(mesh, rows, workdir, **kw):
    batches = iter([{"input_ids": np.zeros((rows, 3), np.int32)}] * 3)
    return loop.train_loop(step_fn=step_fn, state=state, batches=batches, num_steps=2, workdir=str(workdir),
                           put_batch=lambda b: parallel.host_local_to_global(b, mesh), progress=False,
                           count_tokens=lambda b: 0, plot_keys=(), **kw)

  eight = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  with pytest.raises(ConfigError) as e:
    train(eight, 4, tmp_path / "a")  # replicated: each of the 8 devices would compute all 4 rows
  assert str(e.value) == ("config.batch_size: a batch of 4 rows does not split over the 8 data-parallel devices "
                          "(mesh data=1 x fsdp=8), so every device would compute all 4; set batch_size to a "
                          "multiple of 8 or use fewer devices (config.mesh)")
  assert calls == []  # before the first step
  cube = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with pytest.raises(ConfigError, match=r"^config.sft.batch_size: a batch of 6 rows does not split over the 4 "
                     r"data-parallel devices \(mesh data=2 x fsdp=2\)"):
    train(cube, 6, tmp_path / "b", batch_key="sft.batch_size")
  res = train(cube, 8, tmp_path / "c")
  assert res.end_step == 2 and calls == [(8, 3), (8, 3)]
  one = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  assert train(one, 3, tmp_path / "d").end_step == 2
