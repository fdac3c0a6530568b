"""The model: the Chain-of-Experts layer and the DeepSeek-V2-style LM around it (DESIGN.md 2-5).

`coe_config` / `coe_layer` (the layer: routers, experts, the chain) with `router`,
`experts`, `dispatch` (capacity, gather, ragged_dot), `blocked` (block-sparse dropless),
`token_rows` (the row moves they share) and `expert_parallel`; `model_config` / `model`
(the LM, whose config holds the layer's as `.coe`) with `attention` (MLA + YaRN) and `layers`;
`field_kinds` (function vs execution fields); `params` and `flops` count it.
"""
