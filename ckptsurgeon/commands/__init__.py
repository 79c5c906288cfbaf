"""One module per ``ckpt`` command; each defines ``COMMAND`` (a click command)."""
