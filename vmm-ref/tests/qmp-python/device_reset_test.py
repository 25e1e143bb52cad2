#!/usr/bin/env python3
"""A guest-driven device reset seen through QEMU's own Python client (`qemu.qmp`).

The test guest runs `scenario=hold,reset,hold` with a long `reset.pause_ms`: it keeps
drive d0 active, then resets the device (status 0) and waits before re-initialising
it, then holds again and exits. query-iothreads must show the holder present, then
gone while the device is reset, then back after the driver re-activates it.

Usage: device_reset_test.py SOCKET [DEVICE_QOM_PATH]
"""

import asyncio
import sys

from qemu.qmp import QMPClient

DEVICE = sys.argv[2] if len(sys.argv) > 2 else "/machine/peripheral/d0/virtio-backend"
POLL_S = 0.05
LIMIT_S = 120


async def holders(qmp):
    threads = await qmp.execute("query-iothreads")
    return {
        t["id"]: [h.get("qom-path") for h in t["holders"] if h["type"] == "qom-object"]
        for t in threads
    }


async def wait_for(qmp, held, what):
    for _ in range(int(LIMIT_S / POLL_S)):
        now = await holders(qmp)
        if all((DEVICE in now[t]) == held for t in ("io0", "io1")):
            print(f"ok - {what}: {now}")
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for: {what}")


async def main(sock):
    qmp = QMPClient("device-reset-test")
    await qmp.connect(sock)
    await wait_for(qmp, True, "holders present while the driver is active")
    await wait_for(qmp, False, "holders gone after the guest reset the device")
    await wait_for(qmp, True, "holders back after the guest re-activated it")
    await qmp.disconnect()
    print("all checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
