"""One unit of work for task state changes: a transaction whose changed task rows fan
out to the status streams only after it has committed.

Every caller that changes a task's state writes::

    with unit.changes(settings) as ch:
        row = ch.record(state.succeed(ch.conn, task_id, owner, result))

``record`` collects the rows the state machine returned (a row, a list of rows, or
None for "nothing changed") and returns what it was given. When the block ends without
an exception the transaction commits and then, only then, the rows are handed to the
status fan-out (``status.submit``: handed to the process's fan-out thread, which sends
them to Redis off the work path; best effort: PostgreSQL already holds the truth, and
the catch-up path replays what Redis missed). If the block raises, the
transaction rolls back and nothing is published. No caller commits and publishes by hand.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from shared import db
from shared.settings import Settings
from shared.tasks import status

Row = dict[str, Any]
Publisher = Callable[[list[Row]], Any]
T = TypeVar("T")


class Changes:
    """The open transaction (``conn``) and the task rows it changed so far."""

    def __init__(self, conn: db.Conn) -> None:
        self.conn = conn
        self.rows: list[Row] = []

    def record(self, changed: T) -> T:
        """Remember ``changed`` (a task row, rows, or None) for the fan-out; returns it."""
        if isinstance(changed, dict):
            self.rows.append(changed)
        elif changed is not None:
            self.rows.extend(r for r in changed if r is not None)  # type: ignore[attr-defined]
        return changed


class _OneStatement:
    """A connection in autocommit mode that refuses a second statement: with no
    transaction around them, two statements would commit apart."""

    def __init__(self, conn: db.Conn) -> None:
        self._conn = conn
        self._used = False

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if self._used:
            raise RuntimeError("a one-statement unit ran a second statement")
        self._used = True
        return self._conn.execute(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything but execute: as the connection
        if name in ("cursor", "pipeline", "transaction"):
            raise RuntimeError(f"a one-statement unit cannot use {name}()")
        return getattr(self._conn, name)


@contextmanager
def changes(settings: Settings, publish: Publisher | None = None, *,
            one_statement: bool = False) -> Iterator[Changes]:
    """A transaction on the process's pool; its recorded rows are published after commit
    (by ``publish``, default the status fan-out thread). Raises what the block or the commit raises.

    ``one_statement``: the block runs a single statement (a set-based state change), so
    the statement is its own transaction (autocommit): BEGIN and COMMIT cost no round
    trips of their own. A second statement in such a block raises ``RuntimeError``.
    """
    if one_statement:
        with db.autocommit(settings) as conn:
            unit = Changes(cast(db.Conn, _OneStatement(conn)))
            yield unit
    else:
        with db.connection(settings) as conn:
            unit = Changes(conn)
            yield unit
    if unit.rows:
        if publish is None:
            status.submit(settings, unit.rows)
        else:
            publish(unit.rows)


def publish_after(settings: Settings, rows: Iterable[Row | None]) -> None:
    """Fan out rows changed by a transaction that has already committed (the outbox
    relay and sweep, which commit per batch inside their own loops)."""
    status.submit(settings, rows)
