"""qmover: move PgQ events from a source queue to a target queue, exactly once."""

__version__ = "0.1.0"
