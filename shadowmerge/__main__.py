"""`python -m shadowmerge` runs the command line."""

from .cli import entry

entry()
