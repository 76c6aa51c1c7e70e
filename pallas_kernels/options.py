"""Options of the selection methods: one frozen dataclass per method, holding its defaults and its rules.

Each op defines its options beside its entry point (``dsa_topk.DsaOptions``, ``hisa_topk.HisaOptions``,
``misa_topk.MisaOptions`` and ``MisaHOptions``); ``sparse_index_jax.selection.METHODS`` registers them
by method name, and every other place (layer configs, CLI flags, benchmarks, context parallelism)
takes names, defaults and checks from there. A broken rule raises ``OptionError`` naming the field;
callers prefix where the value came from (``"IndexerConfig.num_blocks: "``, ``"hisa_topk: "``) and
never write the rule again.

Options change what is selected (HISA's blocks, MISA's routed heads) or only how much memory the
``xla`` implementation holds at once (``query_chunk``, ``key_chunk``: the result is the same).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sparse_index_jax.kernels.inputs import is_positive_int


class OptionError(ValueError):
    """A selection option breaks a rule; ``field`` names it, the message states the rule."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def at(self, where: str) -> "OptionError":
        """The same error, prefixed by where the value came from (``"hisa_topk: "``)."""
        return OptionError(self.field, f"{where}{self}")


def checked_options(cls: type["Options"], owner: str, topk: int, num_heads: int | None = None,
                    **options: Any) -> "Options":
    """``cls(**options)`` validated for ``topk`` (and ``num_heads``); errors prefixed by ``owner``."""
    try:
        return cls.create(**options).check(topk, num_heads)
    except OptionError as err:
        raise err.at(f"{owner}: ") from None


def option(default, doc: str):
    """A field of an options dataclass: its default and the one-line help every CLI flag shows."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of the options dataclasses: every field is a positive int (or None where its default is None)."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def create(cls, label: str = "", **options: Any) -> "Options":
        """``cls(**options)``, refusing names it does not have with the list of those it has."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise OptionError(unknown[0], f"{label + ' ' if label else ''}takes no option(s) {unknown}; it takes "
                                          f"{', '.join(cls.names())}")
        return cls(**options)

    def check(self, topk: int, num_heads: int | None = None) -> "Options":
        """Validates every field (``num_heads``: the indexer's heads, when known); returns self."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            if not is_positive_int(value):
                raise OptionError(f.name, f"{f.name} must be a positive int, got {value!r}")
        self.check_rules(topk, num_heads)
        return self

    def check_rules(self, topk: int, num_heads: int | None) -> None:
        """Rules between fields; the method's subclass states them."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def op_kwargs(self, topk: int) -> dict[str, Any]:
        """The keyword arguments the op's implementations take for these options at ``topk`` (defaults
        that depend on topk resolved)."""
        return self.as_dict()
