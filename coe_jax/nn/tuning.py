"""Per-target policies of the dropless kernels: which implementation, which tiles.

Every choice here follows the platform of the devices the program is compiled
for (`target_platform`), never the process's default backend: a deviceless
compile for a GPU traced on a CPU host, an AOT flow, or a host whose default
backend is not the mesh's get the program those devices run. Where it comes
from, first match: the explicit `model.target_platform` field; the devices of
the mesh set with `jax.set_mesh` (its abstract mesh keeps their platform, also
inside `shard_map`); the default device (a single-device program runs there).
"""

from __future__ import annotations

import math
from typing import Any

import jax

TILE_CAP = 256  # most rows in one default tile; an expert's larger load is split into equal tiles
LAST_TILE_SIZES = 5  # CPU: tile sizes for small experts (`default_tiling`, PERF.md 21)
FINE_TILING_MIN_BYTES = 1 << 20  # CPU: experts this large get `fine_tile_sizes` (PERF.md 22)
WHOLE_TILE_SPAN = 3  # ... and a whole tile of this many balanced loads (`default_dropless_tile`)
MAX_TILE_SIZES = 32  # most sizes of `fine_tile_sizes`, one loop each
# 'grouped' on GPU: rows per tile (each tile one expert's), and the Triton blocks of the output
# and reduction dims (powers of two; a dim takes the largest that divides it). Unmeasured: the
# MegaBlocks / tokamax defaults for bf16 on Hopper; gpu_bench.sh DROPLESS_TILE sweeps the rows.
GROUPED_TILE_ROWS = 128
GROUPED_BLOCK_N = 128
GROUPED_BLOCK_K = 64


def normalize_platform(platform: str) -> str:
  """'cuda' / 'rocm' (a topology's or plugin's name) -> 'gpu'; others unchanged."""
  platform = platform.lower()
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def target_platform(explicit: str = "") -> str:
  """'cpu' | 'gpu' | 'tpu': the platform the traced program is compiled for (module docstring)."""
  if explicit:
    return normalize_platform(explicit)
  device = jax.sharding.get_abstract_mesh().abstract_device
  if device is not None:
    return normalize_platform(device.platform)
  return normalize_platform(jax.devices()[0].platform)


def resolve_dropless_impl(impl: str, platform: str = "") -> str:
  """'auto' -> 'grouped' on GPU (a Pallas grouped matmul: no data-dependent loops, no weight
  copies), 'blocked' elsewhere (the fastest dropless path on CPU); experiments/PERF.md 24,
  11-22."""
  if impl != "auto":
    return impl
  return "grouped" if target_platform(platform) == "gpu" else "blocked"


def default_dropless_tile(num_assignments: int, num_experts: int, span: int = 1) -> int:
  """Rows per whole tile of 'blocked' when `dropless_tile` is 0: `span` balanced loads' worth.

  Sized for balanced routing (what the load-balancing loss trains towards; an
  expert's load is then about mean +- sqrt(mean)): with span 1, one tile holds
  a load up to one standard deviation above the mean, so ~84% of the experts
  run a single tile (one read of their weights) and the rest two. Above
  `TILE_CAP` rows that target is split into equal tiles (mean load 520 -> 3
  tiles of 184 rows). A multiple of 8, at least 8 (against the older
  power-of-two tile: experiments/PERF.md 20). With last tiles every 8 rows
  (`default_tiling` on CPU) a larger whole tile pads nothing more and runs the
  heavy experts of skewed routing in fewer tiles: span `WHOLE_TILE_SPAN` there
  (experiments/PERF.md 22).
  """
  mean = num_assignments / max(num_experts, 1)
  target = span * (mean + math.sqrt(mean))
  pieces = max(1, math.ceil(target / TILE_CAP))
  return int(max(8, 8 * math.ceil(target / pieces / 8)))


