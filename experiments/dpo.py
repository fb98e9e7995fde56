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
Per-pair columns of a preference row reach the losses by name (`rlhf_jax.data.formats.PAIR_FIELDS`):
``gold`` (a gold response: ``--config.loss=tpo``), ``beta`` (a per-pair β, e.g. scaled by a reward
margin as MM-DPO does), ``weight`` (a pair weight: ``k`` counts the pair ``k`` times) and
``margin_rewards_chosen`` / ``margin_rewards_rejected`` (MODPO: the other objectives' reward scores,
``--config.loss=modpo --config.loss_kwargs.weights=[0.5,0.5]``).
With LoRA (``lora.rank > 0``) the frozen base is the reference at no memory cost; with full
fine-tuning a frozen copy of the initial weights is.

Online (``--config.online=true``): the data gives only prompts (``prompt`` rows, GSM8K rows, or
the prompts of preference pairs, whose chosen / rejected are then unused). Each of
``num_iterations`` takes ``prompts_per_iteration`` prompts, samples ``num_samples`` completions
of each from the policy (``temperature``, ``top_p``; ``max_len - max_prompt_len`` new tokens),
judges them with the reward functions of ``reward.fns`` / ``reward.weights`` and / or a
reward-model run (``reward.model_path``), exactly as ``experiments/grpo.py`` scores, pairs them
(best vs worst) and takes ``online_epochs`` passes of ``loss`` steps over the pairs
(:mod:`rlhf_jax.train.online_preference`, :func:`rlhf_jax.train.iterative.run_iterations`: the
iteration's pairs are stored in ``<workdir>/iterations/`` before training, so a run stopped
mid-iteration resumes on them). ``online_algorithm`` names a preset of
``online_preference.ALGORITHMS``: ``online_dpo`` (Guo et al. 2024, TRL's OnlineDPOTrainer; the
default), ``iterative_dpo`` (4 samples, the reference reset to the policy every iteration),
``spin`` (the chosen response of each pair is the gold, against the policy's own sample), ``dno``
(the chosen response joins the samples), ``rso`` (samples of the reference), ``sharpening`` (the
policy's own likelihood judges; ``reward.*`` only evaluates); ``xpo``, ``inpo``, ``nash_md`` and
``egpo`` (extragradient, an even ``num_iterations``) train the objectives of
``rlhf_jax.losses.online``. ``spin`` and ``dno`` need pairs; ``dice`` is refused (its implicit-reward
judge needs a reference other than the starting policy).
The reference is the frozen LoRA base, or a copy of the initial weights. Headline: the held-out
mean judge reward of the policy's samples (``eval_sampling``), before -> after, with
``win_rate`` against the initial model (a tie counts half); the samples of every iteration,
with their scores, go to ``<workdir>/samples/``.

Command:
  python -m rlhf_jax.run experiments/dpo.py --workdir runs/dpo     # tiny model, generated pairs
  python -m rlhf_jax.run experiments/dpo.py --config.model.path=smollm2 --config.lora.rank=8 \\
      --config.data.train_files=my_pairs.jsonl --config.export.adapter_dir=runs/dpo/adapter --workdir runs/dpo_smollm2
  python -m rlhf_jax.train.demo_files data/          # prompts.jsonl, my_rewards.py, ...
  python -m rlhf_jax.run experiments/dpo.py --config.online=true --config.model.path=smollm2 --config.lora.rank=8 \\
      --config.data.train_files=data/prompts.jsonl --config.reward.fns=data/my_rewards.py:correct --workdir runs/odpo
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
import numpy as np

import rlhf_jax.losses as losses_lib
from rlhf_jax.train import evaluation, online_preference as op, preference, recipe

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
    # Online preference optimisation (--config.online=true).
    "online": "online: sample completions of the data's prompts from the policy, judge them with reward.*, "
              "pair them and take DPO steps, for num_iterations (false: train on the data's pairs)",
    "online_algorithm": "online: preset of rlhf_jax.train.online_preference.ALGORITHMS: " + ", ".join(op.ALGORITHMS),
    "num_iterations": "online: iterations (sample, judge, pair, train); num_steps and num_epochs are not used",
    "prompts_per_iteration": "online: training prompts sampled per iteration",
    "num_samples": "online: completions sampled per prompt (0: the preset's, 2 for online_dpo)",
    "temperature": "online: sampling temperature",
    "top_p": "online: nucleus sampling mass (1 = off)",
    "online_epochs": "online: passes over each iteration's pairs (batch_size pairs per step)",
    "min_margin": "online: a pair needs a judge-score gap above this",
    "eval_sampling": "online: held-out completions are sampled (the training temperature) or greedy",
    **recipe.REWARD_HELP,
}
CONFIG_HELP.update({
    "max_len": "tokens per sequence (prompt + response); online: completions get max_len - max_prompt_len new tokens",
    "batch_size": "global batch size (examples per step; online: pairs per step)",
    "eval_every": "held-out evaluation every N steps (online: iterations; 0 = before and after training only)",
    "eval_batch_size": "examples per evaluation batch (online: rows per log-prob batch)",
})


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
  c.online = False
  c.online_algorithm = "online_dpo"
  c.num_iterations = 20
  c.prompts_per_iteration = 32
  c.num_samples = 0
  c.temperature = 1.0
  c.top_p = 1.0
  c.online_epochs = 1.0
  c.min_margin = 0.0
  c.eval_sampling = "sampled"
  c.reward = recipe.reward_config()
  if arg == "runlocal":
    c.num_steps = 40
    c.num_iterations = 6
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
  if config.online:
    return main_online(config, workdir)
  data = recipe.load_data(config, allowed_kinds=tuple(KIND_STEPS), workdir=workdir,
                          generate=lambda split, n: recipe.demo_rows("preference", split, n, seed=config.seed))
  kind = data.kind
  specs = loss_specs(config, kind)
  if kind == "pair":
    from rlhf_jax.data import tokenize

    for name, column in preference.needed_columns(specs).items():
      for r in data.train:
        ex = tokenize.decode_record(r)
        if column not in (ex.get("fields") or {}):
          raise recipe.UserError(f"config.loss={name!r} needs the per-pair column {column!r}: "
                                 f"{ex.get('source', 'a training row')} has none")
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


# ----------------------------------------------------------------------------- online (--config.online=true)


def online_preset(config):
  """``(OnlineConfig, objective)`` of ``online_algorithm`` with the config's overrides; a ConfigError naming the key."""
  alg = config.online_algorithm
  recipe.check_choice("online_algorithm", alg, tuple(op.ALGORITHMS))
  for key in ("num_iterations", "prompts_per_iteration"):
    if int(config[key]) <= 0:
      raise recipe.ConfigError(f"config.{key}={config[key]} must be positive")
  if config.num_samples < 0:
    raise recipe.ConfigError(f"config.num_samples={config.num_samples} must be positive (0: the preset's)")
  if not config.temperature > 0:
    raise recipe.ConfigError(f"config.temperature={config.temperature} must be positive: identical (greedy) "
                             "samples make no pairs")
  if not 0 < config.top_p <= 1:
    raise recipe.ConfigError(f"config.top_p={config.top_p} must be in (0, 1]")
  if not config.online_epochs > 0:
    raise recipe.ConfigError(f"config.online_epochs={config.online_epochs} must be positive")
  recipe.check_choice("eval_sampling", config.eval_sampling, ("sampled", "greedy"))
  if alg == "dice":
    raise recipe.ConfigError("config.online_algorithm='dice' judges by the implicit reward against a reference "
                             "other than the starting policy; here the reference is the starting policy, so every "
                             "score is 0 and no pair forms")
  if alg == "egpo" and config.num_iterations % 2:
    raise recipe.ConfigError(f"config.num_iterations={config.num_iterations}: EGPO's extragradient iterations come "
                             "in pairs (extrapolation, update); give an even number")
  if config.ld_alpha:
    raise recipe.ConfigError("config.ld_alpha: LD-DPO is offline only (online reference log-probs are whole "
                             "sequences); set it to 0 with config.online=true")
  over = {"min_margin": float(config.min_margin)}
  if config.num_samples:
    over["num_samples"] = int(config.num_samples)
  try:
    cfg = op.online_config(alg, **over)
  except ValueError as e:
    raise recipe.ConfigError(f"config.online_algorithm={alg!r} with config.num_samples={config.num_samples}: "
                             f"{e}") from None
  objective = op.OBJECTIVES[alg]
  if objective != "dpo":
    try:
      import rlhf_jax.losses.online  # noqa: F401
    except ImportError as e:
      raise recipe.ConfigError(f"config.online_algorithm={alg!r} trains the {objective!r} objective of "
                               f"rlhf_jax.losses.online, which does not import: {e}") from None
    if config.reference_free:
      raise recipe.ConfigError(f"config.reference_free: online_algorithm={alg!r} ({objective}) needs a reference")
  return cfg, objective


def expected_pairs(cfg, prompts: int) -> int:
  """Pairs an iteration of ``prompts`` makes at most (sizes the optimizer schedule)."""
  k = cfg.num_samples + (cfg.gold == "candidate")
  return {"all_pairs": prompts * k * (k - 1) // 2, "gold": prompts * cfg.num_samples,
          "rso": prompts * max(1, cfg.rso_num_samples // 2)}.get(cfg.pairing, prompts)  # else one pair per prompt


def gold_tokens(config, tok, examples, prompts, stats) -> list:
  """The chosen response of each pair as completion tokens after its prompt (SPIN's gold): up to the first EOS,
  as a sample ends, and cut to fit ``max_len``."""
  from rlhf_jax.data import tokenize

  kw = recipe.tokenize_kwargs(config, tok, stats)
  out = []
  for ex, p in zip(examples, prompts):
    row = tokenize.tokenize_sft([ex], tok, **kw)
    gold = row["targets_BxT"][0][row["loss_mask_BxT"][0] > 0]
    ends = np.flatnonzero(gold == tok.eos_id)
    if ends.size:  # up to the end of the turn, as a sample stops there
      gold = gold[: ends[0] + 1]
    out.append(np.asarray(gold[: int(config.max_len) - len(p)], np.int32))
  return out


def main_online(config, workdir):
  """Online preference optimisation on the data's prompts, judged by ``reward.*`` (see the module doc)."""
  import os

  import jax
  from flax import nnx

  from rlhf_jax.checkpoint import Checkpointer
  from rlhf_jax.data import tokenize
  from rlhf_jax.train import iterative

  cfg, objective = online_preset(config)
  needs_gold = cfg.gold != "none"
  data = recipe.load_data(config, allowed_kinds=("prompt", "prompt_answer", "pair"), workdir=workdir,
                          generate=lambda split, n: recipe.demo_rows("preference" if needs_gold else "prompt", split, n,
                                                                     seed=config.seed))
  if needs_gold and data.kind != "pair":
    raise recipe.ConfigError(f"config.online_algorithm={config.online_algorithm!r} takes the chosen response of "
                             f"preference pairs as its gold; config.data.train_files holds {data.kind} rows")
  rewards = recipe.load_rewards(config, data)
  specs = loss_specs(config, "pair") if objective == "dpo" else []
  recipe.check_lengths(config)
  if config.batch_size <= 0:
    raise recipe.ConfigError(f"config.batch_size={config.batch_size} must be positive")
  n_prompts = int(config.prompts_per_iteration)
  if len(data.train) < n_prompts:
    raise recipe.UserError(f"config.prompts_per_iteration={n_prompts} exceeds the {len(data.train)} training prompts")
  prompt_len, max_len = int(config.max_prompt_len), int(config.max_len)
  mesh = recipe.make_mesh(config.mesh)
  model, tok, info = recipe.build_model(config, mesh)
  rewards.attach(tok, mesh, prompt_len)
  iters = int(config.num_iterations)
  per_iteration = iterative.steps_for(expected_pairs(cfg, n_prompts), batch_size=int(config.batch_size),
                                      epochs=float(config.online_epochs))
  tx, schedule = recipe.make_optimizer(config, iters * per_iteration)
  if config.optimizer.warmup_steps >= iters * per_iteration // 2:
    recipe.log.warning("config.optimizer.warmup_steps=%d: about half or more of the at most %d online steps "
                       "(num_iterations x pairs / batch_size) warm up; set it lower (0)",
                       config.optimizer.warmup_steps, iters * per_iteration)

  # The policy's graph (base + adapters under LoRA) samples and scores; the reference is the frozen base
  # (LoRA: the base with the initial adapters, B = 0) or a copy of the initial weights (full fine-tuning).
  policy_graphdef = nnx.graphdef(model)
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
  graphdef, state, shardings = recipe.create_state(model, tx, config, mesh, info)
  del model
  begin = None
  if config.online_algorithm == "egpo":  # the anchor and the extrapolated parameters, checkpointed with the state
    extras = {**(state.extras or {}), **op.extragradient_extras(state.params)}
    state = state._replace(extras=extras)
    if shardings is not None:
      shardings = shardings._replace(extras=jax.tree.map(lambda x: x.sharding, extras))
    begin = op.extragradient_begin
  if info["lora"]:
    init_adapters = copy(state.params)
    reference_of = lambda s: nnx.merge_state(s.extras["frozen_params"], init_adapters)  # the step donates the state
    state_params = recipe.params_of
  else:
    initial = copy(state.params)
    reference_of = lambda s: initial
    state_params = lambda s: s.params

  beta = float(config.beta)
  if objective == "dpo":
    loss_fn = preference.make_preference_loss(specs, beta=beta, reference_free=bool(config.reference_free),
                                              use_weighting=bool(config.use_weighting))
  else:
    loss_fn = op.make_online_loss(objective, beta=beta, hparams=dict(config.loss_kwargs))
  step = recipe.make_step(loss_fn, tx, graphdef, config, mesh, shardings, schedule, info)

  # Prompts (and SPIN's gold responses), tokenised once; a judged completion finds its row by its prompt.
  as_array = lambda ids: np.asarray(ids, np.int32)
  train_prompts = [as_array(p) for p in recipe.prompt_tokens(config, tok, data.train, data.token_stats)]
  eval_prompts = [as_array(p) for p in recipe.prompt_tokens(config, tok, data.eval, tokenize.new_token_stats())]
  golds = gold_tokens(config, tok, data.train, train_prompts, tokenize.new_token_stats()) if needs_gold else None
  by_id = {id(a): ex for a, ex in zip(train_prompts + eval_prompts, data.train + data.eval)}
  by_tokens = {a.tobytes(): ex for a, ex in zip(train_prompts + eval_prompts, data.train + data.eval)}
  row_of = lambda p: by_id.get(id(p)) or by_tokens[as_array(p).tobytes()]
  score = lambda prompts, comps: rewards.score_completions([row_of(p) for p in prompts], prompts, comps)
  judge = op.RewardJudge(score)
  per_epoch = len(data.train) // n_prompts

  def prompts_fn(it):
    epoch, k = divmod(it, per_epoch)
    idx = np.random.default_rng([config.seed, epoch]).permutation(len(data.train))[k * n_prompts:(k + 1) * n_prompts]
    return [train_prompts[i] for i in idx], ([golds[i] for i in idx] if golds is not None else None)

  max_new = max_len - prompt_len
  sampler = op.make_sampler(policy_graphdef, max_new_tokens=max_new, temperature=float(config.temperature),
                            top_p=float(config.top_p), eos_id=tok.eos_id, pad_id=tok.pad_id)
  logps_fn = op.make_sequence_logps_fn(policy_graphdef, chunk=max(int(config.eval_batch_size), 1))
  decode = lambda ids: tok.decode(np.asarray(ids).tolist(), skip_special_tokens=True)

  # The reference is read from the current state (under LoRA its frozen base: the step donates the state).
  make_data = op.make_preference_data(cfg, prompts_fn=prompts_fn, sampler=sampler, judge=judge, logps_fn=logps_fn,
                                      seq_len=max_len, ref_params=reference_of, state_params_fn=state_params,
                                      seed=config.seed, pad_id=tok.pad_id, prompt_length=prompt_len, decode=decode)

  # Held-out: the policy's mean judge reward and its win rate against the initial model (one sample per
  # prompt, the same key every time; a tie counts half). The first call samples the initial model.
  eval_sampler = sampler if config.eval_sampling == "sampled" else op.make_sampler(
      policy_graphdef, max_new_tokens=max_new, temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id)
  win_rate = op.make_win_rate_eval(eval_sampler, op.RewardJudge(score, temperature=1e-6), eval_prompts,
                                   opponent_params=reference_of(state), state_params_fn=state_params,
                                   seed=config.seed + 99, prompt_length=prompt_len, reward_name="reward_mean")

  def eval_fn(s):
    return {**win_rate(s), **rewards.failure_metrics()}

  before = eval_fn(state)
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=max(int(config.keep_checkpoints), 1),
                    unsaved_extras=("frozen_params", "ref_params"))
  try:
    res = iterative.run_iterations(
        state=state, step_fn=step, make_data=make_data, num_iterations=iters, batch_size=int(config.batch_size),
        workdir=workdir, epochs=float(config.online_epochs), seed=int(config.seed), put_batch=recipe.put_fn(mesh),
        begin_iteration=begin, checkpointer=ck, state_shardings=shardings, checkpoint_every=int(config.save_every),
        eval_fn=eval_fn,
        eval_every=int(config.eval_every) or iters, progress=bool(config.progress),
        run_config=recipe.run_config("dpo", config), desc=config.online_algorithm,
        plot_keys=("loss", "iteration/score_mean", "iteration/pairs", "eval/reward_mean", "eval/win_rate"))
  finally:
    ck.close()
  if res.preempted:
    return res
  after = {k[len("eval/"):]: v for k, v in res.eval_metrics.items() if k.startswith("eval/")} or eval_fn(res.state)
  paths = recipe.export(config, graphdef, res.state, tok, info=info)
  it_rows = [r for r in loop_rows(workdir) if "iteration/pairs" in r]
  res.result = recipe.finish(
      workdir, metric="reward_mean", before=before, after=after, res=res, paths=paths,
      extra={"model": info["source"], "data_format": data.format, "data_kind": data.kind, "online": True,
             "online_algorithm": config.online_algorithm, "objective": objective,
             "losses": [(n, w) for n, w, _ in specs], "beta": beta, "win_rate_vs_initial": after.get("win_rate"),
             "iterations": len(it_rows), "pairs_total": float(sum(r["iteration/pairs"] for r in it_rows)),
             "num_train_prompts": len(data.train), "num_eval_prompts": len(data.eval),
             "reward_failures": dict(rewards.failures), "token_stats": dict(data.token_stats)})
  return res


def loop_rows(workdir) -> list[dict]:
  """The rows of ``<workdir>/metrics.jsonl`` (empty when there is none)."""
  import os

  from rlhf_jax.train import writers

  path = os.path.join(workdir, "metrics.jsonl")
  return writers.read_jsonl(path) if os.path.exists(path) else []
