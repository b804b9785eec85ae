"""screendump on qmp-demo through an async qemu.qmp client: PPM and PNG files, and the error
replies for a bad device and an unwritable path.

usage: demo_screendump.py SOCKET DIR
"""

import asyncio
import os
import sys
import time

from qemu.qmp import ExecuteError

from demo_util import check, check_png, check_ppm, connect_async


async def dump(qmp, filename, **args):
    start = time.monotonic()
    reply = await qmp.execute("screendump", {"filename": filename, **args})
    check(reply == {}, f"screendump {filename} returned {reply}")
    return (time.monotonic() - start) * 1000


async def expect_error(qmp, args, error_class, what):
    try:
        await qmp.execute("screendump", args)
    except ExecuteError as e:
        check(e.error_class == error_class, f"{what}: class {e.error_class}: {e}")
        return str(e)
    sys.exit(f"FAIL: {what}: screendump succeeded")


async def main(socket, scratch):
    qmp = await connect_async(socket, "screendump")
    try:
        ppm = os.path.join(scratch, "shot.ppm")
        ms = await dump(qmp, ppm)
        check_ppm(ppm)
        print(f"ppm: {ms:.0f} ms")

        png = os.path.join(scratch, "shot.png")
        ms = await dump(qmp, png, format="png", device="video0", head=0)
        check_png(png)
        print(f"png: {ms:.0f} ms, {os.path.getsize(png)} bytes")

        bad = os.path.join(scratch, "bad.ppm")
        desc = await expect_error(
            qmp, {"filename": bad, "device": "nope"}, "DeviceNotFound", "bad device"
        )
        check(desc == "Device 'nope' not found", f"bad device desc: {desc}")
        check(not os.path.exists(bad), "bad device still created the file")

        # A missing directory, not a read-only one: root (CI containers) may write anywhere.
        unwritable = os.path.join(scratch, "no-such-dir", "shot.ppm")
        desc = await expect_error(qmp, {"filename": unwritable}, "GenericError", "unwritable")
        check(desc.startswith("failed to open file"), f"unwritable desc: {desc}")
        check(unwritable in desc, f"unwritable desc does not name the file: {desc}")
    finally:
        await qmp.disconnect()
    print("screendump OK")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(main(*sys.argv[1:]))
