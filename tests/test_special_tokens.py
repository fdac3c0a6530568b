"""End-of-text and padding ids: the tokenizer's declared ones (DESIGN.md 6).

The DeepSeek-V2 tokenizer holds both DeepSeek-Coder's `<|EOT|>` and its own end of
sentence; the reference ends and pads text with the latter (id 100001), which its
`tokenizer_config.json` declares as `eos_token` and `pad_token`.
"""

from __future__ import annotations

import json

import pytest

from coe_jax.data import tokenizer as tokenizer_lib
from coe_jax.data.input_pipeline import _save_tokenizer_copy
from coe_jax.inference.run_dir import load_tokenizer as load_run_tokenizer

EOT, END = "<|EOT|>", "<｜end▁of▁sentence｜>"


def _tokenizer_folder(tmp_path, declared: dict | None, file: str = "tokenizer_config.json"):
  """A folder with a tokenizer.json holding both tokens (EOT first, as DeepSeek-V2's does)."""
  tok = tokenizer_lib.train_bpe(["query : 1 + 1 response : 2"] * 4, 270)
  tok.add_special_tokens([EOT, END])
  folder = tmp_path / "tok"
  folder.mkdir()
  tok.save(str(folder / "tokenizer.json"))
  if declared is not None:
    (folder / file).write_text(json.dumps(declared, ensure_ascii=False))
  return folder, tok


@pytest.mark.parametrize("file", ["tokenizer_config.json", "special_tokens_map.json"])
def test_the_declared_end_of_text_and_pad_win(tmp_path, file):
  declared = {"eos_token": END, "pad_token": {"content": END, "lstrip": False}}
  folder, tok = _tokenizer_folder(tmp_path, declared, file)
  loaded = tokenizer_lib.load_tokenizer(str(folder))
  assert tokenizer_lib.eos_id(loaded) == tok.token_to_id(END)
  assert tokenizer_lib.pad_id(loaded) == tok.token_to_id(END)  # not <|padding|> (id 0)


def test_a_declared_token_wins_over_the_candidate_order(tmp_path):
  folder, tok = _tokenizer_folder(tmp_path, {"eos_token": EOT})
  assert tokenizer_lib.eos_id(tokenizer_lib.load_tokenizer(str(folder))) == tok.token_to_id(EOT)


def test_without_declarations_the_candidates_prefer_deepseek_v2s_end_of_sentence(tmp_path):
  # <|endoftext|> is the first candidate, so drop it to see the order of the other two.
  folder, tok = _tokenizer_folder(tmp_path, None)
  spec = json.loads(tok.to_str())
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|endoftext|>"]
  del spec["model"]["vocab"]["<|endoftext|>"]
  (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
  loaded = tokenizer_lib.load_tokenizer(str(folder))
  assert tokenizer_lib.special_tokens(loaded) == {}
  assert loaded.token_to_id(EOT) is not None
  assert tokenizer_lib.eos_id(loaded) == loaded.token_to_id(END)


def test_a_runs_tokenizer_copy_keeps_the_declarations(tmp_path):
  folder, tok = _tokenizer_folder(tmp_path, {"eos_token": END, "pad_token": END})
  workdir = tmp_path / "run"
  _save_tokenizer_copy(tokenizer_lib.load_tokenizer(str(folder)), str(workdir))
  copy = load_run_tokenizer(str(workdir))
  assert tokenizer_lib.eos_id(copy) == tokenizer_lib.pad_id(copy) == tok.token_to_id(END)
  assert json.loads((workdir / tokenizer_lib.SPECIAL_TOKENS_FILE).read_text()) == {
    "eos_token": END,
    "pad_token": END,
  }
