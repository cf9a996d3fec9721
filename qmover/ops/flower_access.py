"""Who may reach Flower: loopback by default, anything wider only behind a login.

Flower listens on every interface when given no address, and asks for no
credentials unless told to; it can also revoke and rate-limit tasks.  `qmover
flower` reads Flower's options the way Flower will (command line, FLOWER_*
environment, flowerconfig.py) before starting it, and refuses an open door.
"""

from __future__ import annotations

import ipaddress

from tornado.options import Error, OptionParser

from qmover.errors import ConfigError

LOOPBACK = "127.0.0.1"


def flower_args(args: list[str]) -> list[str]:
    """Flower's arguments, with the loopback address when none is set anywhere.

    Raises ConfigError when Flower would serve a wider address with no login.
    """
    if any(arg in ("--help", "-h") for arg in args):
        return args
    try:
        options = _effective_options(args)
    except (Error, ValueError) as exc:  # Flower would stop on it too, with a traceback
        raise ConfigError(f"Flower's options: {exc}; see `celery flower --help`") from None
    if options.unix_socket:
        return args  # a socket file: its permissions decide
    if not options.address:
        return [*args, f"--address={LOOPBACK}"]
    if _is_loopback(options.address) or options.basic_auth or options.auth:
        return args
    raise ConfigError(
        f"refusing to serve Flower on {options.address} without a login; add "
        f"--basic-auth=USER:PASSWORD (or FLOWER_BASIC_AUTH in the environment), or listen on "
        f"--address={LOOPBACK}")


def _effective_options(args: list[str]) -> OptionParser:
    """Flower's own reading of its options: the environment, then the command line and its config file."""
    from flower.command import apply_env_options, apply_options
    from flower.options import options

    apply_env_options()
    apply_options("flower", args)
    return options


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to elsewhere
