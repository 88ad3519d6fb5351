"""`python -m sdcli`."""

from .cli import main

main()
