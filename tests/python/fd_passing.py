"""qemu.qmp's send_fd_scm() against our server: getfd/closefd, add-fd/query-fdsets/remove-fd,
the errors, and when the server closes the fds (watched through pipes).

usage: fd_passing.py SOCKET
"""

import asyncio
import os
import select
import sys

from qemu.qmp import ExecuteError, QMPClient


def check(ok, what):
    if not ok:
        sys.exit(f"FAIL: {what}")


def closed(read_end, timeout=0.0):
    """True once every copy of the pipe's write end is closed."""
    poller = select.poll()
    poller.register(read_end, select.POLLIN)
    events = poller.poll(timeout * 1000)
    return any(ev & select.POLLHUP for _, ev in events)


async def wait_closed(read_end, what):
    for _ in range(500):
        if closed(read_end):
            return
        await asyncio.sleep(0.01)
    sys.exit(f"FAIL: {what} was not closed")


async def expect_error(qmp, command, args, desc):
    try:
        await qmp.execute(command, args)
    except ExecuteError as e:
        check(str(e) == desc, f"{command}: {e!s} != {desc}")
        return
    sys.exit(f"FAIL: {command} {args} succeeded")


def pipe():
    r, w = os.pipe()
    return r, w


async def main(socket):
    qmp = QMPClient("fds")
    await qmp.connect(socket)
    try:
        await expect_error(qmp, "getfd", {"fdname": "a"}, "No file descriptor supplied via SCM_RIGHTS")

        r, w = pipe()
        qmp.send_fd_scm(w)
        os.close(w)
        check(await qmp.execute("getfd", {"fdname": "a"}) == {}, "getfd a")
        check(not closed(r, 0.1), "the named fd stays open")
        check(await qmp.execute("closefd", {"fdname": "a"}) == {}, "closefd a")
        await wait_closed(r, "closefd's fd")
        await expect_error(qmp, "closefd", {"fdname": "a"}, "File descriptor named 'a' not found")
        os.close(r)

        r, w = pipe()
        qmp.send_fd_scm(w)
        os.close(w)
        await expect_error(qmp, "getfd", {"fdname": "1x"},
                           "Parameter 'fdname' expects a name not starting with a digit")
        await wait_closed(r, "the fd of a refused name")
        os.close(r)

        r, w = pipe()
        qmp.send_fd_scm(w)
        os.close(w)
        added = await qmp.execute("add-fd", {"opaque": "img"})
        check(set(added) == {"fd", "fdset-id"} and added["fdset-id"] == 0, f"add-fd {added}")
        sets = await qmp.execute("query-fdsets")
        check(sets == [{"fds": [{"fd": added["fd"], "opaque": "img"}], "fdset-id": 0}], f"query-fdsets {sets}")
        check(await qmp.execute("remove-fd", {"fdset-id": 0}) == {}, "remove-fd")
        await wait_closed(r, "the removed fd")
        check(await qmp.execute("query-fdsets") == [], "no sets left")
        await expect_error(qmp, "remove-fd", {"fdset-id": 0},
                           "File descriptor named 'fdset-id:0' not found")
        os.close(r)

        # Left pending at disconnect: closed with the connection.
        r, w = pipe()
        qmp.send_fd_scm(w)
        os.close(w)
        check(not closed(r, 0.1), "a pending fd stays open")
    finally:
        await qmp.disconnect()
    await wait_closed(r, "the fd pending at disconnect")
    print("fd passing OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
