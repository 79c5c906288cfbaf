"""``python -m ckptsurgeon`` runs the ``ckpt`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
