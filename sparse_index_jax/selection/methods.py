"""The selection methods: one registry (``METHODS``), and ``Selector``, a method with its topk and options.

Every word about selection has its home here or beside its op: method names in ``METHODS``, each
method's options (names, defaults, rules) in its dataclass (``DsaOptions``, ``HisaOptions``,
``MisaOptions``, ``MisaHOptions``, beside the op's entry point in ``sparse_index_jax.kernels``).
Layer configs, the command line, the benchmarks and context parallelism all derive from them.

* ``dsa``: flat scan, every eligible key scored with all heads (``DsaOptions``);
* ``hisa``: block means pick blocks, their tokens are scored flat (``HisaOptions``);
* ``misa``: a router picks a few heads per query, keys scored with those only (``MisaOptions``);
* ``misa_h``: MISA's routed scan keeps candidates, re-scored with all heads (``MisaHOptions``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from sparse_index_jax.kernels.dsa_topk import DsaOptions, dsa_topk
from sparse_index_jax.kernels.hisa_topk import HisaOptions, hisa_topk
from sparse_index_jax.kernels.inputs import is_positive_int
from sparse_index_jax.kernels.misa_topk import MisaHOptions, MisaOptions, misa_topk
from sparse_index_jax.kernels.options import OptionError, Options
from sparse_index_jax.selection.contract import Selection


@dataclasses.dataclass(frozen=True)
class Method:
    """A selection method: its name, its options dataclass, and how it runs (on the op's entry point)."""

    name: str
    options: type[Options]
    op: Callable[..., tuple[jax.Array, jax.Array]]  # the op's entry point
    summary: str

    @property
    def pools_blocks(self) -> bool:
        """Whether it scores pooled block means (and so takes ``block_sums`` and a ``block_size``)."""
        return "block_size" in self.options.names()

    def run(self, q, k, w, options: Options, *, topk: int, block_sums=None, **call) -> tuple[jax.Array, jax.Array]:
        """(indices, valid) of the op for ``options``; ``call``: the op's other keyword arguments."""
        if block_sums is not None:
            if not self.pools_blocks:
                raise ValueError(f"method {self.name!r} pools no blocks: block_sums apply to the methods with a "
                                 f"block_size option")
            call["block_sums"] = block_sums
        return self.op(q, k, w, topk=topk, **call, **options.op_kwargs(topk))


METHODS: Mapping[str, Method] = {m.name: m for m in (
    Method("dsa", DsaOptions, dsa_topk, "flat scan of every eligible key (DeepSeek-V3.2's lightning indexer)"),
    Method("hisa", HisaOptions, hisa_topk, "block means pick num_blocks blocks; their tokens are scored flat"),
    Method("misa", MisaOptions, misa_topk, "a router picks active_heads heads per query; keys scored with those"),
    Method("misa_h", MisaHOptions, misa_topk, "MISA's routed scan keeps candidates, re-ranked with every head"),
)}


def lookup_method(name: str) -> Method:
    """The registered method ``name``, or an ``OptionError`` listing the known ones."""
    if name not in METHODS:
        raise OptionError("method", f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def option_names() -> tuple[str, ...]:
    """Every option name of every method, in registry order, each once (the flat vocabulary of configs)."""
    names: dict[str, None] = {}
    for m in METHODS.values():
        names.update(dict.fromkeys(m.options.names()))
    return tuple(names)


@dataclasses.dataclass(frozen=True)
class Selector:
    """Which keys each query attends to: a method, its ``topk`` and its options. Frozen and hashable, so it
    can be a static argument of ``jax.jit``; validated on construction (``OptionError`` names the field).

    ``Selector()`` is DSA top-2048; ``Selector.create("hisa", 2048, num_blocks=32)`` takes options by name.
    """

    method: str = "dsa"
    topk: int = 2048
    options: Options | None = None  # None: the method's defaults

    def __post_init__(self):
        spec = lookup_method(self.method)
        if not is_positive_int(self.topk):
            raise OptionError("topk", f"topk must be a positive int, got {self.topk!r}")
        if self.options is None:
            object.__setattr__(self, "options", spec.options())
        elif type(self.options) is not spec.options:
            raise OptionError("options", f"method {self.method!r} takes {spec.options.__name__}, got "
                                         f"{type(self.options).__name__}")
        self.options.check(self.topk)

    @classmethod
    def create(cls, method: str = "dsa", topk: int = 2048, **options: Any) -> "Selector":
        """The selector of ``method`` with options given by name (unknown names are refused)."""
        spec = lookup_method(method)
        return cls(method, topk, spec.options.create(f"method {method!r}", **options))

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any], *, topk: int | None = None) -> "Selector":
        """From ``{"method": ..., "topk": ..., **options}`` (as ``as_dict`` writes it); ``topk`` fills a missing
        topk (default 2048)."""
        fields = dict(fields)
        name = fields.pop("method", "dsa")
        chosen = fields.pop("topk", topk if topk is not None else cls.topk)
        return cls.create(name, chosen, **fields)

    def as_dict(self) -> dict[str, Any]:
        """``{"method", "topk", **options}``: for JSON, metadata and ``from_dict``."""
        return {"method": self.method, "topk": self.topk, **self.options.as_dict()}

    def replace(self, **fields: Any) -> "Selector":
        """This selector with ``fields`` changed (method, topk or option names). A new method starts from
        its own defaults: options of the old one are not carried over."""
        base = {"method": self.method, "topk": self.topk}
        if fields.get("method", self.method) == self.method:
            base.update(self.options.as_dict())
        return Selector.from_dict({**base, **fields})

    @property
    def block_size(self) -> int | None:
        """The pooled block size of a block method (its decode cache keeps block sums); None for dsa."""
        return getattr(self.options, "block_size", None)

    def check_heads(self, num_heads: int) -> "Selector":
        """Validates the options against an indexer of ``num_heads`` heads (MISA's ``active_heads``)."""
        self.options.check(self.topk, num_heads)
        return self

    def select(self, q: jax.Array, k: jax.Array, w: jax.Array, *, q_positions: jax.Array | None = None,
               kv_lengths: jax.Array | None = None, k_scale: jax.Array | None = None,
               block_sums: jax.Array | None = None, implementation: str = "auto", block_sizes=None) -> Selection:
        """The Selection of these indexer activations; arguments as ``select_topk``'s."""
        # Selection is discrete: no gradient flows through it, and none must be traced into its kernels
        # (a Pallas call has no derivative rule) when a loss differentiates the indexer that fed it.
        q, k, w, k_scale = jax.lax.stop_gradient((q, k, w, k_scale))
        indices, valid = METHODS[self.method].run(
            q, k, w, self.options, topk=self.topk, block_sums=block_sums, k_scale=k_scale, q_positions=q_positions,
            kv_lengths=kv_lengths, implementation=implementation, block_sizes=block_sizes)
        return Selection(indices, valid)


