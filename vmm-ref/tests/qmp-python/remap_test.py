#!/usr/bin/env python3
"""Live re-mapping through QEMU's own Python client (`qemu.qmp`): while the test guest
verifies its data in a loop (`scenario=verify verify.until_input=1`, requests in
flight on all 4 queues of drive d0), `x-drive-set-iothreads` moves the queues 100
times between IOThreads io0..io3. After every move query-block shows the new
per-queue IOThreads and query-iothreads the holder on exactly the new set; every
queue keeps serving requests. The caller then ends the guest's loop (serial input)
and checks its RESULT line.

Usage: remap_test.py SOCKET [DEVICE_QOM_PATH]
"""

import asyncio
import sys

from qemu.qmp import QMPClient

DEVICE = sys.argv[2] if len(sys.argv) > 2 else "/machine/peripheral/d0/virtio-backend"
LIMIT_S = 120
MAPPINGS = [
    ({"iothread-vq-mapping": ["io1", "io2", "io3", "io0"]}, ["io1", "io2", "io3", "io0"]),
    ({"iothread": "io2"}, ["io2"] * 4),
    ({"iothread-vq-mapping": [{"iothread": "io3", "vqs": [0, 1]},
                              {"iothread": "io0", "vqs": [2, 3]}]},
     ["io3", "io3", "io0", "io0"]),
    ({"iothread-vq-mapping": ["io0", "io1", "io2", "io3"]}, ["io0", "io1", "io2", "io3"]),
]


def check(cond, what):
    if not cond:
        raise AssertionError(what)


async def held(qmp):
    on = []
    for t in await qmp.execute("query-iothreads"):
        mine = [h for h in t["holders"] if h.get("qom-path") == DEVICE]
        check(len(mine) <= 1, f"{t['id']} lists the drive {len(mine)} times")
        check(len(mine) == len(t["holders"]), f"unexpected holders on {t['id']}")
        if mine:
            on.append(t["id"])
    return sorted(on)


async def queues(qmp):
    return (await qmp.execute("query-block"))[0]["queues"]


async def main(sock):
    qmp = QMPClient("remap-test")
    await qmp.connect(sock)
    for _ in range(LIMIT_S * 10):
        if (await qmp.execute("query-block"))[0]["activated"]:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the guest never activated d0")
    start = [q["requests"] for q in await queues(qmp)]
    for i in range(100):
        args, per_queue = MAPPINGS[i % len(MAPPINGS)]
        await qmp.execute("x-drive-set-iothreads", {"id": "d0", **args})
        check([q["iothread"] for q in await queues(qmp)] == per_queue,
              f"re-map {i}: query-block")
        check(await held(qmp) == sorted(set(per_queue)), f"re-map {i}: query-iothreads")
    print("ok - 100 re-maps, holders on exactly the new IOThreads after each")
    # A starved vCPU (loaded host) may issue nothing during the 100 quick re-maps:
    # wait for progress on every queue; a queue lost by a move never progresses.
    for _ in range(LIMIT_S * 10):
        end = [q["requests"] for q in await queues(qmp)]
        if all(b > a for a, b in zip(start, end)):
            break
        await asyncio.sleep(0.1)
    check(all(b > a for a, b in zip(start, end)), f"every queue served: {start} -> {end}")
    print(f"ok - requests per queue during the re-maps: {start} -> {end}")
    await qmp.disconnect()
    print("all checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
