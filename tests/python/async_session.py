"""qemu.qmp through its public API negotiating `async`: many commands in flight, replies
out of order, query-async-commands and async-command-cancel.

usage: async_session.py SOCKET
"""

import asyncio
import random
import sys
import time

from qemu.qmp import ExecuteError, QMPClient

COUNT = 200


def check(ok, what):
    if not ok:
        sys.exit(f"FAIL: {what}")


async def in_flight(qmp, command):
    rows = await qmp.execute("query-async-commands")
    return [row for row in rows if row["command"] == command]


async def concurrent_batch(qmp):
    # Shuffled so that completion order differs from sending order.
    delays = [10 + (390 * i) // (COUNT - 1) for i in range(COUNT)]
    random.shuffle(delays)
    start = time.monotonic()
    tasks = [asyncio.create_task(qmp.execute("x-delay", {"ms": ms})) for ms in delays]

    await asyncio.sleep(0.05)
    rows = await in_flight(qmp, "x-delay")
    check(rows, "query-async-commands lists nothing while x-delay runs")
    for row in rows:
        check(str(row.get("id", "")).startswith("__qmp#"), f"row without our id: {row}")
        check(isinstance(row["elapsed-ms"], int) and row["oob"] is False, f"row: {row}")

    replies = await asyncio.gather(*tasks)
    elapsed_ms = (time.monotonic() - start) * 1000
    check(replies == [{}] * COUNT, f"x-delay replies: {replies}")
    slowest, total = max(delays), sum(delays)
    print(f"async: {COUNT} x-delay in {elapsed_ms:.0f} ms "
          f"(slowest {slowest} ms, sum {total} ms, {len(rows)} seen in flight)")
    check(elapsed_ms < 2 * slowest + 500, f"{elapsed_ms:.0f} ms: commands did not overlap")


async def cancel_one(qmp):
    task = asyncio.create_task(qmp.execute("x-delay", {"ms": 30_000}))
    rows = []
    for _ in range(100):
        rows = await in_flight(qmp, "x-delay")
        if rows:
            break
        await asyncio.sleep(0.01)
    check(len(rows) == 1, f"expected one x-delay in flight: {rows}")

    start = time.monotonic()
    reply = await qmp.execute("async-command-cancel", {"id": rows[0]["id"]})
    check(reply == {}, f"async-command-cancel returned {reply}")
    try:
        await asyncio.wait_for(task, 5)
        check(False, "cancelled x-delay returned normally")
    except ExecuteError as e:
        check(e.error_class == "GenericError", f"cancelled command class {e.error_class}: {e}")
    check(time.monotonic() - start < 5, "cancel took too long")
    check(await in_flight(qmp, "x-delay") == [], "cancelled command still listed")


async def main(socket):
    qmp = QMPClient("async")
    qmp.negotiate = False  # we negotiate ourselves, asking for `async` too
    await qmp.connect(socket)
    try:
        caps = qmp.greeting.QMP.capabilities
        check("async" in caps, f"greeting offers async: {caps}")
        reply = await qmp.execute("qmp_capabilities", {"enable": ["oob", "async"]})
        check(reply == {}, f"qmp_capabilities returned {reply}")
        await concurrent_batch(qmp)
        await cancel_one(qmp)
    finally:
        await qmp.disconnect()
    print("async session OK")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1]))
