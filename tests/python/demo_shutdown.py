"""quit on qmp-demo through qemu.qmp: SHUTDOWN {"guest": false, "reason": "host-qmp-quit"}
reaches the client that quit and one that only watches, then the reply, then the connections
close (as QEMU 10.0.2 does, conformance transcript 08-quit.jsonl).

usage: demo_shutdown.py SOCKET
"""

import asyncio
import sys

from qemu.qmp import EventListener, QMPClient, Runstate

from demo_util import check, connect_async

EVENT_TIMEOUT = 5
SHUTDOWN_DATA = {"guest": False, "reason": "host-qmp-quit"}


async def main(socket):
    legacy = QMPClient("legacy")  # negotiates `oob` only, as every QEMU user does
    await legacy.connect(socket)
    watcher = await connect_async(socket, "watcher")
    listeners = {}
    for name, qmp in (("legacy", legacy), ("watcher", watcher)):
        listeners[name] = EventListener("SHUTDOWN")
        qmp.register_listener(listeners[name])

    reply = await legacy.execute("quit")
    check(reply == {}, f"quit returned {reply}")
    for name, listener in listeners.items():
        msg = await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
        check(msg["data"] == SHUTDOWN_DATA, f"{name}: {msg}")
        check({"seconds", "microseconds"} <= set(msg["timestamp"]), f"{name}: timestamp {msg}")
    for name, qmp in (("legacy", legacy), ("watcher", watcher)):
        # The server closed the connection: qemu.qmp reports that as EOFError from
        # disconnect(), as it does after quit on QEMU (qemu.machine expects it too).
        try:
            await asyncio.wait_for(qmp.disconnect(), EVENT_TIMEOUT)
        except EOFError:
            pass
        check(qmp.runstate == Runstate.IDLE, f"{name}: runstate {qmp.runstate}")
    print("SHUTDOWN reached both clients")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1]))
