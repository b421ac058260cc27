"""``python -m simplerpc_mp`` is the ``simplerpc-mp`` command."""

from .cli import main

if __name__ == "__main__":
    main()
