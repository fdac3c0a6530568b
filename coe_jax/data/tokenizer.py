"""Tokenizers: a local `tokenizer.json`, a byte-level BPE trained on the corpus, or a hub name.

`load_tokenizer(spec, ...)` understands three kinds of `spec`:

* a path to a `tokenizer.json` file, or to a directory holding one;
* `"bpe"`: train a byte-level BPE (with `<|padding|>` and `<|endoftext|>`
  special tokens) on the training texts, cached as `<workdir>/tokenizer.json`
  and reused while the requested vocabulary size and training key match;
* a Hugging Face hub name such as `deepseek-ai/DeepSeek-V2-Lite`, which needs
  a network (or a warm hub cache).

The end-of-text and padding ids are the tokenizer's declared ones where it declares
them (`tokenizer_config.json` or `special_tokens_map.json` beside `tokenizer.json`,
read by `load_file`; `save_file` writes them beside a copy), else the first of
`EOS_CANDIDATES` / `PAD_CANDIDATES` the vocabulary holds. For the DeepSeek-V2
tokenizer both ways give `<｜end▁of▁sentence｜>` (100001), the reference's EOS.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from coe_jax.nn.model_config import ConfigError

PAD_TOKEN = "<|padding|>"
EOS_TOKEN = "<|endoftext|>"
PAD_CANDIDATES = (
  "<|padding|>",
  "<pad>",
  "[PAD]",
  "<|pad|>",
  "<｜▁pad▁｜>",
  "<|finetune_right_pad_id|>",
)
EOS_CANDIDATES = (
  "<|endoftext|>",
  "</s>",
  "<｜end▁of▁sentence｜>",  # DeepSeek-V2's declared EOS; before DeepSeek-Coder's <|EOT|>
  "<|EOT|>",
  "<|end_of_text|>",
  "<|eot_id|>",
  "<|im_end|>",
  "<eos>",
)
_META_FILE = "tokenizer_meta.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"  # written beside a saved copy (`save_file`)
_DECLARING_FILES = ("tokenizer_config.json", SPECIAL_TOKENS_FILE)
_ROLES = ("eos_token", "pad_token")
_DECLARED = "coe_jax_special_tokens"  # attribute holding {role: token text} on a Tokenizer
_LOCAL_EXAMPLE = "../shared/data/tokenizer/olmoe/tokenizer.json"


def default_cache_root() -> Path:
  """`$COE_JAX_CACHE` or `~/.cache/coe_jax`: where caches go when there is no workdir."""
  return Path(os.environ.get("COE_JAX_CACHE", Path.home() / ".cache" / "coe_jax"))


def looks_like_path(spec: str) -> bool:
  """True when `spec` names a local file or directory rather than a hub repository."""
  return (
    os.path.exists(os.path.expanduser(spec))
    or spec.endswith(".json")
    or spec.startswith((".", "/", "~"))
  )


def load_tokenizer(
  spec: str,
  *,
  workdir: Optional[str] = None,
  train_texts: Optional[Callable[[], Iterable[str]]] = None,
  vocab_size: int = 2048,
  train_key: str = "",
) -> tokenizers.Tokenizer:
  """The tokenizer named by `spec` (see the module docstring).

  For `"bpe"`, `train_texts` is called only when no matching cached tokenizer
  exists; `train_key` (e.g. a hash of the corpus) is stored beside the cached
  file so a different corpus retrains instead of reusing a stale vocabulary.
  """
  if spec == "bpe":
    if workdir:
      cache = Path(workdir)
    else:
      cache = default_cache_root() / "tokenizers" / _bpe_dirname(vocab_size, train_key)
    return _cached_bpe(cache, train_texts, vocab_size, train_key)
  if looks_like_path(spec):
    return _from_file(spec)
  return _from_hub(spec)


def _bpe_dirname(vocab_size: int, train_key: str) -> str:
  return "bpe-" + hashlib.sha256(f"{vocab_size}:{train_key}".encode()).hexdigest()[:16]


def _from_file(spec: str) -> tokenizers.Tokenizer:
  path = Path(os.path.expanduser(spec))
  if path.is_dir():
    path = path / "tokenizer.json"
  if not path.is_file():
    raise ConfigError(
      f"data.tokenizer: got {spec!r}, but {str(path)!r} does not exist; allowed "
      "values: 'bpe', a tokenizer.json path (or its directory), or a hub name"
    )
  return load_file(path)


def load_file(path: str | Path) -> tokenizers.Tokenizer:
  """`tokenizer.json` at `path`, with the special tokens its folder declares (see module doc)."""
  tok = tokenizers.Tokenizer.from_file(str(path))
  declared = {}
  for name in reversed(_DECLARING_FILES):  # tokenizer_config.json wins
    declared.update(_declared_in(Path(path).parent / name))
  return with_special_tokens(tok, declared)


def save_file(tok: tokenizers.Tokenizer, path: str | Path) -> None:
  """Writes `tok` to `path` (atomically) and its declared special tokens beside it."""
  path = Path(path)
  write_text_atomic(path, tok.to_str())
  declared = special_tokens(tok)
  marker = path.parent / SPECIAL_TOKENS_FILE
  if declared:
    write_text_atomic(marker, json.dumps(declared, indent=1, ensure_ascii=False))
  elif marker.is_file():
    marker.unlink()


def _declared_in(path: Path) -> dict[str, str]:
  """{role: token text} for the roles `path` (a tokenizer_config / special_tokens_map) names."""
  if not path.is_file():
    return {}
  try:
    values = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return {}
  declared = {}
  for role in _ROLES:
    value = values.get(role) if isinstance(values, dict) else None
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str) and value:
      declared[role] = value
  return declared


def with_special_tokens(
  tok: tokenizers.Tokenizer, declared: dict[str, str]
) -> tokenizers.Tokenizer:
  """`tok` carrying `declared` ({role: token text}) as its declared special tokens."""
  setattr(tok, _DECLARED, dict(declared))
  return tok


def special_tokens(tok: tokenizers.Tokenizer) -> dict[str, str]:
  """The special tokens `tok` declares ({'eos_token': ..., 'pad_token': ...}; may be empty)."""
  return dict(getattr(tok, _DECLARED, {}))


def _from_hub(name: str) -> tokenizers.Tokenizer:
  try:
    tok = tokenizers.Tokenizer.from_pretrained(name)
  except Exception as error:  # offline, unknown repo, no tokenizer.json, ...
    raise ConfigError(
      f"data.tokenizer: could not load {name!r} from the Hugging Face hub "
      f"({type(error).__name__}: {str(error)[:200]}). Without a network, set "
      f"config.data.tokenizer to a local tokenizer.json path, e.g. {_LOCAL_EXAMPLE}, "
      "or to 'bpe' to train one on the training texts."
    ) from error
  return with_special_tokens(tok, _hub_declared(name))


def _hub_declared(name: str) -> dict[str, str]:
  """The special tokens a hub repository's tokenizer_config.json declares ({} if unreachable)."""
  try:
    from huggingface_hub import hf_hub_download

    return _declared_in(Path(hf_hub_download(name, "tokenizer_config.json")))
  except Exception:  # no such file, offline: fall back to the candidate lists
    return {}


