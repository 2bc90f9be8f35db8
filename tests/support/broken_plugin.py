"""A plugin whose module cannot be imported: a worker must carry on without it."""

raise RuntimeError("bftest broken plugin: this module fails on import, on purpose")