def select_topk(q: jax.Array, k: jax.Array, w: jax.Array, *, topk: int, method: str = "dsa",
                q_positions: jax.Array | None = None, kv_lengths: jax.Array | None = None,
                k_scale: jax.Array | None = None, block_sums: jax.Array | None = None, implementation: str = "auto",
                block_sizes=None, **options) -> Selection:
    """Selects the ``topk`` best keys for every query from lightning-indexer activations.

    Args:
      q: [B, T, H, d] indexer queries (after RoPE, optional Hadamard; bf16, f32 or float8_e4m3fn).
      k: [B, S, d] indexer keys, one per token shared by all heads.
      w: [B, T, H] head weights with every scaling folded in (``H^-0.5 * d^-0.5``, and the fp8 q
        scale on the fp8 path), as ``LightningIndexer`` returns them.
      topk: slots per query (k). May exceed S; the extra slots are padding.
      method: a name of ``METHODS``: ``"dsa"``, ``"hisa"``, ``"misa"``, ``"misa_h"``.
      q_positions: [T] or [B, T] int positions of the queries. Default: the last T positions of each
        row, ``kv_lengths - T + arange(T)`` (``arange(T)`` for prefill where T == S).
      kv_lengths: [B] int number of valid keys per row (default S). Must lie in [0, S].
      k_scale: optional [B, S] float32 per-key scale (the fp8 key cache's scale).
      block_sums: [B, ceil(S / block_size), d] float32 pooled key sums of the block methods, as a decode
        cache keeps them (``DSACache``); computed from ``k`` when omitted.
      implementation: ``"auto"`` or one of ``sparse_index_jax.kernels.dispatch.IMPLEMENTATIONS``
        (``"xla"``, ``"triton"``, ``"mosaic_tpu"``); each op's ``backend_for`` says what ``auto`` picks.
      block_sizes: tiles of the chosen Pallas implementation (e.g. ``DsaTpuBlockSizes``); None: defaults.
      **options: the method's options by name (its dataclass in ``METHODS[method].options``).

    Score: ``I[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(q[t, h] . k[s])`` in float32; the rules on
    eligibility, padding and ties are ``sparse_index_jax.selection.contract``'s. No [T, S, H] and no
    [T, S] tensor is built: queries go in chunks (each op's ``reference.py`` states its memory).
    """
    try:
        selector = Selector.create(method, topk, **options)
    except OptionError as err:
        raise err.at("select_topk: ") from None
    return selector.select(q, k, w, q_positions=q_positions, kv_lengths=kv_lengths, k_scale=k_scale,
                           block_sums=block_sums, implementation=implementation, block_sizes=block_sizes)
