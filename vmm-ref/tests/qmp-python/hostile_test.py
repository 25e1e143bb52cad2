#!/usr/bin/env python3
"""Hostile and broken QMP clients against a vmm-ref QMP socket (raw sockets, no client
library): each gets an error reply or is dropped alone, and a well-behaved client
(QEMU's own qemu.qmp.QMPClient) keeps being served throughout.

Usage: hostile_test.py SOCKET   (does not quit the VM)
"""

import asyncio
import json
import socket
import sys
import threading

from qemu.qmp import QMPClient

TIMEOUT = 60


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok - {what}")


class Raw:
    """A raw QMP connection; replies are one JSON object per line."""

    def __init__(self, path, negotiate=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.buf = b""
        self.greeting = self.msg()
        if negotiate:
            assert self.request(b'{"execute": "qmp_capabilities"}') == {"return": {}}

    def msg(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def reply(self):
        while True:
            m = self.msg()
            if "event" not in m:
                return m

    def request(self, data):
        self.sock.sendall(data + b"\n")
        return self.reply()


async def good_client(path):
    qmp = QMPClient("good")
    await qmp.connect(path)
    return qmp


async def still_served(qmp, what):
    status = await asyncio.wait_for(qmp.execute("query-status"), TIMEOUT)
    check("status" in status, f"well-behaved client still served ({what})")


async def main(path):
    good = await good_client(path)

    # Malformed JSON, wrong types, unknown commands and members: error replies, and the
    # same connection keeps working.
    c = Raw(path)
    cases = [
        (b'{"execute": query-status}', "JSON parse error"),
        (b'[1, 2]', "QMP input must be a JSON object"),
        (b'{"execute": 42}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "no-such-cmd"}', "The command no-such-cmd has not been found"),
        (b'{"execute": "query-status", "foo": 1}', "QMP input member 'foo' is unexpected"),
        (b'{"execute": "query-status", "arguments": {"foo": 1}}',
         "Parameter 'foo' is unexpected"),
        (b'{"execute": "qom-set", "arguments": {"path": "/objects/io0",'
         b' "property": "poll-weight", "value": "x"}}',
         "Invalid parameter type for 'poll-weight', expected: integer"),
    ]
    for data, desc in cases:
        r = c.request(data)
        check(desc in r.get("error", {}).get("desc", ""), f"error reply: {desc}")
    check("return" in c.request(b'{"execute": "query-status"}'), "connection recovers")

    # A 100 MiB line, sent in 1 MiB chunks from a thread, while the good client works.
    big = Raw(path)

    def send_big():
        big.sock.sendall(b'{"execute": "query-status", "arguments": {"x": "')
        chunk = b"a" * (1 << 20)
        for _ in range(100):
            big.sock.sendall(chunk)
        big.sock.sendall(b'"}}\n{"execute": "query-version", "id": "after"}\n')

    sender = threading.Thread(target=send_big)
    sender.start()
    for i in range(10):
        await still_served(good, f"during the 100 MiB line, {i}")
    r = big.reply()
    check("size limit exceeded" in r.get("error", {}).get("desc", ""),
          f"100 MiB line refused: {r['error']['desc']}")
    sender.join()
    r = big.reply()
    check(r.get("id") == "after" and "return" in r, "same connection serves the next request")

    # A client that sends requests but never reads its replies: the server stops reading
    # it once its output queue is full; nobody else notices.
    lazy = Raw(path)
    lazy.sock.setblocking(False)
    sent = 0
    request = b'{"execute": "query-iothreads"}\n'
    try:
        while sent < (256 << 20):
            sent += lazy.sock.send(request * 256)
    except BlockingIOError:
        pass
    check(sent < (256 << 20), f"server stopped reading the lazy client after {sent} bytes")
    await still_served(good, "with a client that never reads")

    # Clients that disconnect mid-command.
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-st')
        s.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-iothreads"}')
        s.close()
    await still_served(good, "after clients vanished mid-command")
    lazy.sock.close()

    # Several clients at once.
    clients = [await good_client(path) for _ in range(4)]
    results = await asyncio.gather(*(q.execute("query-iothreads") for q in clients))
    check(all(r == results[0] for r in results), "4 more clients served at once")
    for q in clients + [good]:
        await q.disconnect()
    print("all hostile-client checks passed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
