"""``python -m backlane`` does what the ``backlane`` command does."""

from .cli import main

if __name__ == "__main__":
    main()
