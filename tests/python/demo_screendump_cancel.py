"""An in-flight screendump that is cancelled, or whose client disconnects, leaves no file.
Run against `qmp-demo --screendump-chunk-delay-ms N` so each dump is slow enough to be seen
half written.

usage: demo_screendump_cancel.py SOCKET DIR
"""

import asyncio
import contextlib
import os
import sys
import time

from qemu.qmp import ExecuteError

from demo_util import check, connect_async, wait_until


def started(path, fmt):
    if fmt == "png":
        # The test pattern compresses so well that the PNG stays in the encoder's buffers
        # until the end: an empty file is as far as it gets in flight.
        return os.path.exists(path)
    return os.path.exists(path) and os.path.getsize(path) > 0


async def start_dump(qmp, path, fmt):
    """Sends screendump and returns once its file is on disk but not yet complete."""
    task = asyncio.create_task(qmp.execute("screendump", {"filename": path, "format": fmt}))
    await wait_until(lambda: started(path, fmt) or task.done(), f"{path} to be started")
    check(not task.done(), f"{path}: screendump finished before it could be cancelled")
    return task


async def in_flight(qmp):
    rows = await qmp.execute("query-async-commands")
    return [row for row in rows if row["command"] == "screendump"]


async def cancel_by_id(qmp, scratch, fmt):
    path = os.path.join(scratch, f"cancelled.{fmt}")
    task = await start_dump(qmp, path, fmt)
    rows = await in_flight(qmp)
    check(len(rows) == 1, f"expected one screendump in flight: {rows}")

    start = time.monotonic()
    reply = await qmp.execute("async-command-cancel", {"id": rows[0]["id"]})
    check(reply == {}, f"async-command-cancel returned {reply}")
    try:
        await asyncio.wait_for(task, 5)
        sys.exit(f"FAIL: cancelled {fmt} screendump returned normally")
    except ExecuteError as e:
        check(e.error_class == "GenericError", f"cancelled: class {e.error_class}: {e}")
        check(str(e) == "Command screendump has been cancelled", f"cancelled: desc {e}")
    await wait_until(lambda: not os.path.exists(path), f"{path} to be removed", timeout=2)
    removed_ms = (time.monotonic() - start) * 1000
    check(await in_flight(qmp) == [], "cancelled screendump still listed")
    print(f"cancel {fmt}: partial file gone {removed_ms:.0f} ms after async-command-cancel")


async def disconnect_mid_dump(socket, scratch):
    qmp = await connect_async(socket, "leaver")
    path = os.path.join(scratch, "abandoned.ppm")
    task = await start_dump(qmp, path, "ppm")
    start = time.monotonic()
    await qmp.disconnect()
    # qemu.qmp fails the pending execute when it disconnects; its error is not the point.
    with contextlib.suppress(Exception):
        await task
    await wait_until(lambda: not os.path.exists(path), f"{path} to be removed", timeout=2)
    print(f"disconnect: partial file gone {(time.monotonic() - start) * 1000:.0f} ms later")


async def main(socket, scratch):
    qmp = await connect_async(socket, "canceller")
    try:
        for fmt in ("ppm", "png"):
            await cancel_by_id(qmp, scratch, fmt)
        await disconnect_mid_dump(socket, scratch)
        # The server is fine afterwards and nothing is left in the directory.
        status = await qmp.execute("query-status")
        check(status["running"] is True, f"query-status {status}")
        left = [name for name in os.listdir(scratch) if not name.endswith(".sock")]
        check(left == [], f"files left behind: {left}")
    finally:
        await qmp.disconnect()
    print("screendump cancel OK")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(main(*sys.argv[1:]))
