"""Bytes on disk: span reads with CRCs, read-back while writing, atomic durable output, progress."""
