"""``python -m ckptsurgeon`` runs the ``ckpt`` command line."""

from .entry import run

if __name__ == "__main__":
    run()
