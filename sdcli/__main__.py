"""`python -m sdcli`."""

from sdcli.cli import main

main()
