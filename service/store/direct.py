"""Hot statements run on the driver's own connection: compiled once by SQLAlchemy, then
executed without its per-execution work.

SQLAlchemy's ``Connection.execute`` of a statement already in its compiled cache still
builds an execution context, processes every parameter through ``construct_params``
and wraps the cursor in a result; through its asyncio layer each statement is also a
greenlet switch and an adapted cursor. Measured on 2026-12-04 (a one-row select by
primary key, warm): SQLite 27 µs against 10 µs for ``sqlite3`` alone; PostgreSQL 170 to
190 µs of CPU against 72 to 79 µs for ``asyncpg`` alone. In the service, cold caches
make it worse: 10-lane votes one after another cost 13.5 ms of CPU a job with every
statement through SQLAlchemy, 8.5 ms with the hot ones run here (SQLite).

So the statements the store runs on every job are marked with :func:`direct`, and
:class:`Plans` turns each into a :class:`Plan` the first time it runs with a given set
of parameter names: the SQL and parameter order SQLAlchemy compiled for the dialect,
its bind processors (JSON as text, ...), the values fixed in the statement (literal
``IN`` lists, column defaults) and the result columns' processors. Running it is then
one driver call, the parameters put in order. The SQL, the types' processing and the
transaction are SQLAlchemy's own, so a direct statement stores and reads exactly what
``execute`` would; statements that are not marked go through SQLAlchemy as before.

A parameter bound to a list (``IN :idxs``, expanding) is rendered, as SQLAlchemy
renders it, with one placeholder per value; here the placeholders are as many as the
next power of two, the last value repeated in the rest (``IN`` reads them the same),
so a statement has a dozen shapes for lists of up to 4,096 values rather than one per
length: a plan each here, and a prepared statement each on PostgreSQL, parsed again
once evicted.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Protocol, TypeVar

from sqlalchemy import Executable
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

S = TypeVar("S", bound=Executable)
T = TypeVar("T")
_DIRECT: dict[int, Executable] = {}


def direct(statement: S) -> S:
    """Mark a statement built once (a module constant) to run on the driver. Marking
    holds the statement: its id never names another one."""
    _DIRECT[id(statement)] = statement
    return statement


def _padded(values: Sequence[T]) -> list[T]:
    """``values`` with the last one repeated up to the next power of two (see above)."""
    if not values:
        return []
    size = 1 << (len(values) - 1).bit_length()
    return [*values, *[values[-1]] * (size - len(values))]


Process = Callable[[Any], Any] | None


@dataclass(frozen=True, slots=True)
class Slot:
    """One positional parameter: the caller's value ``key`` (its ``item``-th element for
    a list), or the statement's own ``value`` (already processed); ``process`` turns the
    caller's value into what the driver takes."""

    key: str | None
    item: int | None
    value: Any
    process: Process


