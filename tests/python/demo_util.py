"""Helpers shared by the scripts that drive a running qmp-demo (see tests/tests/demo.rs)."""

import asyncio
import struct
import sys
import time
import zlib

from qemu.qmp import QMPClient

WIDTH, HEIGHT = 1920, 1080
PPM_HEADER = b"P6\n1920 1080\n255\n"
PPM_SIZE = len(PPM_HEADER) + WIDTH * HEIGHT * 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check(ok, what):
    if not ok:
        sys.exit(f"FAIL: {what}")


async def connect_async(socket, name):
    """A qemu.qmp client that negotiates `async` (qemu.qmp itself would ask for `oob` only)."""
    qmp = QMPClient(name)
    qmp.negotiate = False
    await qmp.connect(socket)
    caps = qmp.greeting.QMP.capabilities
    check("async" in caps, f"{name}: greeting offers async: {caps}")
    reply = await qmp.execute("qmp_capabilities", {"enable": ["oob", "async"]})
    check(reply == {}, f"{name}: qmp_capabilities returned {reply}")
    return qmp


async def wait_until(predicate, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        check(time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)


def check_ppm(path):
    with open(path, "rb") as f:
        data = f.read()
    check(data[: len(PPM_HEADER)] == PPM_HEADER, f"{path}: PPM header {data[:20]!r}")
    check(len(data) == PPM_SIZE, f"{path}: {len(data)} bytes, expected {PPM_SIZE}")


def check_png(path):
    """Signature, IHDR (1920x1080, 8-bit RGB), and a full decompression of the IDAT stream:
    enough to know the file is complete without an image library."""
    with open(path, "rb") as f:
        data = f.read()
    check(data.startswith(PNG_SIGNATURE), f"{path}: PNG signature {data[:8]!r}")
    pos, chunks = len(PNG_SIGNATURE), []
    while pos < len(data):
        (length, kind) = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        check(zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}")
        chunks.append((kind, body))
        pos += 12 + length
    check(chunks[0][0] == b"IHDR", f"{path}: first chunk {chunks[0][0]!r}")
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    check((width, height) == (WIDTH, HEIGHT), f"{path}: IHDR size {width}x{height}")
    check((depth, colour) == (8, 2), f"{path}: IHDR depth {depth}, colour type {colour}")
    check(chunks[-1][0] == b"IEND", f"{path}: last chunk {chunks[-1][0]!r}")
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    # Each row: one filter-type byte, then RGB.
    expected = HEIGHT * (1 + WIDTH * 3)
    check(len(pixels) == expected, f"{path}: {len(pixels)} decoded bytes, expected {expected}")
