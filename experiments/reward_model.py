"""A reward model on your own model and preference data: K scalar heads, Bradley-Terry and the other RM losses.

A scalar head (``num_heads`` outputs: an ensemble on one backbone, each head trained on every
pair) is put on any model (``model.path``) and trained on preference pairs (HH-RLHF, TRL's
prompt/chosen/rejected, UltraFeedback best-vs-worst; ranked lists give their best-vs-worst pair)
with a pairwise reward loss (``loss``: ``bt`` with TRL's ``margin``, ``label_smoothing`` and
``center_rewards_coefficient`` under ``loss_kwargs``, or ``bt_logexp``). The reward of a
sequence is the head at its last real token. With LoRA the adapters and the head train.
The trained model scores completions in ``experiments/grpo.py`` (``reward.model_path``) and
initialises PPO's critic (``critic.path``); ``rlhf_jax.train.load_run(workdir)`` loads it.

Command:
  python -m rlhf_jax.run experiments/reward_model.py --workdir runs/rm      # tiny model, generated pairs
  python -m rlhf_jax.run experiments/reward_model.py --config.model.path=smollm2 --config.lora.rank=8 \\
      --config.data.train_files=my_pairs.jsonl --config.num_heads=3 --workdir runs/rm_smollm2
  python -m rlhf_jax.run experiments/reward_model.py --help

Headline (``result.json``): held-out pairwise ``accuracy`` (chosen scored above rejected,
mean over heads), before -> after; also the margin and per-head / ensemble accuracy.
"""

import inspect

import ml_collections

import rlhf_jax.losses as losses_lib
from rlhf_jax.train import evaluation, recipe, reward

CONFIG_HELP = {
    **recipe.SHARED_HELP,
    "export.hf_dir": "not available for reward models (a scalar head has no causal-LM format): load the run "
                     "with rlhf_jax.train.load_run(workdir)",
    "export.adapter_dir": "not available for reward models (see export.hf_dir)",
    "num_heads": "scalar heads K (an ensemble on one backbone; each head is trained on every pair)",
    "loss": "pairwise reward loss: bt (Bradley-Terry) or bt_logexp",
    "loss_kwargs": "hyper-parameters of the loss, any key (--config.loss_kwargs.center_rewards_coefficient=0.01)",
}


def get_config(arg=None):
  c = recipe.shared_config(learning_rate=5e-4, batch_size=16, max_len=128, max_prompt_len=96, num_epochs=0)
  c.num_steps = 200
  c.optimizer.warmup_steps = 10
  c.num_heads = 1
  c.loss = "bt"
  c.loss_kwargs = ml_collections.ConfigDict()
  if arg == "runlocal":
    c.num_steps = 40
  elif arg not in (None, ""):
    raise recipe.ConfigError(f"unknown experiment argument {arg!r}; valid: 'runlocal'")
  return c


def pairwise_reward_losses() -> list[str]:
  """Registered reward losses called as ``fn(chosen_rewards_B, rejected_rewards_B, **kw)``."""
  out = []
  for n in losses_lib.names():
    if losses_lib.info(n).kind != "reward":
      continue
    params = list(inspect.signature(losses_lib.get(n)).parameters)
    if len(params) >= 2 and params[0].startswith("chosen") and params[1].startswith("rejected"):
      out.append(n)
  return out


def main(config, workdir):
  valid = pairwise_reward_losses()
  if config.loss not in valid:
    raise recipe.ConfigError(f"config.loss={config.loss!r}; pairwise reward losses: {valid}")
  if config.num_heads < 1:
    raise recipe.ConfigError(f"config.num_heads={config.num_heads} must be at least 1")
  if config.export.hf_dir or config.export.adapter_dir:
    raise recipe.ConfigError("config.export.hf_dir / adapter_dir: a reward model's scalar head has no Hugging Face "
                             "causal-LM format; load the run with rlhf_jax.train.load_run(workdir)")
  data = recipe.load_data(config, allowed_kinds=("pair", "ranked"), workdir=workdir,
                          generate=lambda split, n: recipe.demo_rows("preference", split, n, seed=config.seed))
  if data.kind == "ranked":
    from rlhf_jax.data import formats

    to_pairs = lambda exs: [formats.best_worst_pair(e) for e in exs if e["scores"][0] > e["scores"][-1]]
    data.train, data.eval = to_pairs(data.train), to_pairs(data.eval)
  mesh = recipe.make_mesh(config.mesh)
  model, tok, info = recipe.build_model(config, mesh, scalar_head=int(config.num_heads))
  steps = recipe.num_train_steps(config, len(data.train))
  tx, schedule = recipe.make_optimizer(config, steps)
  graphdef, state, shardings = recipe.create_state(model, tx, config, mesh, info, train_head=True)
  del model
  loss_fn = reward.make_reward_loss(config.loss, hparams=dict(config.loss_kwargs))
  step = recipe.make_step(loss_fn, tx, graphdef, config, mesh, shardings, schedule, info)
  collate, eval_collate = recipe.collates("pair", config, tok, data)
  put = recipe.put_fn(mesh)
  eval_fn = evaluation.make_reward_eval(graphdef, recipe.fixed_batches(data.eval, config.eval_batch_size,
                                                                       eval_collate), put)
  before = eval_fn(state)
  res = recipe.run_training(name="reward_model", config=config, workdir=workdir, step_fn=step, state=state,
                            shardings=shardings, batches=recipe.train_batches(data.train, config, collate),
                            num_steps=steps, put_batch=put, eval_fn=eval_fn, data=data,
                            plot_keys=("loss", "accuracy", "margin", "eval/accuracy", "grad_norm"))
  if res.preempted:
    return res
  after = recipe.final_eval(res, eval_fn)
  res.result = recipe.finish(workdir, metric="accuracy", before=before, after=after, res=res,
                             extra={"model": info["source"], "data_format": data.format, "loss": config.loss,
                                    "num_heads": int(config.num_heads), "num_train_examples": len(data.train),
                                    "num_eval_examples": len(data.eval), "token_stats": dict(data.token_stats)})
  return res
