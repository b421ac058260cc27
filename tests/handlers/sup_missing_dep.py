"""A handler module whose import fails on a missing dependency (start-up failure tests)."""

from simplerpc_mp import Handlers

import simplerpc_mp_test_no_such_dependency  # noqa: F401  (the point of this module)

handlers = Handlers()
