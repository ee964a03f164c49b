"""User-facing errors.

Every error a user can cause (a bad config key, a broken input file) is a
:class:`ShopRankError`. Entrypoints print its message and exit with status 2
instead of showing a stack trace, so the message itself must say what is wrong
and where: the key, the file, the column, the row.
"""

from __future__ import annotations


class ShopRankError(Exception):
    """Base class of errors caused by the user's input, shown without a traceback."""


class ConfigError(ShopRankError):
    """A config file or ``--set`` override is invalid; the message names the key."""


class DataError(ShopRankError):
    """An input file is unusable; the message names the file, the column and the row."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        row: int | None = None,
    ) -> None:
        self.file = file
        self.column = column
        self.row = row
        where = []
        if file is not None:
            where.append(f"file {file}")
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)