@dataclass(slots=True)
class Plan:
    sql: str
    slots: tuple[Slot, ...]
    columns: tuple[str, ...]  # result columns (none: the statement returns no rows)
    column_types: tuple[Any, ...]
    # Result processors, by column (None: not known yet; on PostgreSQL they depend on the
    # column's type on the server, read at the first run).
    results: tuple[Process, ...] | None = None
    # Rows are tuples that also answer to their columns' names, as SQLAlchemy's do.
    row: Any = field(init=False)
    # Without a list parameter, ``bind`` reads the caller's values in one call: the
    # keyed slots' getter, their processors (by index) and the statement's own values
    # (by position, in order).
    _get: Callable[[Mapping[str, Any]], Any] | None = field(init=False, default=None)
    _processed: tuple[tuple[int, Callable[[Any], Any]], ...] = field(init=False, default=())
    _fixed: tuple[tuple[int, Any], ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self.row = namedtuple("Row", self.columns, rename=True)._make  # type: ignore[attr-defined]
        keyed = [slot for slot in self.slots if slot.key is not None]
        if len(keyed) > 1 and all(slot.item is None for slot in keyed):
            self._get = itemgetter(*(slot.key for slot in keyed))
            self._processed = tuple(
                (i, slot.process) for i, slot in enumerate(keyed) if slot.process is not None
            )
            self._fixed = tuple(
                (position, slot.value)
                for position, slot in enumerate(self.slots)
                if slot.key is None
            )

    def bind(self, params: Mapping[str, Any]) -> list[Any]:
        if self._get is not None:
            values = list(self._get(params))
            for i, process in self._processed:
                values[i] = process(values[i])
            for position, value in self._fixed:  # in order: each lands where it belongs
                values.insert(position, value)
            return values
        out = []
        for slot in self.slots:
            if slot.key is None:
                out.append(slot.value)
                continue
            value = params[slot.key]
            if slot.item is not None:  # past the list's end: its padding (the last value)
                value = value[slot.item] if slot.item < len(value) else value[-1]
            out.append(value if slot.process is None else slot.process(value))
        return out

    def rows(self, fetched: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
        results, row = self.results or (), self.row
        if not any(results):
            return [row(values) for values in fetched]
        return [
            row(value if p is None else p(value) for p, value in zip(results, values, strict=True))
            for values in fetched
        ]


class Plans:
    """The plans of one dialect, made on first use."""

    SIZE = 512  # plans kept (a list parameter makes one per padded length)

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._compiled: dict[tuple[int, tuple[str, ...], bool], _Compiled | None] = {}
        self._plans: OrderedDict[tuple[Any, ...], Plan] = OrderedDict()

    def get(self, statement: Executable, parameters: Any) -> Plan | None:
        """The plan to run ``statement`` with ``parameters`` (a mapping, a list of them
        for executemany, or None), or None when it goes through SQLAlchemy."""
        if id(statement) not in _DIRECT:
            return None
        many = isinstance(parameters, list)
        if many and not parameters:
            return None
        first: Mapping[str, Any] = (parameters[0] if many else parameters) or {}
        names = tuple(sorted(first))
        base_key = (id(statement), names, many)
        try:
            compiled = self._compiled[base_key]
        except KeyError:
            compiled = self._compiled[base_key] = _compile(statement, self.dialect, names, many)
        if compiled is None:
            return None
        padded = {name: _padded(first[name]) for name in compiled.lists}
        key = (base_key, *(len(values) for values in padded.values()))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = compiled.plan({**first, **padded})
            if len(self._plans) > self.SIZE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan


@dataclass
class _Compiled:
    """A statement compiled for a dialect and a set of parameter names."""

    compiled: SQLCompiler
    dialect: Dialect
    lists: tuple[str, ...]  # the caller's parameters bound to lists (expanding)
    defaults: dict[str, Any] = field(default_factory=dict)  # column defaults, by bind name

    def plan(self, params: Mapping[str, Any]) -> Plan:
        compiled = self.compiled
        values = compiled.construct_params(params)
        values.update(self.defaults)
        processors: dict[str, Any] = dict(compiled._bind_processors)
        sql, positions = compiled.string, list(compiled.positiontup or ())
        # An expanded name: the list's bind name and the element's index.
        expansions: dict[str, tuple[str, int | None]] = {}
        if compiled.post_compile_params:
            state = compiled._process_parameters_for_postcompile(values)
            sql, positions = state.statement, list(state.positiontup or ())
            processors.update(state.processors)
            values = dict(state.parameters)
            for name, expanded in state.parameter_expansion.items():
                for position, one in enumerate(expanded):
                    expansions[one] = (name, position)
        binds = compiled.binds
        slots = []
        for name in positions:
            process = processors.get(name)
            source, index = expansions.get(name, (name, None))
            if source in binds and binds[source].key in params:
                slots.append(Slot(binds[source].key, index, None, process))
            else:
                value = values[name]
                slots.append(Slot(None, None, value if process is None else process(value), None))
        columns = tuple(str(column[0]) for column in compiled._result_columns)
        types = tuple(column[3] for column in compiled._result_columns)
        plan = Plan(sql, tuple(slots), columns, types)
        if self.dialect.name == "sqlite":
            plan.results = result_processors(plan, self.dialect, [None] * len(columns))
        return plan


def result_processors(
    plan: Plan, dialect: Dialect, server_types: Sequence[Any]
) -> tuple[Process, ...]:
    return tuple(
        type_.dialect_impl(dialect).result_processor(dialect, server_type)
        for type_, server_type in zip(plan.column_types, server_types, strict=True)
    )


def _compile(
    statement: Executable, dialect: Dialect, names: tuple[str, ...], many: bool
) -> _Compiled | None:
    assert isinstance(statement, ClauseElement)
    compiled = statement.compile(dialect=dialect, column_keys=list(names), for_executemany=many)
    assert isinstance(compiled, SQLCompiler)
    if not compiled.positional or compiled.literal_execute_params:
        return None
    lists = tuple(sorted({bind.key for bind in compiled.post_compile_params if bind.key in names}))
    if lists and many:
        return None
    # Column defaults SQLAlchemy fills in at execution (``default=0``): constants here.
    defaults: dict[str, Any] = {}
    for column in [*compiled.insert_prefetch, *compiled.update_prefetch]:
        default = column.default if column in compiled.insert_prefetch else column.onupdate
        if default is None or not default.is_scalar or column.key not in compiled.binds:
            return None
        defaults[column.key] = default.arg  # type: ignore[attr-defined]
    return _Compiled(compiled, dialect, lists, defaults)


# --- what a direct statement returns --------------------------------------------------


class Fetched:
    """The rows a direct statement returned: the part of SQLAlchemy's result the store
    uses (rows are tuples; ``mappings()`` are dicts by column name)."""

    def __init__(self, columns: tuple[str, ...], rows: list[Any], rowcount: int) -> None:
        self.columns = columns
        self._rows = rows
        self.rowcount = rowcount

    def all(self) -> list[Any]:
        return self._rows

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def scalar_one(self) -> Any:
        if len(self._rows) != 1:
            raise LookupError(f"expected one row, got {len(self._rows)}")
        return self._rows[0][0]

    def scalar_one_or_none(self) -> Any:
        if len(self._rows) > 1:
            raise LookupError(f"expected at most one row, got {len(self._rows)}")
        return self._rows[0][0] if self._rows else None

    def scalars(self) -> Fetched:
        return Fetched(self.columns[:1], [row[0] for row in self._rows], self.rowcount)

    def mappings(self) -> Fetched:
        rows = [dict(zip(self.columns, row, strict=True)) for row in self._rows]
        return Fetched(self.columns, rows, self.rowcount)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


class Rows(Protocol):
    """A statement's result as the store reads it: SQLAlchemy's, or :class:`Fetched`."""

    def all(self) -> Sequence[Any]: ...

    def first(self) -> Any: ...

    def scalar(self) -> Any: ...

    def scalar_one(self) -> Any: ...

    def scalar_one_or_none(self) -> Any: ...

    def scalars(self) -> Any: ...

    def mappings(self) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...

    @property
    def rowcount(self) -> int: ...
