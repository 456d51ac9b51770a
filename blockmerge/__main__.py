"""`python -m blockmerge` runs the command line."""

from .cli import main

main()
