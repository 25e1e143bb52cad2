#!/usr/bin/env python3
"""Drive a vmm-ref QMP socket with QEMU's own Python client (PyPI `qemu.qmp`).

Usage: qmp_client_test.py SOCKET [DEVICE_QOM_PATH]

Run by `run_real_vmm.sh` against vmm-ref with the test guest in `scenario=hold` and a
drive d0 whose queues are mapped to IOThreads io0 and io1 (DEVICE defaults to its QOM
path). Exits non-zero on the first failed check.
"""

import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient

# The device holding io0 and io1.
DEVICE = sys.argv[2] if len(sys.argv) > 2 else "/machine/peripheral/d0/virtio-backend"


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok - {what}")


def holders(threads, tid):
    for t in threads:
        if t["id"] == tid:
            return [h.get("qom-path") or h.get("node-name") for h in t["holders"]]
    raise AssertionError(f"no IOThread {tid} in {threads}")


async def expect_error(qmp, cmd, args, needle):
    try:
        await qmp.execute(cmd, args)
    except ExecuteError as err:
        check(needle in str(err), f"{cmd} refused: {err} ({err.error_class})")
        return err
    raise AssertionError(f"{cmd} {args} unexpectedly succeeded")


async def next_event(qmp, name):
    while True:
        event = await asyncio.wait_for(qmp.events.get(), timeout=30)
        if event["event"] == name:
            return event


async def main(sock):
    qmp = QMPClient("vmm-ref-test")
    await qmp.connect(sock)  # greeting + qmp_capabilities
    greeting = qmp.greeting._asdict() if qmp.greeting is not None else {}
    check("vmm-ref" in greeting["QMP"]["version"]["package"],
          f"greeting {greeting['QMP']}")

    status = await qmp.execute("query-status")
    check(status == {"status": "running", "running": True}, f"query-status {status}")

    version = await qmp.execute("query-version")
    check("qemu" in version and "package" in version, f"query-version {version}")

    names = {c["name"] for c in await qmp.execute("query-commands")}
    check({"query-iothreads", "qom-set", "object-add", "quit"} <= names, "query-commands")

    threads = await qmp.execute("query-iothreads")
    check([t["id"] for t in threads][:2] == ["io0", "io1"], "query-iothreads ids")
    check(list(threads[0].keys()) == ["id", "thread-id", "holders", "poll-max-ns",
                                      "poll-grow", "poll-shrink", "poll-weight",
                                      "aio-max-batch"], "query-iothreads field order")
    check(DEVICE in holders(threads, "io0"), f"io0 holders {holders(threads, 'io0')}")

    # qom-set poll-weight=5, visible in qom-get and query-iothreads.
    await qmp.execute("qom-set", {"path": "/objects/io1", "property": "poll-weight",
                                  "value": 5})
    got = await qmp.execute("qom-get", {"path": "/objects/io1", "property": "poll-weight"})
    check(got == 5, f"qom-get poll-weight = {got}")
    threads = await qmp.execute("query-iothreads")
    check(threads[1]["poll-weight"] == 5, "query-iothreads shows poll-weight 5")
    # ... and the IOThread's loop applies it (its statistics report the parameters in
    # use; the loop picks them up on its next iteration).
    for _ in range(600):
        stats = await qmp.execute("x-query-iothread-stats", {"id": "io1"})
        if stats[0]["poll"]["params"]["weight"] == 5:
            break
        await asyncio.sleep(0.05)
    check(stats[0]["poll"]["params"]["weight"] == 5,
          f"IOThread statistics show weight 5 (param-updates "
          f"{stats[0]['poll']['param_updates']})")
    await expect_error(qmp, "qom-set", {"path": "/objects/io1", "property": "poll-weight",
                                        "value": "5"}, "expected: integer")
    await expect_error(qmp, "qom-get", {"path": "/objects/nope", "property": "poll-weight"},
                       "not found")

    # object-add / object-del of an unused IOThread.
    await qmp.execute("object-add", {"qom-type": "iothread", "id": "io9",
                                     "poll-max-ns": 0})
    threads = await qmp.execute("query-iothreads")
    check("io9" in [t["id"] for t in threads], "object-add io9")
    await qmp.execute("object-del", {"id": "io9"})
    threads = await qmp.execute("query-iothreads")
    check("io9" not in [t["id"] for t in threads], "object-del io9")
    await expect_error(qmp, "object-add", {"qom-type": "iothread", "id": "io8", "bogus": 1},
                       "Parameter 'bogus' is unexpected")

    # Deleting a held IOThread is refused, naming the holder.
    await expect_error(qmp, "object-del", {"id": "io0"}, DEVICE)

    # HMP passthrough.
    text = await qmp.execute("human-monitor-command", {"command-line": "info iothreads"})
    check(text.startswith("io0:") and "poll-weight=5" in text, "HMP info iothreads")

    # VM reset: the queues stop and restart, the holders stay (attachment).
    await qmp.execute("system_reset")
    check(DEVICE in holders(await qmp.execute("query-iothreads"), "io0"),
          "holders kept right after system_reset")
    event = await next_event(qmp, "RESET")
    check(event["data"] == {"guest": False, "reason": "host-qmp-system-reset"},
          f"RESET event {event['data']}")
    threads = await qmp.execute("query-iothreads")
    check(DEVICE in holders(threads, "io0") and DEVICE in holders(threads, "io1"),
          "holders kept after system_reset")

    # quit: reply, then SHUTDOWN, then the server goes away.
    await qmp.execute("quit")
    event = await next_event(qmp, "SHUTDOWN")
    check(event["data"] == {"guest": False, "reason": "host-qmp-quit"}, "SHUTDOWN event")
    try:
        await qmp.disconnect()
    except Exception as err:  # the peer closed first; that is expected after quit
        print(f"# disconnect after quit: {type(err).__name__}: {err}")
    print("all checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
