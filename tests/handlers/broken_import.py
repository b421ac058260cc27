"""A handler module that fails at import, for the start-up failure tests."""

raise RuntimeError("this module is broken on purpose")
