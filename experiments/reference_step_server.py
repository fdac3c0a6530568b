"""The authors' train step, one per request: what `versus_reference.py` times beside ours.

Runs under the torch venv of `../shared/tools/ref_torch/setup.sh` (it imports no coe_jax):

    REF_DIR=... $REF_VENV/bin/python experiments/reference_step_server.py HARNESS -- REF_ARGS

HARNESS is that folder's `ref.py`; REF_ARGS are its model arguments (`--hidden ... --threads 2`)
plus `--batch`/`--seq`. The model and optimizer are built exactly as `ref.py time` builds them
(their `CoeForCausalLM`, AdamW lr 3e-4 betas (0.9, 0.95) wd 0.01, clip 1.0). Each input line
`step` runs one train step on fresh random ids and answers `<seconds> <loss>`; `quit` (or end
of input) exits. The first output line is `ready <parameter count>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time


def load_harness(path: str):
  spec = importlib.util.spec_from_file_location("ref_harness", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main() -> None:
  harness_path, separator, *ref_args = sys.argv[1:]
  assert separator == "--", "usage: reference_step_server.py HARNESS -- REF_ARGS"
  ref = load_harness(harness_path)
  parser = argparse.ArgumentParser()
  ref.add_model_args(parser)
  parser.add_argument("--lr", type=float, default=3e-4)
  parser.add_argument("--clip", type=float, default=1.0)
  args = parser.parse_args(ref_args)
  torch = ref.torch
  if args.threads:
    torch.set_num_threads(args.threads)
  modeling, configuration = ref.load_upstream()
  model, cfg = ref.build_model(args, modeling, configuration)
  model.train()
  optimizer = ref.make_optimizer(model, args)
  generator = torch.Generator().manual_seed(args.seed + 2)

  def step() -> tuple[float, float]:
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=generator)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if args.clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, float(loss.detach())

  print(f"ready {sum(p.numel() for p in model.parameters())}", flush=True)
  for line in sys.stdin:
    if line.strip() != "step":
      break
    seconds, loss = step()
    print(f"{seconds:.6f} {loss:.6f}", flush=True)


if __name__ == "__main__":
  main()
