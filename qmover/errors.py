"""Expected failures: each carries one line that names the cause and the fix.

The CLI prints these without a traceback; anything else is a bug and keeps
its traceback.
"""


class QmoverError(Exception):
    """An expected failure; str() is the one line shown to the user."""

    exit_code = 1

    def __init__(self, message: str, side: str | None = None, sqlstate: str | None = None):
        super().__init__(message)
        self.side = side  # "source" or "target": the database that failed, where one did
        self.sqlstate = sqlstate  # the server's error code, where the server said no


class ConfigError(QmoverError):
    """The config file is wrong; raised before any database is touched."""

    exit_code = 2


class TransientError(QmoverError):
    """A connection failed or was lost; retrying later may succeed."""


class LostPosition(QmoverError):
    """The target's position matches neither end of the source batch."""


class LoginRefused(QmoverError):
    """The server answered and refused the login (password, pg_hba.conf): waiting will not cure it."""


class WrongPooler(QmoverError):
    """A pooler in transaction or statement mode stands between qmover and a database."""
