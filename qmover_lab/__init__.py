"""qmover's lab: the benchmarks, the demo, throwaway PostgreSQL clusters and
Celery child processes.  It imports qmover; qmover never imports it, and the
Docker image leaves it out.  `qmover bench` finds it through the entry point
it declares (pyproject.toml, qmover.commands)."""
