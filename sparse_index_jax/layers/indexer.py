"""The DSA lightning indexer (DeepSeek-V3.2, GLM-5) as a Flax NNX module."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_index_jax.layers.config import IndexerConfig, RopeConfig
from sparse_index_jax.layers.quantization import hadamard_rotate, quantize_fp8
from sparse_index_jax.layers.rope import apply_rope, rotary_cos_sin


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IndexerActivations:
    """What the indexer hands to ``select_topk``.

    q [B,T,H,d], k [B,S,d] (bf16/f32, or float8_e4m3fn on the fp8 path), w [B,T,H] float32 head
    weights with ``H^-0.5 * d^-0.5`` (and the fp8 q scale) folded in, k_scale [B,S] float32 or None.
    """

    q: jax.Array
    k: jax.Array
    w: jax.Array
    k_scale: jax.Array | None = None


class LightningIndexer(nnx.Module):
    """Scores every prefix token for every query with a few cheap ReLU heads.

    ``q = wq_b(qr)`` per head, ``k = LayerNorm(wk(x))`` shared by all heads (fp32, with bias),
    ``w = weights_proj(x)`` in fp32. RoPE rotates the FIRST ``rope_dim`` dims of q and k
    (``[rope | nope]``, the opposite of MLA) with the MLA frequencies, paired ``half`` (V3.2) or
    ``interleaved`` (GLM-5). Optional Hadamard rotation and fp8 quantisation follow the official
    inference code; both are off by default.
    """

    def __init__(self, cfg: IndexerConfig, rope: RopeConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg, self.rope, self.dtype = cfg, rope, dtype
        h, d = cfg.n_heads, cfg.head_dim
        self.wq_b = nnx.Linear(cfg.q_input_dim, h * d, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
        self.wk = nnx.Linear(cfg.hidden_size, d, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.k_norm = nnx.LayerNorm(d, epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=jnp.float32,
                                    use_fast_variance=False, rngs=rngs)
        # fp32 on purpose: bf16 head weights created score ties in the official release.
        self.weights_proj = nnx.Linear(cfg.hidden_size, h, use_bias=False, dtype=jnp.float32,
                                       param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array, qr: jax.Array, positions: jax.Array) -> IndexerActivations:
        """x [B,T,hidden], qr [B,T,q_input_dim], positions [B,T] int -> activations of these T tokens."""
        cfg = self.cfg
        B, T, _ = x.shape
        if x.shape[-1] != cfg.hidden_size or qr.shape[:2] != (B, T) or qr.shape[-1] != cfg.q_input_dim:
            raise ValueError(f"LightningIndexer: expected x [B,T,{cfg.hidden_size}] and qr [B,T,{cfg.q_input_dim}], "
                             f"got {x.shape} and {qr.shape}")
        if positions.shape != (B, T):
            raise ValueError(f"LightningIndexer: positions must have shape [B, T] = {(B, T)}, got {positions.shape}")
        q = self.wq_b(qr).reshape(B, T, cfg.n_heads, cfg.head_dim)
        k = self.k_norm(self.wk(x).astype(jnp.float32))
        cos, sin = rotary_cos_sin(self.rope, positions, cfg.rope_dim)
        r = cfg.rope_dim
        q = jnp.concatenate([apply_rope(q[..., :r], cos[:, :, None], sin[:, :, None], cfg.rope_layout), q[..., r:]], -1)
        k = jnp.concatenate([apply_rope(k[..., :r], cos, sin, cfg.rope_layout), k[..., r:]], -1)
        w = self.weights_proj(x.astype(jnp.float32)) * (cfg.n_heads ** -0.5 * cfg.head_dim ** -0.5)
        if cfg.use_hadamard:
            q, k = hadamard_rotate(q), hadamard_rotate(k)
        if cfg.fp8:
            q, q_scale = quantize_fp8(q, cfg.fp8_scale_fmt)
            k, k_scale = quantize_fp8(k, cfg.fp8_scale_fmt)
            return IndexerActivations(q, k, w * q_scale, k_scale)
        return IndexerActivations(q.astype(self.dtype), k.astype(self.dtype), w)
