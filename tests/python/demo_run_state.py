"""stop/cont on qmp-demo: STOP and RESUME reach every negotiated client (async and legacy)
but not one still in capabilities negotiation; query-status follows.

usage: demo_run_state.py SOCKET
"""

import asyncio
import json
import sys

from qemu.qmp import EventListener, QMPClient

from demo_util import check, connect_async

EVENT_TIMEOUT = 5


async def status(qmp):
    return await qmp.execute("query-status")


async def expect_event(name, listener, event):
    msg = await asyncio.wait_for(listener.get(), EVENT_TIMEOUT)
    check(msg["event"] == event, f"{name}: expected {event}, got {msg}")
    check({"seconds", "microseconds"} <= set(msg["timestamp"]), f"{name}: timestamp {msg}")


async def main(socket):
    legacy = QMPClient("legacy")  # negotiates `oob` only, as every QEMU user does
    await legacy.connect(socket)
    clients = {
        "async-1": await connect_async(socket, "async-1"),
        "legacy": legacy,
        "async-2": await connect_async(socket, "async-2"),
    }
    # Connected and greeted, never negotiated: QEMU sends it no events.
    reader, writer = await asyncio.open_unix_connection(socket)
    greeting = json.loads(await reader.readline())
    check("QMP" in greeting, f"raw greeting {greeting}")
    listeners = {}
    for name, qmp in clients.items():
        listeners[name] = EventListener(("STOP", "RESUME"))
        qmp.register_listener(listeners[name])
    try:
        first = clients["async-1"]
        check(await status(first) == {"running": True, "status": "running"}, "initial status")

        check(await first.execute("stop") == {}, "stop")
        await asyncio.gather(*(expect_event(n, l, "STOP") for n, l in listeners.items()))
        for name, qmp in clients.items():
            reply = await status(qmp)
            check(reply == {"running": False, "status": "paused"}, f"{name}: paused {reply}")

        check(await clients["legacy"].execute("cont") == {}, "cont")
        await asyncio.gather(*(expect_event(n, l, "RESUME") for n, l in listeners.items()))
        reply = await status(clients["async-2"])
        check(reply == {"running": True, "status": "running"}, f"resumed {reply}")

        try:
            line = await asyncio.wait_for(reader.readline(), 0.2)
            sys.exit(f"FAIL: unnegotiated client got {line!r}")
        except asyncio.TimeoutError:
            pass
        print(f"STOP and RESUME reached {len(clients)} clients")
    finally:
        writer.close()
        for qmp in clients.values():
            await qmp.disconnect()
    print("run state OK")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1]))
