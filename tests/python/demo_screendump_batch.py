"""20 screendumps at once from one async qemu.qmp client: every file is complete, and the
monitor answers other commands while they run.

usage: demo_screendump_batch.py SOCKET DIR
"""

import asyncio
import os
import sys
import time

from demo_util import check, check_png, check_ppm, connect_async

COUNT = 20


async def main(socket, scratch):
    qmp = await connect_async(socket, "batch")
    try:
        start = time.monotonic()
        await qmp.execute("screendump", {"filename": os.path.join(scratch, "single.ppm")})
        single_ms = (time.monotonic() - start) * 1000

        # Two of them PNG, so both encoders run side by side (PNG is slow in debug builds).
        paths = [
            os.path.join(scratch, f"shot-{i:02}.{'png' if i % 10 == 9 else 'ppm'}")
            for i in range(COUNT)
        ]
        start = time.monotonic()
        tasks = [
            asyncio.create_task(
                qmp.execute(
                    "screendump",
                    {"filename": p, "format": "png" if p.endswith(".png") else "ppm"},
                )
            )
            for p in paths
        ]
        # A command sent while the dumps run is answered without waiting for them.
        await asyncio.sleep(0.01)
        status_start = time.monotonic()
        status = await qmp.execute("query-status")
        status_ms = (time.monotonic() - status_start) * 1000
        check(status["running"] is True, f"query-status {status}")

        replies = await asyncio.gather(*tasks)
        batch_ms = (time.monotonic() - start) * 1000
        check(replies == [{}] * COUNT, f"screendump replies {replies}")
        for path in paths:
            (check_png if path.endswith(".png") else check_ppm)(path)
        print(
            f"batch: {COUNT} screendumps in {batch_ms:.0f} ms "
            f"(one alone {single_ms:.0f} ms; query-status during the batch {status_ms:.1f} ms)"
        )
    finally:
        await qmp.disconnect()
    print("screendump batch OK")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(main(*sys.argv[1:]))
