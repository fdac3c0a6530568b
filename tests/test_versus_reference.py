"""experiments.versus_reference: the authors' step is built at exactly our step's shapes."""

from __future__ import annotations

import json

import pytest

from experiments import bench, versus_reference


def _flags(args: list[str]) -> dict[str, str | list[str]]:
  parsed: dict = {"--set": {}}
  for name, value in zip(args[::2], args[1::2]):
    if name == "--set":
      key, raw = value.split("=", 1)
      parsed["--set"][key] = json.loads(raw)
    else:
      parsed[name] = value
  return parsed


@pytest.mark.parametrize("run,k,c", [("moe_k8", 8, 1), ("coe_c2", 4, 2)])
@pytest.mark.parametrize("shape", list(versus_reference.SHAPES))
def test_reference_args_describe_our_model(run, k, c, shape):
  preset = versus_reference.SHAPES[shape]
  config = bench.load_config(f"configs/{run}.py:{preset['scale']}")
  cfg = bench.bench_model_config(config, config.model.dispatch, preset["model"])
  flags = _flags(versus_reference.reference_args(cfg, preset["batch"], preset["seq"], 2))
  assert (flags["--experts"], flags["--n-shared"]) == ("64", "1")  # N counts the shared expert
  assert (flags["--topk"], flags["--iters"]) == (str(k), str(c))
  assert flags["--hidden"] == str(cfg.hidden_size) == ("128" if shape == "narrow" else "1024")
  assert flags["--layers"] == str(cfg.num_layers) == "2"
  assert flags["--moe-inter"] == str(cfg.coe.moe_intermediate_size)
  assert flags["--vocab"] == str(preset["model"]["vocab_size"])
  assert (flags["--batch"], flags["--seq"]) == (str(preset["batch"]), str(preset["seq"]))
  attention = {k: flags["--set"][k] for k in ("num_attention_heads", "kv_lora_rank", "v_head_dim")}
  assert attention == dict(
    num_attention_heads=cfg.num_heads, kv_lora_rank=cfg.kv_lora_rank, v_head_dim=cfg.v_head_dim
  )
  assert flags["--set"]["rope_scaling"]["original_max_position_embeddings"] == (
    cfg.rope_original_max_position
  )


@pytest.mark.parametrize("run", ["moe_k8", "coe_c2"])
def test_our_side_splits_the_host_as_the_cli_does(run, monkeypatch):
  monkeypatch.setattr(versus_reference.host_devices, "usable_cores", lambda: 2)
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert versus_reference.cli_devices(run, versus_reference.SHAPES["narrow"]) == 2
  assert versus_reference.cli_devices(run, versus_reference.SHAPES["paper_width"]) == 1  # one row
  config = versus_reference.shape_config(run, versus_reference.SHAPES["narrow"])
  assert (config.train.batch_size, config.data.max_length, config.model.vocab_size) == (
    16,
    256,
    5620,
  )
