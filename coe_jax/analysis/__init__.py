"""Routing analysis of trained (Chain-of-)Experts models.

    from coe_jax import analysis
    run = analysis.load_run("runs/coe_c2_tiny")   # or your own model and variables
    routing = analysis.collect_routing(run.model, run.variables,
                                       analysis.validation_batch(run, 32))
    stats = analysis.analyze(routing)
    analysis.iteration_table(stats)               # pandas: one row per layer and iteration
    analysis.plot_co_selection(stats.co_selection, layer=0)  # a matplotlib Figure

`routing` gathers what the CoE layers sow, `statistics` turns it into arrays
and tables, `plots` into figures; `load_run` (from `coe_jax.inference.run_dir`) opens a run directory.
"""

from coe_jax.analysis.loading import encode_texts, validation_batch
from coe_jax.analysis.plots import (
  plot_co_selection,
  plot_dropped,
  plot_iteration_summary,
  plot_load,
)
from coe_jax.analysis.routing import (
  Routing,
  collect_routing,
  concatenate_routing,
  routing_from_intermediates,
)
from coe_jax.analysis.statistics import (
  Combinations,
  ConfidenceStats,
  CoSelection,
  Drops,
  LoadStats,
  Reselection,
  RoutingStats,
  analyze,
  chance_reselection_rate,
  co_selection,
  dropped,
  expert_combinations,
  expert_load,
  expert_table,
  iteration_table,
  layer_table,
  possible_combinations,
  reselection,
  router_confidence,
)
from coe_jax.inference.run_dir import Run, load_run

__all__ = [
  "Combinations",
  "ConfidenceStats",
  "CoSelection",
  "Drops",
  "LoadStats",
  "Reselection",
  "Routing",
  "RoutingStats",
  "Run",
  "analyze",
  "chance_reselection_rate",
  "co_selection",
  "collect_routing",
  "concatenate_routing",
  "dropped",
  "encode_texts",
  "expert_combinations",
  "expert_load",
  "expert_table",
  "iteration_table",
  "layer_table",
  "load_run",
  "plot_co_selection",
  "plot_dropped",
  "plot_iteration_summary",
  "plot_load",
  "possible_combinations",
  "reselection",
  "router_confidence",
  "routing_from_intermediates",
  "validation_batch",
]
