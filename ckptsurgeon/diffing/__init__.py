"""A checkpoint against a target: the target (a file, or a model built on meta), the comparison, the
diagnosis, the explanation with its fix, and the result that renders itself.
"""
