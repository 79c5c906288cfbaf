"""Pickles without trust: the restricted unpickler, the allowlist of globals, placeholders for data-
only classes, and the static scan behind ``ckpt scan``.
"""
