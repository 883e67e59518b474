"""A registry: the named implementations of one algorithm component, chosen by one config key.

    ADVANTAGES = Registry("algorithm.advantage")

    @ADVANTAGES.register("rloo", source="Ahmadian et al. 2024, arXiv 2402.14740")
    def rloo(rewards, group_size, eps): ...

`config.validate` checks every registered key against its registry's names, and the README's component table is
`registry.markdown()` for each of them (`python -m dash_exp.algorithms` prints it): adding an option is one function
and its decorator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from dash_exp.errors import ConfigError

F = TypeVar("F")


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered implementation: its option name, the object itself, where it comes from, and its traits."""

    name: str
    impl: F
    # the paper or framework it follows (shown in the component table)
    source: str
    # fixed properties the rest of the harness reads (e.g. a policy loss's `targets`)
    traits: dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        """The implementation's `summary` attribute where it has one, else its docstring's first paragraph on one
        line."""
        summary = getattr(self.impl, "summary", None)
        if isinstance(summary, str):
            return summary
        doc = (getattr(self.impl, "__doc__", None) or "").strip()
        return " ".join(doc.split("\n\n")[0].split())


class Registry(Generic[F]):
    """The options of one config key (`key`), in registration order."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, *, source: str, **traits: Any) -> Callable[[F], F]:
        """Decorator: add `impl` as option `name` of this registry (a name registers once)."""

        def add(impl: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.key}: option {name!r} is registered twice")
            self._entries[name] = Entry(name, impl, source, dict(traits))
            return impl

        return add

    def entry(self, name: str) -> Entry[F]:
        """The entry of option `name`; a ConfigError naming the key and the options where there is none."""
        if name not in self._entries:
            raise ConfigError(f"{self.key}={name!r}: expected one of {', '.join(self._entries)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> F:
        return self.entry(name).impl

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[F]]:
        return iter(self._entries.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def markdown(self) -> str:
        """One table row per option: `key` | option | what it computes | source."""
        return "\n".join(f"| `{self.key}` | `{e.name}` | {e.summary} | {e.source} |" for e in self)
