"""Writing a changed checkpoint: the plan (renames, drops and value transforms), head and adapt
planning, the write operations, the streaming pipeline and its verification.
"""
