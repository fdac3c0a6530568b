"""Independent float64 numpy versions of the model's math, shared by the model tests.

Written from DESIGN.md 2-5 and the DeepSeek-V2 / CoE reference formulas, not
from `coe_jax`: nothing here imports the library. Weight matrices are in
[in, out] layout ("x @ w"); `flax_weights` / `hf_weights` build that neutral
per-layer dict from Flax params or from a torch-layout state dict. They, `f64`,
`hf_hparams`, `flat_hparams` and `random_params` are defined in `numpy_weights`
and re-exported here, so `ref.<name>` reaches every piece.

`hp` arguments are any object with the flat `config.model` attribute names (a
`types.SimpleNamespace` built from the authors' config.json, `hf_hparams`); an
object with a `to_dict()` of those names (a `ModelConfig`) is read through it.
`coe_block` reads only the CoE layer's names, so a `CoEConfig` does too.
"""

from __future__ import annotations

import math

import jax
import numpy as np

# The weight and hyper-parameter adapters live in numpy_weights; re-exported for `ref.<name>`.
from numpy_weights import (  # noqa: F401
  f64,
  flat_hparams,
  flax_ffn_weights,
  flax_layer_weights,
  flax_weights,
  hf_hparams,
  hf_weights,
  random_params,
)

# XLA options that cut CPU compile time 2-3x on these tiny graphs; numerics are
# still IEEE float32, so every tolerance below holds. Test-only.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn, **kwargs):
  """`jax.jit` with the fast-compile options above."""
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


# ----------------------------------------------------------------------------
# Elementary pieces.
# ----------------------------------------------------------------------------


def softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def silu(x):
  return x / (1.0 + np.exp(-x))


def rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def swiglu(x, gate, up, down):
  """down(silu(gate(x)) * up(x)); gate/up [d, f], down [f, d]."""
  return (silu(x @ gate) * (x @ up)) @ down


def cross_entropy(logits, labels, weights=None):
  """Mean token cross-entropy (optionally weighted) of [b, s, V] logits."""
  logits = f64(logits)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
  if weights is None:
    return nll.mean()
  return (nll * weights).sum() / weights.sum()


# ----------------------------------------------------------------------------
# Router (DESIGN.md 3).
# ----------------------------------------------------------------------------


def route(u, weight, k, norm_topk_prob=False, routed_scaling_factor=1.0):
  """Greedy top-K of softmax(u @ W^T). Returns (ids [..., K], weights [..., K], probs [..., N])."""
  probs = softmax(f64(u) @ f64(weight).T)
  ids = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
  w = np.take_along_axis(probs, ids, axis=-1)
  if norm_topk_prob and k > 1:  # the reference's two options are exclusive
    return ids, w / (w.sum(-1, keepdims=True) + 1e-20), probs
  return ids, w * routed_scaling_factor, probs


def seq_aux_loss(probs, ids, alpha):
  """alpha * mean_b sum_e ce[b, e] * mean_s probs[b, s, e], ce = counts / (S * K / N)."""
  b, s, k = ids.shape
  n = probs.shape[-1]
  total = 0.0
  for bi in range(b):
    counts = np.zeros(n)
    for si in range(s):
      for ki in range(k):
        counts[ids[bi, si, ki]] += 1
    ce = counts / (s * k / n)
    total += np.sum(ce * probs[bi].mean(axis=0))
  return alpha * total / b


def capacity(num_tokens, k, num_experts, capacity_factor, min_capacity):
  return min(
    max(math.ceil(capacity_factor * num_tokens * k / num_experts), min_capacity), num_tokens
  )


def keep_mask(ids, num_experts, cap, token_mask=None):
  """Slot-major priority: all first choices (in token order), then all second choices...

  ids: [T, K]. An assignment is kept iff fewer than `cap` earlier assignments
  (in that order) chose the same expert. Tokens with token_mask False (padding)
  are never kept and take no capacity.
  """
  t_count, k = ids.shape
  kept = np.zeros((t_count, k), bool)
  fill = np.zeros(num_experts, int)
  for ki in range(k):
    for ti in range(t_count):
      if token_mask is not None and not token_mask[ti]:
        continue
      e = ids[ti, ki]
      if fill[e] < cap:
        kept[ti, ki] = True
      fill[e] += 1
  return kept


