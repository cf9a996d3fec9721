"""The first layer: the INI file (reading) and the routes it names (route).

Nothing here touches a database; every layer above takes its Routes from here.
"""

from qmover.config.reading import DEFAULT_BROKER, Config, is_redis_url, load_config, parse_seconds
from qmover.config.route import Route

__all__ = ["DEFAULT_BROKER", "Config", "Route", "is_redis_url", "load_config", "parse_seconds"]