def _cached_bpe(
  cache: Path, train_texts: Optional[Callable[[], Iterable[str]]], vocab_size: int, train_key: str
) -> tokenizers.Tokenizer:
  path, meta_path = cache / "tokenizer.json", cache / _META_FILE
  meta = {"vocab_size": vocab_size, "train_key": train_key}
  if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
    return tokenizers.Tokenizer.from_file(str(path))
  if train_texts is None:
    raise ValueError("tokenizer 'bpe' needs train_texts to train on (no cached tokenizer found)")
  tok = train_bpe(train_texts(), vocab_size)
  cache.mkdir(parents=True, exist_ok=True)
  write_text_atomic(path, tok.to_str())
  write_text_atomic(meta_path, json.dumps(meta))
  return tok


def write_text_atomic(path: Path, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename (creating parent directories)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
  except OSError:
    tmp.unlink(missing_ok=True)  # a full disk leaves no partial file
    raise


def train_bpe(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
  """A byte-level BPE trained on `texts`: pad id 0 (`<|padding|>`), eos id 1 (`<|endoftext|>`)."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=2,
    show_progress=False,
    special_tokens=[PAD_TOKEN, EOS_TOKEN],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def _first_id(tok: tokenizers.Tokenizer, candidates: tuple[str, ...]) -> Optional[int]:
  for token in candidates:
    token_id = tok.token_to_id(token)
    if token_id is not None:
      return token_id
  return None


def _declared_id(tok: tokenizers.Tokenizer, role: str) -> Optional[int]:
  token = special_tokens(tok).get(role)
  return None if token is None else tok.token_to_id(token)


def pad_id(tok: tokenizers.Tokenizer) -> int:
  """The id of the tokenizer's padding token (declared, else a known one), or 0 when none."""
  found = _declared_id(tok, "pad_token")
  if found is None:
    found = _first_id(tok, PAD_CANDIDATES)
  return 0 if found is None else found


def eos_id(tok: tokenizers.Tokenizer) -> Optional[int]:
  """The id of the tokenizer's end-of-text token (declared, else a known one), or None."""
  found = _declared_id(tok, "eos_token")
  return _first_id(tok, EOS_CANDIDATES) if found is None else found


def tokenizer_fingerprint(tok: tokenizers.Tokenizer) -> str:
  """A stable 16-hex-digit hash of the tokenizer's JSON, for cache keys."""
  return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]


def _bpe_merges(model: dict) -> list[tuple[str, str]]:
  """A BPE model's merges as pairs (tokenizer.json stores them as pairs or as 'a b' strings)."""
  return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def trim_vocabulary(
  tok: tokenizers.Tokenizer, texts: Iterable[str], keep: int
) -> tokenizers.Tokenizer:
  """A copy of the BPE `tok` keeping only the `keep` tokens most frequent in `texts`.

  Also kept: every added/special token, every byte symbol of a byte-level
  vocabulary and, recursively, both halves of every kept token's merge, so the
  trimmed tokenizer still encodes any text (a dropped rare token is spelled
  with the smaller pieces it was merged from; nothing becomes unknown) and a
  text whose tokens are all kept is split exactly as before. Ids are
  renumbered 0..V-1 in the original order. The point is a small output head:
  at hidden 128 a 50K-token head costs ~10x the rest of a tiny model.
  """
  spec = json.loads(tok.to_str())
  model = spec["model"]
  if model.get("type") != "BPE":
    raise ConfigError(f"data.trim_vocab: needs a BPE tokenizer; this one is {model.get('type')!r}")
  if spec.get("post_processor") and spec["post_processor"].get("special_tokens"):
    raise ConfigError(
      "data.trim_vocab: tokenizers whose post-processor adds special tokens are "
      "not supported; set data.trim_vocab=0"
    )
  vocab: dict[str, int] = model["vocab"]
  merges = _bpe_merges(model)
  counts: dict[int, int] = {}
  for enc in tok.encode_batch(list(texts), add_special_tokens=False):
    for token_id in enc.ids:
      counts[token_id] = counts.get(token_id, 0) + 1
  by_id = {i: t for t, i in vocab.items()}
  frequent = sorted(counts, key=lambda i: (-counts[i], i))[:keep]
  kept = {by_id[i] for i in frequent if i in by_id}
  kept |= {a["content"] for a in spec["added_tokens"] if a["content"] in vocab}
  kept |= {c for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab}
  halves = {a + b: (a, b) for a, b in merges}
  stack = list(kept)
  while stack:
    for half in halves.get(stack.pop(), ()):
      if half not in kept:
        kept.add(half)
        stack.append(half)
  new_vocab = {t: n for n, t in enumerate(sorted(kept, key=vocab.__getitem__))}
  model["vocab"] = new_vocab
  model["merges"] = [
    [a, b] for a, b in merges if a in new_vocab and b in new_vocab and a + b in new_vocab
  ]
  next_id = len(new_vocab)
  for added in spec["added_tokens"]:  # added tokens outside the model vocabulary go after it
    if added["content"] in new_vocab:
      added["id"] = new_vocab[added["content"]]
    else:
      added["id"], next_id = next_id, next_id + 1
  return tokenizers.Tokenizer.from_str(json.dumps(spec))
