"""Tests for coe_jax.evaluate: answer extraction, prompts, and a model that learns arithmetic.

The end-to-end part trains a tiny CoE(C=2) model in-process with the library's
train step on two-digit additions in the training format (`query : 23 + 45
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
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from coe_jax import config_lib, evaluate, train
from coe_jax.checkpoint import Checkpointer, save_run_config
from coe_jax.data import synthetic
from coe_jax.data.tokenized import build_split, format_example
from coe_jax.data.tokenizer import EOS_TOKEN, PAD_TOKEN, pad_id
from coe_jax.model import CoECausalLM

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")


# ----------------------------------------------------------------------------
# Answers and prompts.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("5 + 7 = 12\nThe answer is: 1,234.\nquery : more 99", "1234"),
    ("The answer is: $18.50 per day", "18.5"),
    ("The answer is: -3", "-3"),
    ("so 4 * 2 = 8\n#### 8\nThen 17 more", "8"),
    ("first 3 then 4 and finally 5.0", "5"),
    ("no digits at all", None),
])
def test_extract_gsm8k_answer(text, expected):
  assert evaluate.extract_gsm8k_answer(text) == expected


def test_gsm8k_target_and_numeric_match():
  assert evaluate.gsm8k_target("She pays 2*500=<<2*500=1000>>1000.\n#### 1,000") == "1000"
  assert evaluate.numbers_equal("3.50", "3.5") and evaluate.numbers_equal("1000", "1000")
  assert not evaluate.numbers_equal(None, "3") and not evaluate.numbers_equal("31", "3")


def test_gsm8k_rows_become_training_style_responses():
  row = {"question": "Q?", "answer": "2*3=<<2*3=6>>6 apples.\n#### 1,006"}
  problem = evaluate.to_problem(row, "gsm8k")
  assert problem == evaluate.Problem("Q?", "2*3=6 apples.\n#### 1,006\nThe answer is: 1006", "1006")


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{\\frac{1}{2}} and then \\boxed{x^{2}+1}.", "x^{2}+1"),
    ("$\\boxed 5$", "5"),
    ("\\fbox{7}", "7"),
    ("\\boxed{unbalanced", None),
    ("nothing", None),
])
def test_last_boxed(text, expected):
  assert evaluate.last_boxed(text) == expected


def test_math_rows_and_extraction():
  row = {"problem": "P", "solution": "Thus $x = \\boxed{\\dfrac{3}{4}}$.", "level": "Level 2"}
  problem = evaluate.to_problem(row, "math")
  assert problem.answer == "\\dfrac{3}{4}"
  assert problem.response.endswith("\nThe answer is: \\dfrac{3}{4}")
  assert evaluate.extract_math_answer("... \\boxed{3}.\nThe answer is: 3\nquery : x") == "3"
  assert evaluate.extract_math_answer("we get $\\boxed{(1,2)}$ done") == "(1,2)"


@pytest.mark.parametrize("a,b", [
    ("\\dfrac{1}{2}", "\\frac12"), ("1/2", "\\frac{1}{2}"), ("x = 5", "5"), ("10\\%", "10"),
    ("5 \\text{ cm}", "5"), ("\\$1,000", "1000"), (".5", "0.5"), ("90^\\circ", "90"),
    ("\\left( 1, 2 \\right)", "(1,2)"), ("\\boxed{7}", "7"), ("\\sqrt2", "\\sqrt{2}"),
    ("\\text{(A)}", "(A)"), ("2.50", "2.5"),
])
def test_math_answers_that_are_equal(a, b):
  assert evaluate.math_equal(a, b)


@pytest.mark.parametrize("a,b", [("\\frac{1}{3}", "\\frac{1}{2}"), ("(1,2)", "(2,1)"),
                                 ("", "0"), (None, "1"), ("12", "1,2")])
def test_math_answers_that_differ(a, b):
  assert not evaluate.math_equal(a, b)


def test_prompts_and_shots():
  problems = [evaluate.Problem(f"q{i}", f"r{i}", str(i)) for i in range(6)]
  assert evaluate.build_prompt("Q") == "query : Q response :"
  shots, rest = evaluate.split_shots(problems, 2, seed=5)
  assert len(shots) == 2 and len(rest) == 4 and not set(shots) & set(rest)
  assert evaluate.split_shots(problems, 2, seed=5) == (shots, rest)  # deterministic
  prompt = evaluate.build_prompt("Q", shots)
  assert prompt.startswith(f"query : {shots[0].query} response : {shots[0].response}\n\n")
  assert prompt.endswith("\n\nquery : Q response :")
  shots2, rest2 = evaluate.split_shots(problems, 2, seed=5, shots_from=problems[:3])
  assert rest2 == problems and set(shots2) <= set(problems[:3])


@needs_shared_data
def test_shared_gsm8k_and_math_files_parse():
  gsm8k = evaluate.load_problems("gsm8k", str(SHARED_DATA / "gsm8k" / "test.jsonl"))
  assert len(gsm8k) == 1319 and all(evaluate.normalize_number(p.answer) == p.answer for p in gsm8k)
  math_problems = evaluate.load_problems("math", str(SHARED_DATA / "math" / "test.jsonl"))
  assert len(math_problems) == 5000
  assert sum(bool(p.answer) for p in math_problems) >= 4990
  # Extracting from the training-style response gives back the reference answer (one MATH
  # answer, "90\\text{ square\\nunits}", spans two lines).
  assert all(evaluate.numbers_equal(evaluate.extract_gsm8k_answer(p.response), p.answer)
             for p in gsm8k)
  misses = [p.answer for p in math_problems
            if p.answer and not evaluate.math_equal(evaluate.extract_math_answer(p.response), p.answer)]
  assert len(misses) <= 1, misses[:5]


# ----------------------------------------------------------------------------
# A model that learns two-digit addition, evaluated end to end.
# ----------------------------------------------------------------------------

# CoE(C=2, K=2, N=8) with 2 layers. residual_style='textbook' (out = h + sum_t m_t): with the
# reference residual the same model reached ~25% instead of 70-80% in this budget.
ARITH_MODEL = dict(hidden_size=64, num_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                   qk_rope_head_dim=16, rope_scaling="none", v_head_dim=16,
                   moe_intermediate_size=64, n_routed_experts=7, n_shared_experts=1,
                   num_experts_per_tok=2, num_iterations=2, num_layers=2,
                   residual_style="textbook")
ARITH_STEPS, ARITH_BATCH, ARITH_LEN, ARITH_HELD_OUT = 1200, 32, 20, 100


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
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
      vocab_size=300, min_frequency=2, show_progress=False, special_tokens=[PAD_TOKEN, EOS_TOKEN],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def _train(config, split) -> tuple[train.TrainState, float]:
  """ARITH_STEPS steps of the library's train step on random batches of `split`."""
  model = CoECausalLM(config_lib.model_config_from(config))
  state = jax.jit(lambda: train.init_train_state(model, config.train, config.seed, ARITH_LEN))()
  step = jax.jit(train.make_train_step(model, log_routing_stats=False), donate_argnums=0)
  order = np.random.default_rng(0)
  for _ in range(ARITH_STEPS):
    state, metrics = step(state, split.batch(order.integers(0, split.num_rows, ARITH_BATCH)),
                          jax.random.key(0))
  return state, float(metrics["loss"])


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
  """A run directory (config.json, tokenizer.json, checkpoint) of a model trained on additions.

  Returns (workdir, held-out jsonl, validation jsonl, training seconds, last train loss).
  The texts end with an end-of-text token so that generation learns to stop.
  """
  start = time.perf_counter()
  root = tmp_path_factory.mktemp("arith")
  workdir = root / "run"
  workdir.mkdir()
  rows = addition_corpus()
  held_out, val, train_rows = rows[:ARITH_HELD_OUT], rows[ARITH_HELD_OUT:200], rows[200:]
  texts = [format_example(r["query"], r["response"]) + EOS_TOKEN for r in train_rows]
  tok = digit_tokenizer(texts)
  tok.save(str(workdir / "tokenizer.json"))
  config = config_lib.build("tiny", vocab_size=tok.get_vocab_size(), **ARITH_MODEL)
  config.train.update(steps=ARITH_STEPS, batch_size=ARITH_BATCH, lr=3e-3, warmup_fraction=0.05,
                      schedule="cosine", eval_batch_size=50)
  config.data.update(source="json", max_length=ARITH_LEN, tokenizer=str(workdir / "tokenizer.json"),
                     train_files=_write_jsonl(root / "train.jsonl", train_rows),
                     val_files=_write_jsonl(root / "val.jsonl", val))
  state, last_loss = _train(config, build_split(tok, texts, ARITH_LEN, pad_id(tok), False))
  save_run_config(str(workdir), json.loads(config.to_json_best_effort()))
  checkpointer = Checkpointer(str(workdir), async_save=False)
  checkpointer.save(ARITH_STEPS, state, {"epoch": 0, "index": 0})
  checkpointer.close()
  return (workdir, _write_jsonl(root / "held_out.jsonl", held_out), str(root / "val.jsonl"),
          time.perf_counter() - start, last_loss)


