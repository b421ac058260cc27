"""Handlers for the recycling tests: ``basic``'s ops in workers that take a while to boot.

Each worker's ``on_start`` sleeps ``$SUP_BOOT_S`` seconds (default 1), so a moment without a
booted worker is long enough to measure. Imported in workers.
"""

import os
import time

from simplerpc_mp import Handlers

from tests.handlers import basic

handlers = Handlers().merge(basic.handlers)


@handlers.on_start
def boot_slowly(options):
    time.sleep(float(os.environ.get("SUP_BOOT_S", "1")))
