"""Tests for coe_jax.eval_tasks.evaluate_run and the coe_jax.evaluate command line, end to end.

The module trains a tiny CoE(C=2) model in-process with the library's
train step on a few two-digit additions in the training format (`query : 23 + 45
response : The answer is: 68`, then an end-of-text token so that generation
stops), saves it as a run directory and evaluates it with `evaluate_run`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tokenizers
from data_helpers import SHARED_DATA, needs_shared_data
from tokenizers import decoders, models, pre_tokenizers, trainers

from coe_jax import config_lib, eval_tasks
from coe_jax.data import synthetic
from coe_jax.data.tokenized import build_split, format_example
from coe_jax.data.tokenizer import EOS_TOKEN, PAD_TOKEN, pad_id
from coe_jax.nn.model import CoECausalLM
from coe_jax.training import train_step
from coe_jax.training.checkpoint import Checkpointer, save_run_config

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------
# A model trained on additions, evaluated end to end.
# ----------------------------------------------------------------------------
#
# No assert here depends on how well a long training converged on this machine's CPU: XLA's
# CPU numerics differ between CPU models and training amplifies the difference (a held-out
# accuracy measured at 0.70 here came out at 0.06 on another CPU). The main guard is a
# property that holds for any params: greedy decoding through `evaluate_run` (cached decoder,
# tokenizer, padding, stopping) picks, at every step, the argmax of the uncached model's full
# forward pass on the growing prefix. The learning checks use an easy task, memorising
# ARITH_MEMORISED additions, whose margin was measured over seeds and learning rates (below).

# CoE(C=2, K=2, N=8) with 2 layers, textbook residual (out = h + sum_t m_t).
ARITH_MODEL = dict(
  hidden_size=64,
  num_heads=4,
  kv_lora_rank=32,
  qk_nope_head_dim=16,
  qk_rope_head_dim=16,
  rope_scaling="none",
  v_head_dim=16,
  moe_intermediate_size=64,
  n_routed_experts=7,
  n_shared_experts=1,
  num_experts_per_tok=2,
  num_iterations=2,
  num_layers=2,
  residual_style="textbook",
)
ARITH_STEPS, ARITH_BATCH, ARITH_LEN, ARITH_LR = 600, 32, 20, 3e-3
ARITH_MEMORISED, ARITH_HELD_OUT, ARITH_NEW_TOKENS = 64, 32, 12
# Measured margins of the memorisation task (600 steps; seeds 0, 1, 2 at lr 3e-3, seed 3 at
# lr 2e-3, seed 4 at lr 5e-3): greedy accuracy on the 64 memorised additions 1.000 for every
# run. Checked every 50 steps, every run was at 1.00 by step 450 and >= 0.5 by step 250
# (weakest: lr 5e-3, 0.42 at step 200, 0.80 at step 250); with half the budget (300 steps,
# seeds 0-2) accuracy still ends >= 0.984. Validation loss on the memorised additions
# 0.2255-0.2265 (300 steps: <= 0.251; the query digits are unpredictable, so it cannot reach
# 0). Every run stopped at end-of-text on every memorised prompt. Teacher-forced shortfall
# (below) 0.0 in every run; pairing each generation with the next row's prompt gives >= 11.6.
# Measured with the optax chain; with the fused clip + AdamW (the default since PERF.md 16) the
# same seeds and rates gave accuracy 1.000 and validation loss 0.2254-0.2264 (300 steps: <= 0.244).
ARITH_MIN_ACCURACY, ARITH_MAX_VAL_LOSS = 0.5, 1.0
# Cached decoding vs the full forward pass in float32: the logit the decoder chose may fall
# short of the full pass's maximum by rounding only.
LOGIT_TOLERANCE = 1e-3


def _write_jsonl(path: Path, rows) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def addition_corpus() -> list[dict]:
  """All 8,100 two-digit additions (library order), as `query: "a + b"`, `response:
  "The answer is: s"`."""
  rows = []
  for example in synthetic.addition_examples(90 * 90, seed=0):
    a, b = (int(n) for n in re.findall(r"\d+", example["query"]))
    rows.append({"query": f"{a} + {b}", "response": f"The answer is: {a + b}"})
  return rows


def digit_tokenizer(texts: list[str]) -> tokenizers.Tokenizer:
  """A byte-level BPE (vocabulary 300) that keeps every digit a token of its own."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
    texts,
    trainer=trainers.BpeTrainer(
      vocab_size=300,
      min_frequency=2,
      show_progress=False,
      special_tokens=[PAD_TOKEN, EOS_TOKEN],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  return tok


def _train(config, split, seed: int) -> tuple[train_step.TrainState, float]:
  """config.train.steps steps of the library's train step on random batches of `split`."""
  model = CoECausalLM(config_lib.model_config_from(config))
  state = jax.jit(
    lambda: train_step.init_train_state(model, config.train, config.seed, ARITH_LEN)
  )()
  step = jax.jit(train_step.make_train_step(model, log_routing_stats=False), donate_argnums=0)
  order = np.random.default_rng(seed)
  for _ in range(config.train.steps):
    state, metrics = step(
      state, split.batch(order.integers(0, split.num_rows, ARITH_BATCH)), jax.random.key(seed)
    )
  return state, float(metrics["loss"])


def build_arithmetic_run(
  root: Path, seed: int = 0, lr: float = ARITH_LR, steps: int = ARITH_STEPS
) -> dict:
  """A run directory (config.json, tokenizer.json, checkpoint) of a model that memorised
  ARITH_MEMORISED additions; `seed` sets the init, the batch order and the step rng.

  The texts end with an end-of-text token so that generation learns to stop. The run's
  validation file is the memorised additions. Returns the paths, seconds and last train loss.
  """
  start = time.perf_counter()
  workdir = root / "run"
  workdir.mkdir()
  rows = addition_corpus()
  held_out, rest = rows[:ARITH_HELD_OUT], rows[200:]
  memorised = rest[:ARITH_MEMORISED]
  # The tokenizer is trained on every non-held-out addition; the model sees only `memorised`.
  tok = digit_tokenizer([format_example(r["query"], r["response"]) + EOS_TOKEN for r in rest])
  tok.save(str(workdir / "tokenizer.json"))
  texts = [format_example(r["query"], r["response"]) + EOS_TOKEN for r in memorised]
  config = config_lib.build("tiny", vocab_size=tok.get_vocab_size(), **ARITH_MODEL)
  config.seed = seed
  config.train.update(
    steps=steps,
    batch_size=ARITH_BATCH,
    lr=lr,
    warmup_fraction=0.05,
    schedule="cosine",
    eval_batch_size=ARITH_MEMORISED,
  )
  memorised_path = _write_jsonl(root / "memorised.jsonl", memorised)
  config.data.update(
    source="json",
    max_length=ARITH_LEN,
    tokenizer=str(workdir / "tokenizer.json"),
    train_files=memorised_path,
    val_files=memorised_path,
  )
  state, last_loss = _train(config, build_split(tok, texts, ARITH_LEN, pad_id(tok), False), seed)
  save_run_config(str(workdir), json.loads(config.to_json_best_effort()))
  checkpointer = Checkpointer(str(workdir), async_save=False)
  checkpointer.save(steps, state, {"epoch": 0, "index": 0})
  checkpointer.close()
  return dict(
    workdir=workdir,
    memorised=memorised_path,
    held_out=_write_jsonl(root / "held_out.jsonl", held_out),
    seconds=time.perf_counter() - start,
    last_loss=last_loss,
  )


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
  return build_arithmetic_run(tmp_path_factory.mktemp("arith"))


def teacher_forced_shortfall(run, prompts: list[str], completions) -> float:
  """Largest (max logit - logit of the generated token) of the uncached model's full forward
  pass over prompt + generation, at every generated position (0 when greedy decoding agrees)."""
  from coe_jax.inference.decoding import decode_config

  rows = [run.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
  full = [r + c.token_ids for r, c in zip(rows, completions)]
  width = max(len(r) for r in full)
  ids, mask = np.zeros((len(full), width), np.int32), np.zeros((len(full), width), np.int32)
  for b, row in enumerate(full):
    ids[b, : len(row)], mask[b, : len(row)] = row, 1  # right-padded: causal, pads after
  model = CoECausalLM(decode_config(run.model_config))
  logits = np.asarray(
    jax.jit(lambda p, i, m: model.apply({"params": p}, i, m)[0])(run.params, ids, mask)
  )
  shortfall = 0.0
  for b, (prompt, completion) in enumerate(zip(rows, completions)):
    for t, token in enumerate(completion.token_ids):
      step_logits = logits[b, len(prompt) - 1 + t]
      shortfall = max(shortfall, float(step_logits.max() - step_logits[token]))
  return shortfall


@pytest.mark.slow
def test_greedy_generation_is_the_argmax_of_the_full_forward_pass(arithmetic_run, tmp_path):
  """evaluate_run's greedy answers are, token by token, the uncached model's argmax."""
  from coe_jax.inference.completion import complete
  from coe_jax.inference.run_dir import load_run

  workdir = arithmetic_run["workdir"]
  # Unseen additions (uncertain answers) and memorised ones (confident, stop at end-of-text).
  problems = (
    eval_tasks.load_problems("gsm8k", arithmetic_run["held_out"])
    + eval_tasks.load_problems("gsm8k", arithmetic_run["memorised"])[:16]
  )
  data = _write_jsonl(
    tmp_path / "mixed.jsonl", [{"query": p.query, "response": p.response} for p in problems]
  )
  settings = eval_tasks.GenerationSettings(max_new_tokens=ARITH_NEW_TOKENS, batch_size=16)
  result = eval_tasks.evaluate_run(
    str(workdir), "gsm8k", data=data, settings=settings, num_samples=len(problems)
  )
  samples = [json.loads(line) for line in (workdir / "eval_gsm8k_samples.jsonl").open()]
  assert result["count"] == len(samples) == len(problems)

  run = load_run(str(workdir))
  prompts = [eval_tasks.build_prompt(p.query) for p in problems]
  completions = complete(
    run.params,
    run.model_config,
    run.tokenizer,
    prompts,
    max_new_tokens=ARITH_NEW_TOKENS,
    batch_size=settings.batch_size,
    stop_strings=settings.stop_strings,
  )
  assert [s["generation"] for s in samples] == [c.text for c in completions]
  assert [s["generated_tokens"] for s in samples] == [len(c.token_ids) for c in completions]
  shortfall = teacher_forced_shortfall(run, prompts, completions)
  print(f"\nteacher-forced shortfall of the greedy tokens: {shortfall:.2e}")
  assert shortfall <= LOGIT_TOLERANCE
  from coe_jax.data.tokenizer import eos_id

  for c in completions:
    assert c.token_ids and len(c.token_ids) <= ARITH_NEW_TOKENS
    if not c.finished:
      assert len(c.token_ids) == ARITH_NEW_TOKENS
    assert eos_id(run.tokenizer) not in c.token_ids[:-1]  # decoding stops at end-of-text


@pytest.mark.slow
def test_greedy_generation_answers_memorised_additions(arithmetic_run):
  workdir = arithmetic_run["workdir"]
  settings = eval_tasks.GenerationSettings(max_new_tokens=ARITH_NEW_TOKENS, batch_size=32)
  result = eval_tasks.evaluate_run(
    str(workdir), "gsm8k", data=arithmetic_run["memorised"], settings=settings
  )
  print(
    f"\narithmetic: accuracy {result['accuracy']:.2f} on {result['count']} memorised "
    f"additions (chance ~0.01); last train loss {arithmetic_run['last_loss']:.3f}; built in "
    f"{arithmetic_run['seconds']:.0f} s, evaluated in {result['seconds']:.0f} s"
  )
  assert result["count"] == ARITH_MEMORISED and result["checkpoint_step"] == ARITH_STEPS
  assert result["accuracy"] >= ARITH_MIN_ACCURACY  # every run measured 1.000 (see above)
  saved = json.loads((workdir / "eval_gsm8k.json").read_text())
  assert saved["score"] == result["accuracy"] and saved["model"]["num_iterations"] == 2
  samples = [json.loads(line) for line in (workdir / "eval_gsm8k_samples.jsonl").open()]
  assert len(samples) == 20 and all(s["stopped"] for s in samples)  # stopped at end-of-text
  assert all(s["generation"] == f" The answer is: {s['answer']}" for s in samples if s["correct"])


@pytest.mark.slow
def test_val_loss_on_a_file_equals_the_runs_validation_split(arithmetic_run):
  workdir = arithmetic_run["workdir"]
  own = eval_tasks.evaluate_run(str(workdir), "val_loss")
  from_file = eval_tasks.evaluate_run(
    str(workdir), "val_loss", data=arithmetic_run["memorised"], batch_size=50
  )
  assert own["count"] == from_file["count"] == ARITH_MEMORISED
  np.testing.assert_allclose(own["loss"], from_file["loss"], rtol=1e-6)
  # The trained checkpoint, not the init (log 300 = 5.7): every run measured <= 0.2265.
  assert own["loss"] < ARITH_MAX_VAL_LOSS
  assert own["perplexity"] == pytest.approx(np.exp(own["loss"]))
  assert json.loads((workdir / "eval_val_loss.json").read_text())["metric"] == "loss"


@pytest.mark.slow
def test_command_line_val_loss(arithmetic_run):
  workdir = arithmetic_run["workdir"]
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "coe_jax.evaluate",
      f"--workdir={workdir}",
      "--task=val_loss",
      f"--data={arithmetic_run['memorised']}",
      "--limit=20",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads((workdir / "eval_val_loss.json").read_text())
  assert result["count"] == 20 and result["limit"] == 20 and np.isfinite(result["loss"])


@needs_shared_data
@pytest.mark.slow
def test_math_task_runs_on_the_shared_test_file(arithmetic_run):
  workdir = arithmetic_run["workdir"]
  settings = eval_tasks.GenerationSettings(max_new_tokens=8, batch_size=2, max_prompt_length=48)
  result = eval_tasks.evaluate_run(
    str(workdir), "math", limit=2, settings=settings, data=str(SHARED_DATA / "math" / "test.jsonl")
  )
  assert result["count"] == 2 and result["data"].endswith("math/test.jsonl")
  assert 0.0 <= result["accuracy"] <= 1.0