@pytest.mark.slow
def test_greedy_generation_answers_held_out_additions(arithmetic_run):
  workdir, held_out, _, train_seconds, last_loss = arithmetic_run
  settings = evaluate.GenerationSettings(max_new_tokens=12, batch_size=50)
  result = evaluate.evaluate_run(str(workdir), "gsm8k", data=held_out, settings=settings)
  print(f"\narithmetic: accuracy {result['accuracy']:.2f} on {result['count']} held-out "
        f"additions (chance ~0.01); last train loss {last_loss:.3f}; built in "
        f"{train_seconds:.0f} s, evaluated in {result['seconds']:.0f} s")
  assert result["count"] == ARITH_HELD_OUT and result["checkpoint_step"] == ARITH_STEPS
  assert result["accuracy"] >= 0.4  # measured 0.70 (chance ~0.01)
  saved = json.loads((workdir / "eval_gsm8k.json").read_text())
  assert saved["score"] == result["accuracy"] and saved["model"]["num_iterations"] == 2
  samples = [json.loads(line) for line in (workdir / "eval_gsm8k_samples.jsonl").open()]
  assert len(samples) == 20 and all(s["stopped"] for s in samples)  # stopped at end-of-text
  assert all(s["generation"] == f" The answer is: {s['answer']}" for s in samples if s["correct"])


