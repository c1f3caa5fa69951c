"""Allow ``python -m cax``."""

from cax.cli import main

main()
