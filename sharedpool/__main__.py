"""``python -m sharedpool``: the same as the ``sharedpool`` command."""

from .cli import main

if __name__ == "__main__":
    main()