@pytest.mark.slow
def test_val_loss_on_a_file_equals_the_runs_validation_split(arithmetic_run):
  workdir, _, val_path, _, _ = arithmetic_run
  own = evaluate.evaluate_run(str(workdir), "val_loss")
  from_file = evaluate.evaluate_run(str(workdir), "val_loss", data=val_path, batch_size=50)
  assert own["count"] == from_file["count"] == 100
  np.testing.assert_allclose(own["loss"], from_file["loss"], rtol=1e-6)
  assert own["loss"] < 1.0 and own["perplexity"] == pytest.approx(np.exp(own["loss"]))
  assert json.loads((workdir / "eval_val_loss.json").read_text())["metric"] == "loss"


@pytest.mark.slow
def test_command_line_val_loss(arithmetic_run):
  workdir, _, val_path, _, _ = arithmetic_run
  done = subprocess.run([sys.executable, "-m", "coe_jax.evaluate", f"--workdir={workdir}",
                         "--task=val_loss", f"--data={val_path}", "--limit=20"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads((workdir / "eval_val_loss.json").read_text())
  assert result["count"] == 20 and result["limit"] == 20 and np.isfinite(result["loss"])


@needs_shared_data
@pytest.mark.slow
def test_math_task_runs_on_the_shared_test_file(arithmetic_run):
  workdir = arithmetic_run[0]
  settings = evaluate.GenerationSettings(max_new_tokens=8, batch_size=2, max_prompt_length=48)
  result = evaluate.evaluate_run(str(workdir), "math", limit=2, settings=settings)
  assert result["count"] == 2 and result["data"].endswith("math/test.jsonl")
  assert 0.0 <= result["accuracy"] <= 1.0
