"""Sparse MLA on GPU: Pallas kernels with the Triton lowering, forward and backward (``triton``).

Same contract as ``reference.py`` (the oracle): q [B,T,Hq,Dk], kv [B,S,Dk], indices/valid [B,T,k];
out [B,T,Hq,v_dim] in q's dtype; a query with no valid slot gives zeros.

Work: the forward costs 2*Hq*k*(Dk + v_dim) FLOPs per query (logits over the Dk-wide rows, values
over their first v_dim columns): 0.57 GFLOP per query for DeepSeek (Hq=128, k=2048, 576/512). The
backward recomputes the logits and does four more products (dp, dq, the key and the value gradient):
2*Hq*k*(3*Dk + 2*v_dim) per query. Both read k*Dk cache bytes per query and head block.

Forward design (FlashMLA's shape, in Triton): one program per (head block, query, batch) -- the head
block varies fastest in launch order, so the programs sharing one query's rows run together and the
second gather hits L2. Heads are the matmul M dimension (``block_h`` = 64: acc [64, 512] float32 is
128 KB of registers over 8 warps, and M = 64 is one wgmma tile per warpgroup). The program loops over
the k selected slots in blocks of ``block_k``: it gathers the rows with an int index vector (padding
slots read row 0 and are masked to -inf), takes logits = q @ rows^T in float32 on tensor cores (two
bf16 dots, the 512-wide and the 64-wide piece, both with every dimension >= 16), and runs an online
softmax (running max m and sum l per head) with acc += p @ rows[:, :v_dim], p cast to the compute
dtype (bf16) first so the value product is a tensor-core dot too. It writes out = acc / l and the
logsumexp m + log(l) per (query, head) for the backward. float32 inputs use precision HIGHEST on
every dot, which the Triton lowering turns into IEEE products (DEFAULT/HIGH would be TF32).

Shared memory (Triton: num_stages copies of each tile loaded in the pipelined loop, plus dot operands
staged from registers and layout-conversion scratch; sm_90 limit ``SMEM_LIMIT``, 232,448 bytes per
block), for a padded row width W = 576 in bf16 (``smem_estimate``; heads/rows/stages below). Forward
~ q [block_h, W] + num_stages * rows [block_k, W] + p and logits scratch [block_h, block_k] (2 + 4
bytes): 64/32/3 196,608; 64/32/2 159,744; 64/64/2 would be 245,760 -- too much, so the 64-row tile
runs unpipelined (64/64/1: 172,032, the default: the fastest of ``candidate_block_sizes()`` in the
sweep recorded in docs/kernels.md). Fewer, larger row tiles halve the online-softmax rescales of acc
and double the logits product's N, at the cost of pipelining the gathers.

Triton wants power-of-2 shapes, so a row is handled as two column pieces loaded and multiplied
separately: the value part [0, v_dim) (512 for DeepSeek) and the rest [v_dim, Dk) (the 64-wide rope
key), each a power of 2 of at least 16. Other widths are zero-padded up to that in the wrapper (a copy
of the cache: only for shapes that are not DeepSeek/GLM-like). Heads are padded to a multiple of
``block_h`` (zero queries) and k to a multiple of ``block_k`` (padding slots).

Backward: ``jax.custom_vjp``. delta = sum(dout * out) per head in XLA; one kernel per (head block,
query, batch) recomputes p = exp(s - lse), dp = dout @ v^T, ds = p * (dp - delta) and accumulates
dq = scale * ds @ rows over the k blocks. The same kernel also writes each slot's row gradient
(p^T @ dout on the value columns plus scale * ds^T @ q) to a [B, Tc, head blocks, k, Dk] float32
buffer, and XLA sums the head blocks and scatter-adds the slots into a float32 dkv [B,S,Dk]. Why not
atomic adds into dkv from the kernel: a row is picked by many queries, so float atomics would make
the gradient depend on scheduling (run-to-run different), and Pallas' interpret mode cannot check
masked atomics; the slot buffer is deterministic (up to XLA's own scatter, which on GPU is
deterministic with ``--xla_gpu_deterministic_ops``) and costs ``query_chunk`` * head blocks * k * Dk
* 4 bytes per batch row (64 queries, 128 heads in 4 head blocks: 1.2 GB), so the backward runs in
query chunks.

Backward shared memory: q and dout are loop-invariant operands used on both sides of products (A of
q @ rows^T and dout @ rows^T, B of ds^T @ q and p^T @ dout), so Triton may stage each twice, and the
rows twice (B transposed for the logits, B plain for dq). Worst case ~ 2 * (q + dout) [block_h, W and
v] + num_stages * 2 * rows [block_k, W] + slot-gradient store scratch [block_k, W] float32 + p^T, ds^T:
507,904 bytes for 64 heads / 32 rows / 2 stages, 215,040 for the default 32 heads / 16 rows / 1 stage,
which fits the limit even in the worst case. Every term scales with block_h, block_k or both.
docs/kernels.md compares the formula with what Triton requested.

``return_probs``: the head-mean probabilities [B,T,k] come from a light second kernel that recomputes
the logits with the saved logsumexp (the logits product again, no value product). They are a
distillation target and carry no gradient (callers stop it anyway).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparse_index_jax.kernels.chunking import chunk_axis, next_pow2, pad_axis, round_up
from sparse_index_jax.kernels.dispatch import triton_interpret, triton_params
from sparse_index_jax.kernels.triton_block_sizes import check_tiles

__all__ = ["MlaTritonBlockSizes", "candidate_block_sizes", "smem_estimate", "sparse_mla_triton"]

_MIN_DOT = 16  # tensor-core products need every dimension >= 16
SMEM_LIMIT = 232_448  # sm_90 (H100) shared memory per block, bytes
_NEG = -1e30  # start of the running max: finite, so an all-padding block gives exp(-inf) = 0, not NaN


@dataclasses.dataclass(frozen=True)
class MlaTritonBlockSizes:
    """Tile sizes and Triton launch parameters; every block size a power of 2, at least 16.

    ``block_h`` heads per program (the M of the products; fewer heads use the next power of 2),
    ``block_k`` selected rows per loop step. ``bwd_*`` are the same for the backward kernel, which
    holds dq [block_h, Dk] in float32 besides q and dout and uses q, dout and the rows on both sides of
    products, so it takes fewer heads, fewer rows and no pipelining (shared memory: module docstring and
    ``smem_estimate``; the backward configuration that did not fit is in docs/kernels.md).
    """

    # Defaults: the fastest of ``candidate_block_sizes()`` for DeepSeek's shape (Hq = 128, 576/512,
    # k = 2048) in the sweep recorded in docs/kernels.md.
    block_h: int = 64
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 1
    bwd_block_h: int = 32
    bwd_block_k: int = 16
    bwd_num_warps: int = 4
    bwd_num_stages: int = 1

    def __post_init__(self):
        check_tiles(self, ("block_h", "block_k", "bwd_block_h", "bwd_block_k"))


def smem_estimate(bs: MlaTritonBlockSizes, *, width: int = 576, v_dim: int = 512, itemsize: int = 2) -> tuple[int, int]:
    """(forward, backward) shared-memory estimates in bytes for the padded row ``width`` (module docstring).

    Forward: q tile + num_stages gathered row tiles + p and logits scratch. Backward, worst case: q and
    dout staged twice (both sides of products), rows twice per stage, the float32 slot-gradient tile's
    store scratch, p^T and ds^T. docs/kernels.md compares the backward formula with what Triton requested.
    """
    fwd = (bs.block_h * width * itemsize + bs.num_stages * bs.block_k * width * itemsize
           + bs.block_h * bs.block_k * (itemsize + 4))
    hb, bk = bs.bwd_block_h, bs.bwd_block_k
    bwd = (2 * (hb * width + hb * v_dim) * itemsize + bs.bwd_num_stages * 2 * bk * width * itemsize
           + bk * width * 4 + 2 * hb * bk * itemsize)
    return fwd, bwd


def candidate_block_sizes() -> list[MlaTritonBlockSizes]:
    """Block sizes worth timing on an H100 for DeepSeek's shape (Hq=128, 576/512, k=2048, bf16), default first.

    Every one is estimated (``smem_estimate``) to fit the 232,448-byte shared-memory limit. Forward:
    64 heads (one wgmma M tile per warpgroup) with 8 warps, trading row-tile size against pipeline
    depth: 64 rows unpipelined (default: halves the online-softmax rescales of acc and doubles the
    logits product's N), 32 rows x 3 stages, 16 rows x 4 stages, and 32 rows x 2 stages.
    64 rows x 2 stages (~246 KB) does not fit. Backward: 32 heads / 16 rows / 1 stage with 8 or 4
    warps, and 16 heads / 32 rows (smaller invariant tiles, more head blocks).
    """
    return [
        MlaTritonBlockSizes(),
        MlaTritonBlockSizes(block_k=32, num_stages=3, bwd_num_warps=8),
        MlaTritonBlockSizes(block_k=16, num_stages=4, bwd_block_h=16, bwd_block_k=32, bwd_num_warps=4),
        MlaTritonBlockSizes(block_k=32, num_stages=2),
    ]


def _pow2(n: int) -> int:
    return max(_MIN_DOT, next_pow2(n))


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static shapes of one call, padded for Triton."""

    heads: int  # Hq
    v_dim: int
    rest: int  # Dk - v_dim
    v_pad: int  # value piece width (power of 2)
    r_pad: int  # rest piece width (power of 2, 0 when Dk == v_dim)
    k_pad: int  # slots, padded to a multiple of block_k and bwd_block_k
    scale: float
    compute_dtype: str
    blocks: MlaTritonBlockSizes
    interpret: bool  # part of the static key: a lowering for CUDA from a CPU host must not reuse interpreted traces

    @property
    def width(self) -> int:
        return self.v_pad + self.r_pad

    def head_block(self, block_h: int) -> int:
        return min(block_h, _pow2(self.heads))

    def heads_pad(self, block_h: int) -> int:
        hb = self.head_block(block_h)
        return round_up(self.heads, hb)

    @property
    def precision(self):  # float32 inputs: IEEE products, not TF32
        return jax.lax.Precision.HIGHEST if self.compute_dtype == "float32" else None

    @property
    def cdt(self):
        """The dtype q, rows and probabilities are cast to for the dots (q's)."""
        return jnp.dtype(self.compute_dtype)


def _pad_cols(x: jax.Array, g: _Geometry) -> jax.Array:
    """[..., Dk] -> [..., v_pad + r_pad]: each piece zero-padded at its end (a no-op for 512 + 64)."""
    if g.v_pad == g.v_dim and g.r_pad == g.rest:
        return x
    last = x.ndim - 1
    return jnp.concatenate([pad_axis(x[..., :g.v_dim], last, g.v_pad), pad_axis(x[..., g.v_dim:], last, g.r_pad)],
                           axis=-1)


def _fit_heads(x: jax.Array, n: int) -> jax.Array:
    """Axis 2 (heads) cut or zero-padded to ``n``; only padding heads are ever cut."""
    return pad_axis(x[:, :, :n], 2, n)


# --------------------------------------------------------------------------------------------------
# kernels (refs are whole arrays; program ids pick the (head block, query, batch) they work on)
# --------------------------------------------------------------------------------------------------

def _load_query(ref, b, t, heads, g: _Geometry):
    """Value piece and rest piece (None when Dk == v_dim) of a [B,T,H,width] ref, in compute dtype."""
    qv = ref[b, t, heads, pl.ds(0, g.v_pad)].astype(g.cdt)
    qr = ref[b, t, heads, pl.ds(g.v_pad, g.r_pad)].astype(g.cdt) if g.r_pad else None
    return qv, qr


def _gather_rows(kv_ref, idx_ref, b, t, j, bk, g: _Geometry):
    """Rows named by slots [j*bk, (j+1)*bk): (in-slot mask [bk], value piece [bk,v_pad], rest piece)."""
    idx = idx_ref[b, t, pl.ds(j * bk, bk)]
    ok = idx >= 0
    rows = jnp.maximum(idx, 0)  # padding reads row 0, masked below
    rv = kv_ref[b, rows, pl.ds(0, g.v_pad)].astype(g.cdt)
    rr = kv_ref[b, rows, pl.ds(g.v_pad, g.r_pad)].astype(g.cdt) if g.r_pad else None
    return ok, rv, rr


def _dot(a, b, g: _Geometry, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b (either side transposed) into float32: ``pl.dot``'s lowering, without its deprecated alias."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=g.precision, preferred_element_type=jnp.float32)


def _logits(qv, qr, rv, rr, g: _Geometry):
    """scale * q @ rows^T in float32, [heads, bk]."""
    s = _dot(qv, rv, g, trans_b=True)
    if qr is not None:
        s = s + _dot(qr, rr, g, trans_b=True)
    return s * g.scale


def _fwd_kernel(q_ref, kv_ref, idx_ref, o_ref, lse_ref, *, g: _Geometry, n_blocks: int):
    hb, bk = g.head_block(g.blocks.block_h), g.blocks.block_k
    h, t, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    heads = pl.ds(h * hb, hb)
    qv, qr = _load_query(q_ref, b, t, heads, g)

    def step(j, carry):
        m, l, acc = carry
        ok, rv, rr = _gather_rows(kv_ref, idx_ref, b, t, j, bk, g)
        s = jnp.where(ok[None, :], _logits(qv, qr, rv, rr, g), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(g.cdt), rv, g)
        return m_new, l, acc

    init = (jnp.full((hb,), _NEG, jnp.float32), jnp.zeros((hb,), jnp.float32),
            jnp.zeros((hb, g.v_pad), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_blocks, step, init)
    has = l > 0
    safe = jnp.where(has, l, 1.0)
    o_ref[b, t, heads, :] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[b, t, heads] = jnp.where(has, m + jnp.log(safe), 0.0)  # empty query: every p is masked anyway


def _probs_kernel(q_ref, kv_ref, idx_ref, lse_ref, p_ref, *, g: _Geometry, n_blocks: int):
    hb, bk = g.head_block(g.blocks.block_h), g.blocks.block_k
    h, t, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    heads = pl.ds(h * hb, hb)
    qv, qr = _load_query(q_ref, b, t, heads, g)
    lse = lse_ref[b, t, heads]
    real = (h * hb + jax.lax.broadcasted_iota(jnp.int32, (hb, 1), 0)) < g.heads  # padded heads: no mass

    def step(j, carry):
        ok, rv, rr = _gather_rows(kv_ref, idx_ref, b, t, j, bk, g)
        s = _logits(qv, qr, rv, rr, g)
        p = jnp.where(ok[None, :] & real, jnp.exp(s - lse[:, None]), 0.0)
        p_ref[b, t, h, pl.ds(j * bk, bk)] = jnp.sum(p, axis=0)
        return carry

    jax.lax.fori_loop(0, n_blocks, step, 0)


def _bwd_kernel(q_ref, kv_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref, dslot_ref, *, g: _Geometry,
                n_blocks: int):
    hb, bk = g.head_block(g.blocks.bwd_block_h), g.blocks.bwd_block_k
    h, t, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    heads = pl.ds(h * hb, hb)
    qv, qr = _load_query(q_ref, b, t, heads, g)
    do = do_ref[b, t, heads, :].astype(g.cdt)
    lse = lse_ref[b, t, heads]
    delta = delta_ref[b, t, heads]

    def step(j, carry):
        dqv, dqr = carry
        ok, rv, rr = _gather_rows(kv_ref, idx_ref, b, t, j, bk, g)
        s = _logits(qv, qr, rv, rr, g)
        p = jnp.where(ok[None, :], jnp.exp(s - lse[:, None]), 0.0)  # [hb, bk]
        dp = _dot(do, rv, g, trans_b=True)
        ds = (p * (dp - delta[:, None])).astype(g.cdt)
        dqv = dqv + _dot(ds, rv, g)
        slots = pl.ds(j * bk, bk)
        dslot_ref[b, t, h, slots, pl.ds(0, g.v_pad)] = (
            _dot(p.astype(g.cdt), do, g, trans_a=True)
            + g.scale * _dot(ds, qv, g, trans_a=True))
        if qr is not None:
            dqr = dqr + _dot(ds, rr, g)
            dslot_ref[b, t, h, slots, pl.ds(g.v_pad, g.r_pad)] = g.scale * _dot(ds, qr, g, trans_a=True)
        return dqv, dqr

    init = (jnp.zeros((hb, g.v_pad), jnp.float32), jnp.zeros((hb, g.r_pad or _MIN_DOT), jnp.float32))
    dqv, dqr = jax.lax.fori_loop(0, n_blocks, step, init)
    dq_ref[b, t, heads, pl.ds(0, g.v_pad)] = dqv * g.scale
    if g.r_pad:
        dq_ref[b, t, heads, pl.ds(g.v_pad, g.r_pad)] = dqr * g.scale


# --------------------------------------------------------------------------------------------------
# pallas_call wrappers (inputs already padded: q [B,T,Hp,width], kv [B,S,width], idx [B,T,k_pad])
# --------------------------------------------------------------------------------------------------

def _grid(g: _Geometry, block_h: int, B: int, T: int) -> tuple[int, int, int]:
    return (g.heads_pad(block_h) // g.head_block(block_h), T, B)


def _forward(q, kv, idx, g: _Geometry):
    B, T, Hp, _ = q.shape
    bs = g.blocks
    return pl.pallas_call(
        functools.partial(_fwd_kernel, g=g, n_blocks=g.k_pad // bs.block_k),
        out_shape=(jax.ShapeDtypeStruct((B, T, Hp, g.v_pad), q.dtype),
                   jax.ShapeDtypeStruct((B, T, Hp), jnp.float32)),
        grid=_grid(g, bs.block_h, B, T),
        compiler_params=triton_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=g.interpret,
        name="sparse_mla_fwd",
    )(q, kv, idx)


def _head_mean_probs(q, kv, idx, lse, g: _Geometry):
    B, T, _, _ = q.shape
    bs = g.blocks
    grid = _grid(g, bs.block_h, B, T)
    partial = pl.pallas_call(
        functools.partial(_probs_kernel, g=g, n_blocks=g.k_pad // bs.block_k),
        out_shape=jax.ShapeDtypeStruct((B, T, grid[0], g.k_pad), jnp.float32),
        grid=grid,
        compiler_params=triton_params(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=g.interpret,
        name="sparse_mla_probs",
    )(q, kv, idx, lse)
    return jnp.sum(partial, axis=2) / g.heads


def _backward_chunk(q, kv, idx, do, lse, delta, g: _Geometry):
    """dq [B,Tc,Hp,width] float32 and per-slot row gradients [B,Tc,k_pad,width] float32 (summed over heads)."""
    B, T, Hp, W = q.shape
    bs = g.blocks
    grid = _grid(g, bs.bwd_block_h, B, T)
    dq, dslot = pl.pallas_call(
        functools.partial(_bwd_kernel, g=g, n_blocks=g.k_pad // bs.bwd_block_k),
        out_shape=(jax.ShapeDtypeStruct((B, T, Hp, W), jnp.float32),
                   jax.ShapeDtypeStruct((B, T, grid[0], g.k_pad, W), jnp.float32)),
        grid=grid,
        compiler_params=triton_params(num_warps=bs.bwd_num_warps, num_stages=bs.bwd_num_stages),
        interpret=g.interpret,
        name="sparse_mla_bwd",
    )(q, kv, idx, do, lse, delta)
    return dq, jnp.sum(dslot, axis=2)


# --------------------------------------------------------------------------------------------------
# differentiable core on padded arrays
# --------------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attend(q, kv, idx, g: _Geometry, query_chunk: int):
    """(out [B,T,Hp,v_pad] in q's dtype, logsumexp [B,T,Hp] float32: not differentiable, internal)."""
    return _forward(q, kv, idx, g)


def _attend_fwd(q, kv, idx, g, query_chunk):
    out, lse = _forward(q, kv, idx, g)
    return (out, lse), (q, kv, idx, out, lse)


def _attend_bwd(g, query_chunk, res, cotangents):
    q, kv, idx, out, lse = res
    dout, _ = cotangents  # the logsumexp only feeds stop-gradient'ed probabilities
    B, T, Hp, W = q.shape
    hp_bwd = g.heads_pad(g.blocks.bwd_block_h)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,T,Hp]

    heads = functools.partial(_fit_heads, n=hp_bwd)  # forward and backward head blocks may differ

    chunk = min(query_chunk, T)
    xs = (chunk_axis(heads(q), 1, chunk, 0), chunk_axis(idx, 1, chunk, -1),
          chunk_axis(heads(dout.astype(q.dtype)), 1, chunk, 0), chunk_axis(heads(lse), 1, chunk, 0),
          chunk_axis(heads(delta), 1, chunk, 0))

    def one_chunk(dkv, x):
        q_c, idx_c, do_c, lse_c, delta_c = x
        dq_c, dslot = _backward_chunk(q_c, kv, idx_c, do_c, lse_c, delta_c, g)
        # Padding slots carry exact zeros (p = ds = 0) and point at row 0: adding them changes nothing.
        dkv = jax.vmap(lambda acc, i, d: acc.at[i.reshape(-1)].add(d.reshape(-1, W)))(
            dkv, jnp.maximum(idx_c, 0), dslot)
        return dkv, dq_c

    dkv, dq = jax.lax.scan(one_chunk, jnp.zeros(kv.shape, jnp.float32), xs)
    dq = jnp.moveaxis(dq, 0, 1).reshape(B, -1, hp_bwd, W)[:, :T]
    return _fit_heads(dq, Hp).astype(q.dtype), dkv.astype(kv.dtype), None


_attend.defvjp(_attend_fwd, _attend_bwd)


# --------------------------------------------------------------------------------------------------
# the implementation
# --------------------------------------------------------------------------------------------------

def sparse_mla_triton(q, kv, indices, valid, *, scale: float, v_dim: int, query_chunk: int = 64,
                      return_probs: bool = False, block_sizes: MlaTritonBlockSizes | None = None,
                      interpret: bool | None = None):
    """out [B,T,Hq,v_dim] in q.dtype (and, with ``return_probs``, head-mean probabilities [B,T,k] float32).

    ``query_chunk`` bounds the backward's per-slot gradient buffer (see the module docstring); the
    forward runs every query in one launch. ``interpret``: None = as the platform says (``dispatch``).
    """
    return _sparse_mla_triton(q, kv, indices, valid, scale=scale, v_dim=v_dim, query_chunk=query_chunk,
                              return_probs=return_probs, block_sizes=block_sizes or MlaTritonBlockSizes(),
                              interpret=interpret if interpret is not None else triton_interpret())


@functools.partial(jax.jit, static_argnames=("scale", "v_dim", "query_chunk", "return_probs", "block_sizes",
                                             "interpret"))
def _sparse_mla_triton(q, kv, indices, valid, *, scale, v_dim, query_chunk, return_probs, block_sizes, interpret):
    if q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise TypeError(f"sparse_mla triton: q must be bfloat16, float16 or float32, got {q.dtype}")
    B, T, H, D = q.shape
    S, k = kv.shape[1], indices.shape[-1]
    bs = block_sizes
    step = max(bs.block_k, bs.bwd_block_k)  # both powers of 2: a multiple of each
    g = _Geometry(heads=H, v_dim=v_dim, rest=D - v_dim, v_pad=_pow2(v_dim),
                  r_pad=_pow2(D - v_dim) if D > v_dim else 0, k_pad=round_up(k, step),
                  scale=scale, compute_dtype=jnp.dtype(q.dtype).name, blocks=bs,
                  interpret=interpret)
    # One int array carries both: -1 for padding (and invalid) slots, real indices clipped into the
    # cache like the reference's gather clamps them.
    idx = jnp.where(valid, jnp.clip(indices.astype(jnp.int32), 0, S - 1), -1)
    idx = pad_axis(idx, 2, g.k_pad, -1)
    qp = _fit_heads(_pad_cols(q, g), g.heads_pad(bs.block_h))
    kvp = _pad_cols(kv, g)
    out, lse = _attend(qp, kvp, idx, g, query_chunk)
    out = out[:, :, :H, :v_dim]
    if not return_probs:
        return out
    stop = jax.lax.stop_gradient
    probs = _head_mean_probs(stop(qp), stop(kvp), idx, stop(lse), g)[:, :, :k]
    return out, probs
