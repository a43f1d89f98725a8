"""Statements of the C-STORE path, compiled once per dialect and run on the driver's cursor.

SQLAlchemy Core does a lot of work on every execution: an execution context, parameter
construction from the compiled statement, event dispatch, a cursor result with its
metadata. For the handful of statements every received instance runs, that cost more
CPU than SQLite took to execute them (measured: recording an instance took 650 µs of CPU
through ``Connection.execute`` and 200 µs with the same SQL on the cursor).

A :class:`Prepared` statement is compiled by SQLAlchemy once, for one dialect and one
set of parameter names, and keeps what SQLAlchemy would do on every execution: the order
of the parameters, the values it fills in itself (Python-side column defaults, literal
values in the statement), the type conversions of parameters (bind processors) and of
returned columns (result processors). Executing it is then a cursor call inside the
caller's transaction (begun and committed through SQLAlchemy as before), and a driver
error is raised as the SQLAlchemy exception SQLAlchemy would raise (``IntegrityError``,
``DataError``, ``OperationalError``...), a lost connection also invalidating it, so
callers handle failures as before.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import Executable, Select
from sqlalchemy.sql.dml import UpdateBase

Processor = Callable[[Any], Any]


class Prepared:
    """One statement compiled for one dialect and one set of parameter names."""

    __slots__ = ("_defaults", "_dialect", "_names", "_positional", "_processors", "_result",
                 "_row", "sql")

    def __init__(self, statement: Executable, dialect: Dialect,
                 parameters: Sequence[str] = ()) -> None:
        compiled: Any = statement.compile(dialect=dialect,  # type: ignore[attr-defined]
                                          column_keys=list(parameters))
        self.sql: str = compiled.string
        self._dialect = dialect
        self._positional = bool(compiled.positional)
        self._names: tuple[str, ...] = tuple(
            compiled.positiontup if self._positional else compiled.bind_names.values())
        # What SQLAlchemy fills in itself: Python-side defaults of columns not given,
        # and the values of literal parameters (``change_seq + 1``).
        defaults: dict[str, Any] = {}
        for column in compiled.insert_prefetch + compiled.update_prefetch:
            default = column.default if column in compiled.insert_prefetch else column.onupdate
            if default is None or not default.is_scalar:
                raise ValueError(f"{column.key}: only scalar column defaults can be prepared")
            defaults[column.key] = default.arg
        given = set(parameters)
        for name in self._names:
            if name in given or name in defaults:
                continue
            bind = compiled.binds[name]
            if bind.required or bind.callable is not None:
                raise ValueError(f"{name}: a parameter that is neither given nor a literal")
            defaults[name] = bind.effective_value
        self._defaults = defaults
        self._processors: dict[str, Processor] = dict(compiled._bind_processors)
        columns = _returned_columns(statement)
        self._result = tuple(
            column.type._cached_result_processor(dialect, None) for column in columns.values())
        self._row: Any = namedtuple("Row", list(columns)) if columns else None

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        """The driver's parameters for *values*, converted as SQLAlchemy converts them."""
        if self._defaults:
            values = {**self._defaults, **values}
        processors = self._processors
        if self._positional:
            return tuple(
                processors[name](values[name]) if name in processors else values[name]
                for name in self._names)
        return {name: processors[name](values[name]) if name in processors else values[name]
                for name in self._names}

    def _bound(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        """:meth:`parameters`, a value that cannot be converted raised as SQLAlchemy's
        ``StatementError`` (as ``Connection.execute`` raises it), without the value."""
        try:
            return self.parameters(values)
        except Exception as error:
            raise exc.StatementError(f"a value cannot be bound ({type(error).__name__})",
                                     self.sql, None, error) from error

    def execute(self, connection: Connection, values: Mapping[str, Any]) -> Any:
        """Run the statement with *values*; its first row (a named tuple) or None."""
        cursor = _cursor(connection)
        parameters = self._bound(values)
        self._run(connection, cursor, lambda: cursor.execute(self.sql, parameters), parameters)
        if self._row is None:
            return None
        row = cursor.fetchone()
        if row is None:
            return None
        if any(self._result):
            row = [process(value) if process else value
                   for process, value in zip(self._result, row, strict=True)]
        return self._row(*row)

    def execute_many(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run the statement once per mapping of *rows* (no rows returned)."""
        cursor = _cursor(connection)
        parameters = [self._bound(values) for values in rows]
        self._run(connection, cursor, lambda: cursor.executemany(self.sql, parameters),
                  parameters)

    def _run(self, connection: Connection, cursor: Any, call: Callable[[], Any],
             parameters: Any) -> None:
        dbapi = self._dialect.loaded_dbapi
        try:
            call()
        except dbapi.Error as error:
            lost = self._dialect.is_disconnect(error, connection.connection.dbapi_connection,
                                               cursor)
            if lost:
                connection.invalidate(error)
            # Parameters hidden: they are patient data.
            raise exc.DBAPIError.instance(
                self.sql, parameters, error, dbapi.Error, hide_parameters=True,
                connection_invalidated=lost, dialect=self._dialect,
            ) from error


def _cursor(connection: Connection) -> Any:
    return connection.connection.driver_connection.cursor()  # type: ignore[union-attr]


def _returned_columns(statement: Executable) -> dict[str, Any]:
    """Name -> column of what the statement returns (selected or RETURNING)."""
    if isinstance(statement, Select):
        return {str(column.key): column for column in statement.selected_columns}
    if isinstance(statement, UpdateBase):
        return {str(description["name"]): description["expr"]
                for description in statement.returning_column_descriptions}
    return {}