def routed_output(u, ids, w, gate, up, down, kept=None):
  """sum over kept (token, slot) of w * expert_id(u[token]); u [T, d], experts stacked [N, ...]."""
  out = np.zeros_like(u)
  for ti in range(u.shape[0]):
    for ki in range(ids.shape[1]):
      if kept is not None and not kept[ti, ki]:
        continue
      e = ids[ti, ki]
      out[ti] += w[ti, ki] * swiglu(u[ti], gate[e], up[e], down[e])
  return out


# ----------------------------------------------------------------------------
# The CoE feed-forward block (DESIGN.md 2).
# ----------------------------------------------------------------------------


def coe_block(h, p, hp, cap=None, token_mask=None):
  """out, info for one CoE layer on h [b, s, d].

  p: 'ffn_norm' [d], 'router' [R, N, d] (R = C or 1), 'gate'/'up' [N, d, f],
  'down' [N, f, d], 'shared' None or (gate [d, fs], up [d, fs], down [fs, d]).
  cap: per-expert capacity over the b*s tokens of the call, None = dropless.
  token_mask: None, or [b, s] with 0 for padding: padding takes no capacity and
  gets no routed output (shared experts still run; the aux loss sees every position).
  info: per iteration lists of ids/weights/kept/probs [b, s, ...] and aux losses.
  """
  b, s, d = h.shape
  k, n = hp.num_experts_per_tok, hp.n_routed_experts
  u = rms_norm(f64(h), f64(p["ffn_norm"]), hp.rms_norm_eps)  # once, before the chain
  router = f64(p["router"])
  info = {name: [] for name in ("ids", "weights", "kept", "probs", "aux", "m")}
  m_sum = np.zeros_like(u)
  for t in range(hp.num_iterations):
    weight = router[t] if hp.independent_gates else router[0]
    ids, w, probs = route(u, weight, k, hp.norm_topk_prob, hp.routed_scaling_factor)
    flat_ids, flat_w = ids.reshape(b * s, k), w.reshape(b * s, k)
    real = None if token_mask is None else np.asarray(token_mask).reshape(-1).astype(bool)
    kept = keep_mask(flat_ids, n, b * s if cap is None else cap, real)
    m = routed_output(
      u.reshape(b * s, d), flat_ids, flat_w, f64(p["gate"]), f64(p["up"]), f64(p["down"]), kept
    ).reshape(b, s, d)
    if p.get("shared") is not None:
      m = m + swiglu(u, *map(f64, p["shared"]))
    info["ids"].append(ids)
    info["weights"].append(w)
    info["kept"].append(kept.reshape(b, s, k))
    info["probs"].append(probs)
    info["aux"].append(seq_aux_loss(probs, ids, hp.aux_loss_alpha))
    info["m"].append(m)
    m_sum = m_sum + m
    u = (u + m) if hp.inner_residual else m
  if hp.residual_style == "textbook":
    out = f64(h) + m_sum
  elif hp.outer_residual:
    out = f64(h) + u
  else:
    out = u
  return out, info


# ----------------------------------------------------------------------------
# DeepSeek-V2 MLA with YaRN (DESIGN.md 5).
# ----------------------------------------------------------------------------


def _yarn_mscale(scale, m):
  return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0


