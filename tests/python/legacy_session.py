"""A plain qemu.qmp client (negotiates `oob` only, like every QEMU user) against our server.

usage: legacy_session.py SOCKET
"""

import asyncio
import random
import sys
import time

from qemu.qmp import ExecuteError, QMPClient


def check(ok, what):
    if not ok:
        sys.exit(f"FAIL: {what}")


async def main(socket):
    qmp = QMPClient("legacy")
    await qmp.connect(socket)
    try:
        caps = qmp.greeting.QMP.capabilities
        check("oob" in caps, f"greeting offers oob: {caps}")

        version = await qmp.execute("query-version")
        check(set(version["qemu"]) == {"major", "minor", "micro"}, f"query-version: {version}")
        check(isinstance(version["package"], str), f"query-version package: {version}")

        names = {c["name"] for c in await qmp.execute("query-commands")}
        for name in ("qmp_capabilities", "query-version", "echo", "x-delay"):
            check(name in names, f"query-commands lists {name}: {sorted(names)}")

        args = {"s": "héllo", "n": [1, 2.5, None], "o": {"deep": True}}
        reply = await qmp.execute("echo", args)
        check(reply == args, f"echo returned {reply}")

        try:
            await qmp.execute("fail")
            check(False, "fail did not raise")
        except ExecuteError as e:
            check(e.error_class == "DeviceNotFound", f"fail class {e.error_class}")
            check(str(e) == "Device 'nope' not found", f"fail desc {e}")

        reply = await qmp.execute("oob-echo", {"x": 1}, oob=True)
        check(reply == {"x": 1}, f"exec-oob oob-echo returned {reply}")

        # A legacy client may pipeline; the server runs these one at a time, in order.
        delays = list(range(1, 41, 2))
        random.shuffle(delays)
        start = time.monotonic()
        replies = await asyncio.gather(*(qmp.execute("x-delay", {"ms": ms}) for ms in delays))
        elapsed_ms = (time.monotonic() - start) * 1000
        check(replies == [{}] * len(delays), f"x-delay replies: {replies}")
        check(elapsed_ms >= sum(delays), f"{elapsed_ms:.0f} ms < sum {sum(delays)} ms: not serial")
        print(f"legacy: {len(delays)} pipelined x-delay in {elapsed_ms:.0f} ms (sum {sum(delays)} ms)")
    finally:
        await qmp.disconnect()
    print("legacy session OK")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1]))
