"""The data model every stage shares: tensor records, dtypes, the checkpoint tree and its walkers, the
coverage rule, and the helpers reports render with.
"""
