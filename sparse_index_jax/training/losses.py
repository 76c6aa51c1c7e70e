"""The indexer distillation loss (DeepSeek-V3.2 report; IndexCache's multi-layer form).

For an F layer l serving layers S(l) (itself and the S layers after it), with p_j[t, :] the attention
probabilities of layer j averaged over heads and I_l[t, :] the indexer scores of layer l, both over
the same key slots (all causal keys in the dense stage, the selected top-k in the sparse stage):

    L_l = mean_{j in S(l)}  mean_t  KL( p_j[t, :] || softmax(I_l[t, :]) )

and the indexer loss is the sum of L_l over F layers. p_j is a target (no gradient flows into it).
We average over query rows t (the report sums): the value no longer grows with the batch or length.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from sparse_index_jax.kernels.candidate_topk import gathered_scores
from sparse_index_jax.kernels.dsa_topk.reference import index_scores
from sparse_index_jax.layers.dsa_attention import Teacher
from sparse_index_jax.layers.indexer import IndexerActivations
from sparse_index_jax.selection.contract import Selection


def indexer_kl_rows(targets: jax.Array, scores: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per query row: (mean over targets of KL(target || softmax(scores)), row has a valid slot).

    targets [m, B, T, k] (rows summing to 1 over valid slots), scores [B, T, k] float32, valid [B, T, k].
    """
    log_q = jnp.where(valid, jax.nn.log_softmax(jnp.where(valid, scores, -jnp.inf), axis=-1), 0.0)
    p = jax.lax.stop_gradient(jnp.where(valid, targets, 0.0))
    kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0), axis=-1)  # [m, B, T]
    has_keys = jnp.any(valid, axis=-1)
    return jnp.where(has_keys, jnp.mean(kl, axis=0), 0.0), has_keys


