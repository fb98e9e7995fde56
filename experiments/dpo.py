"""Preference optimisation on your own model and data: the DPO family, unpaired and listwise losses.

The data format decides the step: preference pairs (HH-RLHF transcripts, TRL's
prompt/chosen/rejected in text or conversational form, also with an implicit prompt,
UltraFeedback best-vs-worst) train a pairwise loss; unpaired rows (KTO's
prompt/completion/label) train ``kto``, ``bco`` or ``apo_zero_unpaired``; ranked lists
(UltraFeedback's scored completions) a listwise loss. ``loss`` names any registered loss of
that kind (``sigmoid``, ``ipo``, ``hinge``, ``simpo``, ``orpo``, ``robust``, ``bco_pair``,
``apo_zero``, ...; ``python -c "import rlhf_jax.losses as L; print(L.names())"``), or several
with weights (``--config.loss=sigmoid,sft --config.loss_weights=1,1`` is RPO); their
hyper-parameters go under ``loss_kwargs`` (``--config.loss_kwargs.label_smoothing=0.1``).
With LoRA (``lora.rank > 0``) the frozen base is the reference at no memory cost; with full
fine-tuning a frozen copy of the initial weights is.

Command:
  python -m rlhf_jax.run experiments/dpo.py --workdir runs/dpo     # tiny model, generated pairs
  python -m rlhf_jax.run experiments/dpo.py --config.model.path=smollm2 --config.lora.rank=8 \\
      --config.data.train_files=my_pairs.jsonl --config.export.adapter_dir=runs/dpo/adapter --workdir runs/dpo_smollm2
  python -m rlhf_jax.run experiments/dpo.py --help

Headline (``result.json``), on held-out data before -> after: pairs: ``reward_accuracy``
(TRL's ``rewards/accuracies``: DPO's implicit reward ``β·log π/π_ref`` ranks the chosen response
above the rejected one; 0 before training, when the policy is the reference and every pair
ties); unpaired: ``label_accuracy`` (the implicit reward's sign matches the label); lists:
``reward_top1_accuracy`` (the best-scored completion has the highest implicit reward). Also the
policy's own log-prob accuracy (``logp_accuracy``: chosen likelier than rejected, biased
towards shorter answers), the reward margin and the held-out DPO loss (log 2 before).
Hardware: a CPU is enough for the default (tiny model, 2 CPU cores: about a minute).
"""

import functools

import ml_collections

import rlhf_jax.losses as losses_lib
from rlhf_jax.train import evaluation, preference, recipe

KIND_STEPS = {"pair": "pairwise", "unpaired": "unpaired", "ranked": "listwise"}
DEFAULT_LOSS = {"pair": "sigmoid", "unpaired": "kto", "ranked": "lipo_lambda"}
HEADLINE = {"pair": "reward_accuracy", "unpaired": "label_accuracy", "ranked": "reward_top1_accuracy"}

CONFIG_HELP = {
    **recipe.SHARED_HELP,
    "loss": "auto (sigmoid for pairs, kto for unpaired rows, lipo_lambda for ranked lists), a registered loss "
            "name, or several comma-separated (sigmoid,sft)",
    "loss_weights": "weights of the losses (empty: 1 each)",
    "loss_kwargs": "hyper-parameters of the losses, any key (--config.loss_kwargs.label_smoothing=0.1)",
    "beta": "the KL temperature beta of the DPO family",
    "reference_free": "no reference model (SimPO, CPO, ORPO, ...): implicit rewards are beta * log pi",
    "ld_alpha": "LD-DPO: weight of the longer response's tail beyond the shared length (0 = off)",
    "use_weighting": "WPO: weight each pair by the policy's own probability of it",
    "data.num_completions": "ranked lists: members kept per list (the best-scored ones)",
}


def get_config(arg=None):
  c = recipe.shared_config(learning_rate=5e-4, batch_size=16, max_len=128, max_prompt_len=96, num_epochs=0)
  c.num_steps = 150
  c.optimizer.warmup_steps = 10
  c.loss = "auto"
  c.loss_weights = ()
  c.loss_kwargs = ml_collections.ConfigDict()
  c.beta = 0.1
  c.reference_free = False
  c.ld_alpha = 0.0
  c.use_weighting = False
  c.data.num_completions = 4
  if arg == "runlocal":
    c.num_steps = 40
  elif arg not in (None, ""):
    raise recipe.ConfigError(f"unknown experiment argument {arg!r}; valid: 'runlocal'")
  return c


