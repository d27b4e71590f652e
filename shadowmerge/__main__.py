"""`python -m shadowmerge` runs the command line."""

from .cli import main

main()
