"""``python -m backlane`` does what the ``backlane`` command does."""

from .cli import main

main()