def expert_weight_bytes(weights: Any) -> int:
  """Bytes of one expert's matrices in stacked [E, ...] weights: what each tile of 'blocked'
  copies, and what its tiling and tiles per step are sized by."""
  return sum(w.size // w.shape[0] * w.dtype.itemsize for w in jax.tree.leaves(weights))


def blocked_tiles_per_step(weights: Any, tile: int, platform: str = "") -> int:
  """Tiles per loop iteration of 'blocked': one on CPU, a weight-gather budget elsewhere.

  CPU: one tile per iteration, the expert's weights read by dynamic slice (no gather copy;
  experiments/PERF.md 11).
  GPU/TPU (unmeasured, a prediction): a sequential loop of small matmuls
  would be launch-bound, so each iteration gathers the weights of as many
  tiles as fit in ~1 GiB (3 [d, f] matrices per tile, plus as much again for
  their weight gradients in the backward pass) and runs one batched matmul.
  """
  del tile
  if target_platform(platform) == "cpu":
    return 1
  return max(1, (1 << 30) // (2 * expert_weight_bytes(weights)))


def default_tiling(
  num_assignments: int,
  num_experts: int,
  expert_bytes: int,
  tile: int = 0,
  count: int = 0,
  platform: str = "",
) -> tuple[int, ...]:
  """The tile sizes 'blocked' runs for `dropless_tile` = tile and `dropless_tile_sizes` = count.

  Each expert's rows run as whole tiles of the largest size plus one last tile
  of the smallest size that holds the rest (`blocked_layout`); `expert_bytes` is
  the size of one expert's three weight matrices. A count > 0 asks for that many
  sizes evenly spaced up to the whole tile (`tile_sizes`; 1 = whole tiles only);
  tile 0 is `default_dropless_tile`. count 0, the target platform's default
  (`target_platform(platform)`):
  - CPU, experts of >= `FINE_TILING_MIN_BYTES`: last tiles every 8 rows
    (`fine_tile_sizes`), so an expert pads at most 7 rows, and when tile is 0 a
    whole tile of `WHOLE_TILE_SPAN` balanced loads (paper width, 512 tokens:
    K=8 224 rows in 28 sizes, K=4 120 rows in 15). Every tile copies its
    expert's weights, so heavy experts should run few, large tiles
    (experiments/PERF.md 22).
  - CPU, smaller experts: `LAST_TILE_SIZES` sizes up to one balanced load. Their
    copies cost little, and each size is one more loop to compile: more sizes
    add compile time, not speed (experiments/PERF.md 21).
  - elsewhere (unmeasured): one size, `default_dropless_tile`: a GPU runs many
    tiles per step, and pads little at its larger loads.
  """
  on_cpu = target_platform(platform) == "cpu"
  fine = on_cpu and not count and expert_bytes >= FINE_TILING_MIN_BYTES
  tile = tile or default_dropless_tile(num_assignments, num_experts, WHOLE_TILE_SPAN if fine else 1)
  if fine:
    return fine_tile_sizes(tile)
  return tile_sizes(tile, count or (LAST_TILE_SIZES if on_cpu else 1))


def fine_tile_sizes(tile: int) -> tuple[int, ...]:
  """Multiples of 8 below `tile`, and `tile` (at most `MAX_TILE_SIZES`: wider steps beyond)."""
  step = 8 * math.ceil(tile / 8 / MAX_TILE_SIZES)
  return (*range(step, tile, step), tile)


def tile_sizes(tile: int, count: int) -> tuple[int, ...]:
  """Up to `count` sizes evenly spaced up to `tile`, multiples of 8 below it (fewer if small)."""
  count = max(1, min(count, tile // 8))
  return tuple(
    sorted({min(tile, 8 * math.ceil(tile * i / count / 8)) for i in range(1, count + 1)})
  )


def grouped_tile_rows(num_assignments: int, num_experts: int, tile: int = 0) -> int:
  """Rows per tile of 'grouped' (`dropless_tile`, 0 = `GROUPED_TILE_ROWS`): a power of two
  >= 16 (Triton's dot needs it), no larger than one balanced load rounded up."""
  rows = tile or GROUPED_TILE_ROWS
  mean = max(1, num_assignments // max(num_experts, 1))
  rows = min(rows, 1 << max(4, math.ceil(math.log2(mean))))
  return max(16, 1 << (max(1, rows).bit_length() - 1))


def block_for(dim: int, target: int) -> int:
  """The largest power of two <= `target` that divides `dim` (a Triton block of that dim)."""
  block = 1 << (max(1, target).bit_length() - 1)
  while block > 1 and dim % block:
    block //= 2
  return block