def loss_specs(config, kind: str) -> list[tuple[str, float, dict]]:
  """``(name, weight, hparams)`` of ``config.loss`` checked against the data kind."""
  names = config.loss
  if isinstance(names, str):
    names = [n.strip() for n in names.strip("()[] ").replace("'", "").replace('"', "").split(",") if n.strip()]
  names = [DEFAULT_LOSS[kind] if n == "auto" else n for n in names] or [DEFAULT_LOSS[kind]]
  weights = [float(w) for w in config.loss_weights] or [1.0] * len(names)
  if len(weights) != len(names):
    raise recipe.ConfigError(f"config.loss_weights={tuple(config.loss_weights)} has {len(weights)} weights for "
                             f"{len(names)} losses {tuple(names)}")
  want = KIND_STEPS[kind]
  valid = [n for n in losses_lib.names() if losses_lib.info(n).kind == want]
  for n in names:
    if n not in losses_lib.names():
      raise recipe.ConfigError(f"config.loss={n!r} is not a registered loss; {want} losses: {valid}")
    if losses_lib.info(n).kind != want:
      raise recipe.ConfigError(f"config.loss={n!r} is a {losses_lib.info(n).kind} loss but the data "
                               f"({kind} examples) trains {want} losses: {valid}")
  if kind != "pair" and len(names) > 1:
    raise recipe.ConfigError(f"config.loss: {kind} data trains one loss, got {tuple(names)}")
  return [(n, w, dict(config.loss_kwargs)) for n, w in zip(names, weights)]


def main(config, workdir):
  data = recipe.load_data(config, allowed_kinds=tuple(KIND_STEPS), workdir=workdir,
                          generate=lambda split, n: recipe.demo_rows("preference", split, n, seed=config.seed))
  kind = data.kind
  specs = loss_specs(config, kind)
  mesh = recipe.make_mesh(config.mesh)
  model, tok, info = recipe.build_model(config, mesh)
  steps = recipe.num_train_steps(config, len(data.train))
  tx, schedule = recipe.make_optimizer(config, steps)
  bco = kind == "unpaired" and specs[0][0] == "bco"
  graphdef, state, shardings = recipe.create_state(model, tx, config, mesh, info,
                                                   keep_reference=not config.reference_free,
                                                   extras={"bco_delta": preference.bco_delta_init()} if bco else None)
  ref_graphdef = info.get("ref_graphdef", graphdef)
  del model

  beta = float(config.beta)
  if kind == "pair":
    loss_fn = preference.make_preference_loss(
        specs, beta=beta, ref_graphdef=ref_graphdef, reference_free=bool(config.reference_free),
        ld_alpha=float(config.ld_alpha) or None, use_weighting=bool(config.use_weighting))
  elif kind == "unpaired":
    loss_fn = preference.make_unpaired_loss(specs[0][0], beta=beta, hparams=specs[0][2], ref_graphdef=ref_graphdef)
  else:
    loss_fn = preference.make_listwise_loss(specs[0][0], beta=beta, hparams=specs[0][2], ref_graphdef=ref_graphdef,
                                            reference_free=bool(config.reference_free))
  step = recipe.make_step(loss_fn, tx, graphdef, config, mesh, shardings, schedule, info,
                          base_as_reference=not config.reference_free,
                          extras_from_metrics=preference.bco_delta_update if bco else None)

  from rlhf_jax.data import tokenize

  kw = recipe.tokenize_kwargs(config, tok, data.token_stats)
  eval_kw = {**kw, "stats": tokenize.new_token_stats()}
  put = recipe.put_fn(mesh)
  if kind == "pair":
    collate, eval_collate = recipe.collates("pair", config, tok, data)
    make_eval = functools.partial(evaluation.make_pair_eval, beta=beta)
    plot = ("loss", "rewards/accuracies", "rewards/margins", "eval/logp_accuracy", "eval/reward_accuracy")
  elif kind == "unpaired":
    def unpaired_collate(stats):
      one = functools.partial(tokenize.tokenize_unpaired, tokenizer=tok, **{**kw, "stats": stats})
      return lambda exs: preference.add_mismatched_rows(one(exs), exs, one)

    collate, eval_collate = unpaired_collate(data.token_stats), unpaired_collate(eval_kw["stats"])
    make_eval = evaluation.make_unpaired_eval
    plot = ("loss", "rewards/desirable", "rewards/undesirable", "kl", "eval/label_accuracy")
  else:
    n = int(config.data.num_completions)
    if n < 2:
      raise recipe.ConfigError(f"config.data.num_completions={n} must be at least 2")
    collate, eval_collate = recipe.collates("ranked", config, tok, data, num_completions=n)
    make_eval = evaluation.make_ranked_eval
    plot = ("loss", "top1_accuracy", "eval/logp_top1_accuracy", "eval/reward_top1_accuracy")
  eval_fn = make_eval(graphdef, recipe.fixed_batches(data.eval, config.eval_batch_size, eval_collate), put,
                      reference_state=state)
  before = eval_fn(state)
  res = recipe.run_training(name="dpo", config=config, workdir=workdir, step_fn=step, state=state,
                            shardings=shardings, batches=recipe.train_batches(data.train, config, collate),
                            num_steps=steps, put_batch=put, eval_fn=eval_fn, data=data, plot_keys=plot)
  if res.preempted:
    return res
  after = recipe.final_eval(res, eval_fn)
  paths = recipe.export(config, graphdef, res.state, tok, info=info)
  res.result = recipe.finish(workdir, metric=HEADLINE[kind], before=before, after=after, res=res, paths=paths,
                             extra={"model": info["source"], "data_format": data.format, "data_kind": kind,
                                    "losses": [(n, w) for n, w, _ in specs], "beta": beta,
                                    "num_train_examples": len(data.train), "num_eval_examples": len(data.eval),
                                    "token_stats": dict(data.token_stats)})
  return res
