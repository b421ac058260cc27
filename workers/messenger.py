"""The seed's messenger sample, server side: a welcome push on connect, ``thanks`` answered
with custom OKAY data, rooms (``join{"room"}``, ``leave{"room"}``, ``say{"room", "msg"}``
pushing ``message{"room", "from", "msg"}`` to the room's members, ``rooms{}``), and
``tell``/``shout`` to push to one client or to all.

Serve it with ``simplerpc-mp serve --handlers workers.messenger``. It is also half of the
built-in demo, which is why the code lives in the package.
"""

from simplerpc_mp.demo import messenger_handlers as handlers

__all__ = ["handlers"]