def inv_freq(hp):
  dim, base = hp.qk_rope_head_dim, hp.rope_theta
  extra = 1.0 / base ** (np.arange(0, dim, 2) / dim)
  if hp.rope_scaling != "yarn":
    return extra
  inter = extra / hp.rope_factor
  orig = hp.rope_original_max_position

  def corr(rot):
    return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(corr(hp.rope_beta_fast)), 0)
  high = min(math.ceil(corr(hp.rope_beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  return inter * ramp + extra * (1 - ramp)


def rope(x, positions, hp):
  """x [b, s, h, d]: DeepSeek de-interleave, then x*cos + rotate_half(x)*sin."""
  b, s, h, d = x.shape
  x = x.reshape(b, s, h, d // 2, 2).swapaxes(-1, -2).reshape(b, s, h, d)
  freqs = f64(positions)[..., None] * inv_freq(hp)
  emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
  scale = 1.0
  if hp.rope_scaling == "yarn":
    scale = _yarn_mscale(hp.rope_factor, hp.rope_mscale) / _yarn_mscale(
      hp.rope_factor, hp.rope_mscale_all_dim
    )
  rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
  return (x * np.cos(emb) + rot * np.sin(emb)) * scale


def attention_mask(batch, seq, attn_mask=None, segment_ids=None):
  """[b, s, s] bool: causal, key is real, same segment."""
  mask = np.broadcast_to(np.tril(np.ones((seq, seq), bool)), (batch, seq, seq)).copy()
  if attn_mask is not None:
    mask &= np.asarray(attn_mask).astype(bool)[:, None, :]
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    mask &= seg[:, :, None] == seg[:, None, :]
  return mask


def mla(x, positions, mask, p, hp):
  """Multi-head latent attention, q_lora_rank=None. p: q, kv_a, kv_norm, kv_b, o ([in, out])."""
  b, s, _ = x.shape
  H, nope, rdim, vd, r = (
    hp.num_heads,
    hp.qk_nope_head_dim,
    hp.qk_rope_head_dim,
    hp.v_head_dim,
    hp.kv_lora_rank,
  )
  q = (x @ f64(p["q"])).reshape(b, s, H, nope + rdim)
  ckv = x @ f64(p["kv_a"])
  c = rms_norm(ckv[..., :r], f64(p["kv_norm"]), hp.rms_norm_eps)
  kv = (c @ f64(p["kv_b"])).reshape(b, s, H, nope + vd)
  q_pe = rope(q[..., nope:], positions, hp)
  k_pe = rope(ckv[..., None, r:], positions, hp)
  query = np.concatenate([q[..., :nope], q_pe], -1)
  key = np.concatenate([kv[..., :nope], np.broadcast_to(k_pe, (b, s, H, rdim))], -1)
  scale = (nope + rdim) ** -0.5
  if hp.rope_scaling == "yarn":
    scale *= _yarn_mscale(hp.rope_factor, hp.rope_mscale_all_dim) ** 2
  scores = np.einsum("bqhd,bkhd->bhqk", query, key) * scale
  # A large finite fill: rows with no allowed key become uniform, as in the library.
  scores = np.where(mask[:, None], scores, -1e300)
  out = np.einsum("bhqk,bkhd->bqhd", softmax(scores), kv[..., nope:])
  return out.reshape(b, s, H * vd) @ f64(p["o"])


# ----------------------------------------------------------------------------
# The whole LM.
# ----------------------------------------------------------------------------


def lm_forward(
  weights, hp, input_ids, attn_mask=None, positions=None, segment_ids=None, capacity_factor=None
):
  """logits [b, s, V], total aux loss, per-layer infos.

  weights: 'embed' [V, d], 'layers' list of per-layer dicts (attention keys of
  `mla` + 'input_norm' + the `coe_block` keys), 'norm' [d], 'head' [d, V].
  capacity_factor: None = dropless, else the capacity path's factor.
  hp.pad_semantics 'reference': a pad's (attn_mask 0) attention output is zero and the CoE
  block takes no mask (pads are routed, take capacity); 'masked': pads take no capacity.
  """
  hp = flat_hparams(hp)
  b, s = input_ids.shape
  if positions is None:
    positions = np.broadcast_to(np.arange(s), (b, s))
  mask = attention_mask(b, s, attn_mask, segment_ids)
  cap = None
  if capacity_factor is not None:
    cap = capacity(
      b * s, hp.num_experts_per_tok, hp.n_routed_experts, capacity_factor, hp.min_capacity
    )
  x = f64(weights["embed"])[np.asarray(input_ids)]
  infos, aux = [], 0.0
  reference_pads = attn_mask is not None and hp.pad_semantics == "reference"
  for p in weights["layers"]:
    attn = mla(rms_norm(x, f64(p["input_norm"]), hp.rms_norm_eps), positions, mask, p, hp)
    if reference_pads:
      attn = attn * np.asarray(attn_mask)[..., None]
    x, info = coe_block(x + attn, p, hp, cap, None if reference_pads else attn_mask)
    infos.append(info)
    aux += sum(info["aux"])
  x = rms_norm(x, f64(weights["norm"]), hp.rms_norm_eps)
  return x @ f64(weights["head"]), aux, infos
