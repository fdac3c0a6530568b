"""The blocked layout's tile sizes: validation, the defaults of coe_jax.nn.tuning per backend."""

from __future__ import annotations

import functools

import pytest

from coe_jax.nn import tuning
from coe_jax.nn.blocked import blocked_bounds
from coe_jax.nn.model_config import ConfigError, ModelConfig


def test_dropless_tile_and_tile_sizes_are_validated():
  assert ModelConfig().replace(dropless_impl="blocked", dropless_tile=32).coe.dropless_tile == 32
  assert ModelConfig().replace(dropless_tile_sizes=3).coe.dropless_tile_sizes == 3
  for field in ("dropless_tile", "dropless_tile_sizes"):
    for bad in (-1, 2.5, True):
      with pytest.raises(ConfigError, match=rf"model\.{field}\b"):
        ModelConfig().replace(**{field: bad})


def test_default_dropless_tile_holds_a_balanced_load_one_deviation_over_the_mean():
  from coe_jax.nn.tuning import TILE_CAP, default_dropless_tile

  assert default_dropless_tile(512 * 8, 63) == 80  # mean 65 + 8.1 (MoE(K=8), paper-width bench)
  assert default_dropless_tile(512 * 4, 63) == 40  # mean 32.5 + 5.7 (CoE(C=2,K=4) there)
  assert default_dropless_tile(64 * 4, 31) == 16  # mean 8.3 + 2.9
  assert default_dropless_tile(64 * 4, 15) == 24  # mean 17.1 + 4.1
  assert default_dropless_tile(10, 63) == 8  # never below 8
  # Over the cap: equal tiles, e.g. mean 520 + 22.8 = 3 tiles of 184 (3 x 256 would pad 45%).
  assert default_dropless_tile(4096 * 8, 63) == 184
  for assignments in (512 * 8, 4096 * 8, 32768 * 8, 10**6):
    tile = default_dropless_tile(assignments, 63)
    mean = assignments / 63
    assert tile % 8 == 0 and tile <= TILE_CAP
    pieces = -(-(mean + mean**0.5) // tile)  # tiles for a load one deviation over the mean
    assert pieces * tile - (mean + mean**0.5) < 8 * pieces  # padding under 8 rows a tile
  # span: that many balanced loads a tile (the CPU's whole tile, with last tiles every 8 rows).
  assert default_dropless_tile(512 * 8, 63, span=3) == 224  # 3 x 73.1 = 219.4
  assert default_dropless_tile(512 * 4, 63, span=3) == 120  # 3 x 38.2 = 114.6
  assert default_dropless_tile(4096 * 8, 63, span=3) == 240  # 3 x 542.8 over 7 tiles of <= 256


def test_tile_sizes_step_by_multiples_of_eight_up_to_the_whole_tile():
  assert tuning.tile_sizes(80, 5) == (16, 32, 48, 64, 80)  # MoE(K=8) at 512 tokens: pad <= 15
  assert tuning.tile_sizes(40, 5) == (8, 16, 24, 32, 40)  # CoE(C=2,K=4) there
  assert tuning.tile_sizes(184, 5) == (40, 80, 112, 152, 184)
  assert tuning.tile_sizes(80, 1) == (80,)  # whole tiles only (the GPU default)
  assert tuning.tile_sizes(16, 5) == (8, 16) and tuning.tile_sizes(12, 5) == (12,)
  assert tuning.tile_sizes(4, 5) == (4,)
  assert tuning.fine_tile_sizes(120) == tuple(range(8, 121, 8))
  assert tuning.fine_tile_sizes(16) == (8, 16) and tuning.fine_tile_sizes(20) == (8, 16, 20)
  assert tuning.fine_tile_sizes(4) == (4,)
  assert len(tuning.fine_tile_sizes(1024)) == tuning.MAX_TILE_SIZES  # then steps of 32
  rows, tiles = blocked_bounds(512 * 8, 63, tuning.tile_sizes(80, 5))
  assert rows == 512 * 8 + 63 * 15  # against 512 * 8 + 63 * 79 with whole tiles only
  assert tiles == (63, 63, 63, 63, min(4096 // 65, (4096 + 63 * 79) // 80))


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_default_tiling_gives_large_experts_on_cpu_fine_last_tiles_under_a_wide_whole_tile(
  backend,
):
  paper = 3 * 1024 * 704 * 4  # one paper-width expert's weights, float32 (8.6 MB)
  tiny = 3 * 128 * 96 * 4  # the tiny configs' (147 KB)
  paper_tiling = functools.partial(tuning.default_tiling, 512 * 4, 63, paper, platform=backend)
  tiny_tiling = functools.partial(tuning.default_tiling, 512 * 4, 63, tiny, platform=backend)
  if backend == "cpu":
    # Every 8 rows up to three balanced loads (PERF.md 22) where weight copies cost ...
    assert paper_tiling() == tuple(range(8, 121, 8))
    assert paper_tiling(tile=64) == tuple(range(8, 65, 8))
    assert (
      tuning.default_tiling(512 * 8, 63, paper, platform="cpu")[-1] == 224
    )  # MoE(K=8): 28 sizes
    # ... and five sizes up to one balanced load where they do not (PERF.md 21).
    assert tiny_tiling() == (8, 16, 24, 32, 40)
  else:  # whole tiles of one balanced load (unmeasured there)
    assert paper_tiling() == tiny_tiling() == (40,)
    assert paper_tiling(tile=64) == (64,)
  # An explicit count means the same on every backend: that many sizes up to one balanced load.
  assert paper_tiling(count=5) == tiny_tiling(count=5) == (8, 16, 24, 32, 40)
  assert paper_tiling(tile=80, count=1) == (80,)
