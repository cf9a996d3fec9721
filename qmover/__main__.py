"""`python -m qmover` is the `qmover` command."""

from qmover.cli import main

main()