def indexer_kl(targets: Sequence[jax.Array], scores: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over ``targets`` (each [B,T,k], rows summing to 1 over valid slots) and over query rows of
    KL(target || softmax(scores)); scores [B,T,k] float32, valid [B,T,k]. Rows without a valid slot count 0."""
    kl, has_keys = indexer_kl_rows(jnp.stack(list(targets)), scores, valid)
    return jnp.sum(kl) / jnp.maximum(jnp.sum(has_keys), 1)


def lm_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy; logits [B,T,V], targets [B,T] int."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def dense_indexer_kl(indexer: IndexerActivations, teacher: Teacher, *, query_chunk: int = 64,
                     key_chunk: int = 512) -> tuple[jax.Array, int]:
    """Sum over query rows of KL(p[t, :] || softmax(I[t, :])) over every causal key s <= t (the dense warm-up),
    where p is the teacher's attention averaged over its heads and I the indexer's scores; no [T, S] array.

    Queries go ``query_chunk`` at a time; for each, two passes over the keys ``key_chunk`` at a time (only the
    chunks at or below the diagonal): the first finds every head's and the indexer's log-sum-exp online, the
    second sums the KL's terms, KL = sum p log p - sum p I + lse(I), and the gradient with respect to the
    scores, softmax(I) - p, pulled back to the indexer's activations at once. So the forward pass leaves only
    those gradients behind (the size of the activations) and memory is O(T * chunk) per layer at any length.
    The teacher is a target (no gradient); the indexer's activations are the prefill's (query t at key t).
    Returns (the KL summed over the B * T rows, B * T): every row has at least its own key.
    """
    rows = indexer.q.shape[0] * indexer.q.shape[1]
    return _dense_kl(indexer.q, indexer.w, indexer.k, indexer.k_scale, teacher.q, teacher.k, teacher.scale,
                     query_chunk, key_chunk), rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _dense_kl(q, w, k, k_scale, teacher_q, teacher_k, scale, query_chunk, key_chunk):
    return _dense_kl_forward(q, w, k, k_scale, teacher_q, teacher_k, scale, query_chunk, key_chunk)[0]


def _dense_kl_bwd(scale, query_chunk, key_chunk, grads, cotangent):
    scaled = tuple((g * cotangent).astype(g.dtype) for g in grads)
    return (*scaled, None, None, None)  # no gradient reaches the key scale or the teacher (targets)


def _dense_kl_forward(q, w, k, k_scale, teacher_q, teacher_k, scale, query_chunk, key_chunk):
    """(KL summed over rows, (d/dq, d/dw, d/dk of that sum, in the dtypes of q, w and k))."""
    B, T = q.shape[:2]
    S = k.shape[1]
    qc, kc = min(query_chunk, T), min(key_chunk, S)
    nq, nk = -(-T // qc), -(-S // kc)
    pad_q = lambda x: jnp.pad(x, [(0, 0), (0, nq * qc - T)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    pad_k = lambda x: jnp.pad(x, [(0, 0), (0, nk * kc - S)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    q_p, w_p, tq_p = pad_q(q), pad_q(w.astype(jnp.float32)), pad_q(teacher_q)
    k_p, tk_p = pad_k(k), pad_k(teacher_k)
    ks_p = pad_k(jnp.ones((B, S), jnp.float32) if k_scale is None else k_scale.astype(jnp.float32))
    key_pos = jnp.arange(nk * kc, dtype=jnp.int32)

    def query_chunk_step(dk, i):
        q_c, w_c, tq_c = (jax.lax.dynamic_slice_in_dim(x, i * qc, qc, 1) for x in (q_p, w_p, tq_p))
        q_pos = i * qc + jnp.arange(qc, dtype=jnp.int32)
        live = q_pos < T                                            # padded query rows count nothing
        chunks = jnp.minimum((i + 1) * qc + kc - 1, nk * kc) // kc  # key chunks at or below the diagonal

        def key_slices(j):
            at = j * kc
            k_c, tk_c, ks_c = (jax.lax.dynamic_slice_in_dim(x, at, kc, 1) for x in (k_p, tk_p, ks_p))
            pos = jax.lax.dynamic_slice_in_dim(key_pos, at, kc)
            mask = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] < S) & live[:, None]   # [qc, kc]
            logits = jnp.einsum("bcgrd,bsgd->bcgrs", tq_c, tk_c, preferred_element_type=jnp.float32) * scale
            return k_c, ks_c, mask[None], jnp.where(mask[None, :, None, None], logits, -jnp.inf)

        def lse_pass(j, carry):  # online log-sum-exp of every teacher head and of the indexer
            m_t, l_t, m_i, l_i = carry
            k_c, ks_c, mask, logits = key_slices(j)
            scores = jnp.where(mask, index_scores(q_c, k_c, w_c, ks_c), -jnp.inf)
            m_t2 = jnp.maximum(m_t, jnp.max(logits, axis=-1))
            m_i2 = jnp.maximum(m_i, jnp.max(scores, axis=-1))
            l_t = l_t * _exp_shift(m_t, m_t2) + jnp.sum(jnp.exp(logits - _finite(m_t2)[..., None]), axis=-1)
            l_i = l_i * _exp_shift(m_i, m_i2) + jnp.sum(jnp.exp(scores - _finite(m_i2)[..., None]), axis=-1)
            return m_t2, l_t, m_i2, l_i

        heads = tq_c.shape[2:4]
        neg = lambda shape: jnp.full(shape, -jnp.inf, jnp.float32)  # noqa: E731
        zeros = lambda shape: jnp.zeros(shape, jnp.float32)  # noqa: E731
        m_t, l_t, m_i, l_i = jax.lax.fori_loop(0, chunks, lse_pass, (neg((B, qc, *heads)), zeros((B, qc, *heads)),
                                                                    neg((B, qc)), zeros((B, qc))))
        lse_t = _finite(m_t) + jnp.log(jnp.where(l_t > 0, l_t, 1.0))
        lse_i = _finite(m_i) + jnp.log(jnp.where(l_i > 0, l_i, 1.0))

        def kl_pass(j, carry):  # the KL's terms and d KL / d scores = softmax(I) - p, pulled back at once
            entropy, cross, dq, dw, dk = carry
            k_c, ks_c, mask, logits = key_slices(j)
            p = jnp.mean(jnp.exp(logits - lse_t[..., None]), axis=(2, 3))      # [B, qc, kc], 0 off the mask
            scores, pull = jax.vjp(lambda q_, w_, k_: index_scores(q_, k_, w_, ks_c), q_c, w_c, k_c)
            scores = jnp.where(mask, scores, 0.0)
            entropy = entropy + jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
            cross = cross + jnp.sum(p * scores, axis=-1)
            g = jnp.where(mask, jnp.exp(scores - lse_i[..., None]) - p, 0.0)
            g_q, g_w, g_k = pull(g)
            at = j * kc
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, at, kc, 1) + g_k.astype(jnp.float32), at, 1)
            return entropy, cross, dq + g_q.astype(jnp.float32), dw + g_w, dk

        start = (zeros((B, qc)), zeros((B, qc)), zeros(q_c.shape), zeros(w_c.shape), dk)
        entropy, cross, dq, dw, dk = jax.lax.fori_loop(0, chunks, kl_pass, start)
        kl = jnp.sum(jnp.where(live[None], entropy - cross + lse_i, 0.0))
        return dk, (kl, dq, dw)

    dk, (kl, dq, dw) = jax.lax.scan(query_chunk_step, jnp.zeros(k_p.shape, jnp.float32), jnp.arange(nq))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, nq * qc, *x.shape[3:])[:, :T]  # noqa: E731
    return jnp.sum(kl), (unchunk(dq).astype(q.dtype), unchunk(dw).astype(w.dtype), dk[:, :S].astype(k.dtype))


def _finite(m: jax.Array) -> jax.Array:
    """A running maximum with -inf (nothing seen yet) read as 0, so shifts never make NaN."""
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _exp_shift(old: jax.Array, new: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(old), jnp.exp(old - _finite(new)), 0.0)


def slot_indexer_kl(indexer: IndexerActivations, selection: Selection, targets: jax.Array, *,
                    query_chunk: int = 64) -> tuple[jax.Array, jax.Array]:
    """Sum over query rows of KL(p[t, :] || softmax(I[t, :])) over the selected slots (the sparse stage): p the
    head-averaged attention over the slots [B, T, k] (0 on padding), I the indexer's scores of the selected keys.

    ``query_chunk`` rows at a time, and, like ``dense_indexer_kl``, the gradient softmax(I) - p is pulled back
    to the indexer's q, w and k in the forward pass: the residuals are those gradients, so no layer's [T, k]
    probabilities wait for the backward. Returns (the KL summed over rows, the number of rows with a slot).
    """
    return _slot_kl(indexer.q, indexer.w, indexer.k, indexer.k_scale, selection.indices, selection.valid,
                    jax.lax.stop_gradient(targets), query_chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _slot_kl(q, w, k, k_scale, indices, valid, targets, query_chunk):
    return _slot_kl_forward(q, w, k, k_scale, indices, valid, targets, query_chunk)[0]


def _slot_kl_bwd(query_chunk, grads, cotangent):
    scaled = tuple((g * cotangent[0]).astype(g.dtype) for g in grads)
    return (*scaled, None, None, None, None)  # nothing reaches the scale, the selection or the targets


def _slot_kl_forward(q, w, k, k_scale, indices, valid, targets, query_chunk):
    """((KL summed over rows, rows with a slot), (d/dq, d/dw, d/dk of that sum, in q's, w's and k's dtypes))."""
    B, T = q.shape[:2]
    qc = min(query_chunk, T)
    nq = -(-T // qc)
    pad = lambda x, fill=0: jnp.pad(x, [(0, 0), (0, nq * qc - T)] + [(0, 0)] * (x.ndim - 2),  # noqa: E731
                                    constant_values=fill)
    q_p, w_p, idx_p, valid_p, p_p = pad(q), pad(w.astype(jnp.float32)), pad(indices, -1), pad(valid), pad(targets)

    def step(dk, i):
        q_c, w_c, idx_c, ok, p = (jax.lax.dynamic_slice_in_dim(x, i * qc, qc, 1)
                                  for x in (q_p, w_p, idx_p, valid_p, p_p))
        scores, pull = jax.vjp(lambda q_, w_, k_: gathered_scores(q_, w_, k_, k_scale, idx_c), q_c, w_c, k)
        log_q = jax.nn.log_softmax(jnp.where(ok, scores, -jnp.inf), axis=-1)
        p = jnp.where(ok, p.astype(jnp.float32), 0.0)
        has = jnp.any(ok, axis=-1)
        kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - jnp.where(ok, log_q, 0.0)), 0.0), -1)
        g = jnp.where(ok & has[..., None], jnp.exp(log_q) * jnp.sum(p, -1, keepdims=True) - p, 0.0)
        g_q, g_w, g_k = pull(g)
        return dk + g_k.astype(jnp.float32), (jnp.sum(jnp.where(has, kl, 0.0)), jnp.sum(has), g_q, g_w)

    dk, (kl, rows, dq, dw) = jax.lax.scan(step, jnp.zeros(k.shape, jnp.float32), jnp.arange(nq))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, nq * qc, *x.shape[3:])[:, :T]  # noqa: E731
    grads = (unchunk(dq).astype(q.dtype), unchunk(dw).astype(w.dtype), dk.astype(k.dtype))
    return (jnp.sum(kl), jnp.sum(rows)), grads


# The forward passes return (value, gradients): the residuals are the finished gradients, never the targets.
_dense_kl.defvjp(_dense_kl_forward, _dense_kl_bwd)
_slot_kl.defvjp(_slot_kl_forward, _slot_kl_bwd)
