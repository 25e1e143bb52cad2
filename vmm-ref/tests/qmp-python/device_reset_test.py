#!/usr/bin/env python3
"""A guest-driven device reset seen through QEMU's own Python client (`qemu.qmp`).

The test guest runs `scenario=hold,reset,hold` with a long `reset.pause_ms`: it keeps
drive d0 active, then resets the device (status 0) and waits before re-initialising
it, then holds again and exits. query-block must show the device activated, then not,
then activated again, while query-iothreads shows the holder on both IOThreads the
whole time (holders follow attachment, not activation).

Usage: device_reset_test.py SOCKET [DEVICE_QOM_PATH]
"""

import asyncio
import sys

from qemu.qmp import QMPClient

DEVICE = sys.argv[2] if len(sys.argv) > 2 else "/machine/peripheral/d0/virtio-backend"
POLL_S = 0.02
LIMIT_S = 120


async def holders(qmp):
    threads = await qmp.execute("query-iothreads")
    return {
        t["id"]: [h.get("qom-path") for h in t["holders"] if h["type"] == "qom-object"]
        for t in threads
    }


async def main(sock):
    qmp = QMPClient("device-reset-test")
    await qmp.connect(sock)
    seen = []
    for _ in range(int(LIMIT_S / POLL_S)):
        activated = (await qmp.execute("query-block"))[0]["activated"]
        now = await holders(qmp)
        if any(now[t] != [DEVICE] for t in ("io0", "io1")):
            raise AssertionError(f"holders changed (activated={activated}): {now}")
        if not seen or seen[-1] != activated:
            seen.append(activated)
            print(f"ok - activated={activated}, holders unchanged: {now}")
        # Not yet activated when we connected, or already: either way, then
        # reset and re-activated.
        if seen[-3:] == [True, False, True]:
            break
        await asyncio.sleep(POLL_S)
    else:
        raise AssertionError(f"timed out; activation states seen: {seen}")
    await qmp.disconnect()
    print("all checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
