#!/usr/bin/env python3
"""Capture real request/reply examples for every QMP command from a running server
and print them as Markdown (used to write vmm-ref/docs/qmp.md).

Usage: capture_examples.py SOCKET  (ends the server with `quit`)

Talks raw JSON over the socket (no client library) so that the replies are shown
byte-for-byte as the server sent them, field order included.
"""

import json
import socket
import sys

# (title, request) in the order they are run; the session state carries over.
STEPS = [
    ("qmp_capabilities", {"execute": "qmp_capabilities"}),
    ("qmp_capabilities (again)", {"execute": "qmp_capabilities"}),
    ("query-version", {"execute": "query-version", "id": 1}),
    ("query-status", {"execute": "query-status", "id": 2}),
    ("query-commands", {"execute": "query-commands"}),
    ("query-iothreads", {"execute": "query-iothreads"}),
    ("x-query-iothread-stats", {"execute": "x-query-iothread-stats",
                                "arguments": {"id": "io0"}}),
    ("qom-get", {"execute": "qom-get",
                 "arguments": {"path": "/objects/io1", "property": "poll-weight"}}),
    ("qom-set", {"execute": "qom-set",
                 "arguments": {"path": "/objects/io1", "property": "poll-weight",
                               "value": 5}}),
    ("qom-get (after qom-set)", {"execute": "qom-get",
                                 "arguments": {"path": "/objects/io1",
                                               "property": "poll-weight"}}),
    ("qom-set: wrong type", {"execute": "qom-set",
                             "arguments": {"path": "/objects/io1",
                                           "property": "poll-weight", "value": "5"}}),
    ("qom-set: out of range", {"execute": "qom-set",
                               "arguments": {"path": "/objects/io1",
                                             "property": "poll-weight", "value": 64}}),
    ("qom-get: unknown property", {"execute": "qom-get",
                                   "arguments": {"path": "/objects/io1",
                                                 "property": "poll-max"}}),
    ("qom-get: unknown object", {"execute": "qom-get",
                                 "arguments": {"path": "/objects/io7",
                                               "property": "poll-weight"}}),
    ("object-add", {"execute": "object-add",
                    "arguments": {"qom-type": "iothread", "id": "io2",
                                  "poll-max-ns": 0, "poll-weight": 4}}),
    ("query-iothreads (after object-add)", {"execute": "query-iothreads"}),
    ("object-add: duplicate id", {"execute": "object-add",
                                  "arguments": {"qom-type": "iothread", "id": "io2"}}),
    ("object-add: unknown member", {"execute": "object-add",
                                    "arguments": {"qom-type": "iothread", "id": "io3",
                                                  "thread-pool-max": 4}}),
    ("object-add: other qom-type", {"execute": "object-add",
                                    "arguments": {"qom-type": "memory-backend-ram",
                                                  "id": "mem0", "size": 1048576}}),
    ("x-drive-set-iothreads", {"execute": "x-drive-set-iothreads",
                               "arguments": {"id": "d0", "iothread-vq-mapping": ["io2", "io1"]}}),
    ("query-iothreads (after x-drive-set-iothreads)", {"execute": "query-iothreads"}),
    ("x-drive-set-iothreads: explicit vqs", {"execute": "x-drive-set-iothreads",
                                             "arguments": {"id": "d0", "iothread-vq-mapping": [
                                                 {"iothread": "io0", "vqs": [0, 1]}]}}),
    ("x-drive-set-iothreads: unknown IOThread", {"execute": "x-drive-set-iothreads",
                                                 "arguments": {"id": "d0", "iothread": "io7"}}),
    ("x-drive-set-iothreads: unknown drive", {"execute": "x-drive-set-iothreads",
                                              "arguments": {"id": "d7", "iothread": "io0"}}),
    ("x-drive-set-iothreads: back to io0:io1", {"execute": "x-drive-set-iothreads",
                                                "arguments": {"id": "d0",
                                                              "iothread-vq-mapping": ["io0", "io1"]}}),
    ("object-del", {"execute": "object-del", "arguments": {"id": "io2"}}),
    ("object-del: held IOThread", {"execute": "object-del", "arguments": {"id": "io0"}}),
    ("object-del: unknown id", {"execute": "object-del", "arguments": {"id": "io2"}}),
    ("query-block", {"execute": "query-block"}),
    ("human-monitor-command: info iothreads",
     {"execute": "human-monitor-command", "arguments": {"command-line": "info iothreads"}}),
    ("human-monitor-command: info status",
     {"execute": "human-monitor-command", "arguments": {"command-line": "info status"}}),
    ("human-monitor-command: info version",
     {"execute": "human-monitor-command", "arguments": {"command-line": "info version"}}),
    ("human-monitor-command: info block",
     {"execute": "human-monitor-command", "arguments": {"command-line": "info block"}}),
    ("human-monitor-command: object_add",
     {"execute": "human-monitor-command",
      "arguments": {"command-line": "object_add iothread,id=io4,poll-weight=7"}}),
    ("human-monitor-command: qom-get",
     {"execute": "human-monitor-command",
      "arguments": {"command-line": "qom-get /objects/io4 poll-weight"}}),
    ("human-monitor-command: qom-set with a bad value",
     {"execute": "human-monitor-command",
      "arguments": {"command-line": "qom-set /objects/io4 poll-weight 99"}}),
    ("human-monitor-command: object_del",
     {"execute": "human-monitor-command",
      "arguments": {"command-line": "object_del io4"}}),
    ("human-monitor-command: help",
     {"execute": "human-monitor-command", "arguments": {"command-line": "help"}}),
    ("human-monitor-command: unknown",
     {"execute": "human-monitor-command", "arguments": {"command-line": "frobnicate"}}),
    ("system_reset", {"execute": "system_reset"}),
    ("stop", {"execute": "stop"}),
    ("stop: already stopped", {"execute": "stop"}),
    ("cont", {"execute": "cont"}),
    ("unknown command", {"execute": "query-cpus-fast", "id": "c1"}),
    ("missing argument", {"execute": "object-del", "arguments": {}}),
    ("wrong request member type", {"execute": 42, "id": 7}),
    ("quit", {"execute": "quit"}),
]

RAW_STEPS = [
    ("malformed JSON", b'{"execute": query-status}\n'),
    ("not an object", b'[1, 2, 3]\n'),
]


class Conn:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buf = b""

    def line(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r").decode()

    def send(self, data):
        self.sock.sendall(data)

    def reply(self):
        """Next non-event message, plus events seen before it."""
        events = []
        while True:
            text = self.line()
            if '"event"' in text and json.loads(text).get("event"):
                events.append(text)
            else:
                return text, events


def block(lines):
    return "```\n" + "\n".join(lines) + "\n```\n"


INTRO = """# vmm-ref QMP commands

vmm-ref speaks QEMU's machine protocol (QMP, `docs/interop/qmp-spec.rst`) on the
Unix socket given with `--qmp unix:/path` (mode 0600; a stale socket file is replaced,
any other file is refused). Several clients may be connected at once (at most 16).

Every example below was captured from a real run by `py/capture_examples.py`
(`->` is what the client sent, `<-` what the server answered, one message per line,
each terminated by `\\r\\n`). {origin}

## Protocol

* On connect the server sends the greeting. Until the client runs `qmp_capabilities`
  every other command is refused with `CommandNotFound`; no capabilities are offered
  (`exec-oob` is refused).
* Requests: `{"execute": NAME, "arguments": {...}, "id": ANY}`; `arguments` and `id`
  are optional, `id` is echoed in the reply (also in error replies). Any other member
  is refused ("QMP input member 'x' is unexpected").
* Replies: `{"return": VALUE, "id": ...}` or
  `{"error": {"class": CLASS, "desc": TEXT}, "id": ...}`. Classes: `GenericError`,
  `CommandNotFound`, and `DeviceNotFound` for `qom-get`/`qom-set` on a path that does
  not exist (as QEMU).
* Arguments are parsed into typed structures; unknown members, missing members and
  wrong JSON types are refused with QEMU's messages ("Parameter 'x' is unexpected",
  "Parameter 'id' is missing", "Invalid parameter type for 'x', expected: integer").
* Input is a stream of JSON values, split on balanced brackets, not on lines: several
  requests may share a line and one request may span several lines or writes.
  Malformed JSON gets one `GenericError` ("JSON parse error, ...") and decoding resumes
  after the offending message. A byte `0xFF` resets the parser.
* Size limit: one JSON message may be at most **1 MiB** (1048576 bytes) and nest at
  most 64 levels. A longer message gets the error "JSON message size limit exceeded
  (1048576 bytes)" as soon as the limit is crossed; its remainder is skipped without
  being buffered and the connection then carries on.
* Output is queued per client (at most 4 MiB). A client that does not read its replies
  stops being read; one whose queue still overflows (events while it never reads) is
  disconnected; other clients are unaffected.
* Events: `{"timestamp": {"seconds": S, "microseconds": US}, "event": NAME,
  "data": {...}}`, sent to every client that finished negotiation. vmm-ref emits
  `RESET` and `SHUTDOWN` (`"guest": false` with reason `host-qmp-system-reset` /
  `host-qmp-quit` when asked over QMP, `host-signal` on SIGINT/SIGTERM/SIGHUP,
  `host-error` when a vCPU failed; `"guest": true` when the guest resets or stops),
  `STOP` and `RESUME` (no `data`; after `stop` / `cont` changed the run state).
"""

DESCRIPTIONS = {
    "protocol": ("Greeting, negotiation and protocol errors", ""),
    "qmp_capabilities": ("qmp_capabilities", "Leaves capabilities negotiation mode. "
                         "Arguments: `enable` (optional list; no capability is "
                         "available). Returns `{}`."),
    "query-version": ("query-version", "Returns `{\"qemu\": {\"micro\", \"minor\", "
                      "\"major\"}, \"package\"}` (vmm-ref's version)."),
    "query-status": ("query-status", "Returns `{\"status\": RUNSTATE, \"running\": "
                     "BOOL}`; run states use QEMU's names (`prelaunch`, `running`, "
                     "`paused`, `shutdown`, `internal-error`, ...)."),
    "query-commands": ("query-commands", "Lists every command as `{\"name\": ...}`."),
    "query-iothreads": ("query-iothreads", "One element per IOThread, in creation order: "
                        "`id`, `thread-id` (host TID), `holders` (who uses the IOThread: "
                        "`{\"type\": \"qom-object\", \"qom-path\"}` for devices, "
                        "`{\"type\": \"block-node\", \"node-name\"}` for block "
                        "exports), then the live parameters `poll-max-ns`, `poll-grow`, "
                        "`poll-shrink`, `poll-weight`, `aio-max-batch`."),
    "x-query-iothread-stats": ("x-query-iothread-stats", "Extension (QEMU has no "
                               "equivalent): each IOThread's event-loop statistics "
                               "(`state`, `cpu-time-ns`, and `poll`: loop iterations, busy-"
                               "poll time, adaptive grow/shrink steps, the current "
                               "polling window, per-handler counters, and `params`, the "
                               "polling parameters the loop actually applies). Argument: "
                               "`id` (optional; default all IOThreads in creation order)."),
    "qom-get": ("qom-get", "Arguments: `path` (`/objects/<iothread id>`), `property` "
                "(`poll-max-ns`, `poll-grow`, `poll-shrink`, `poll-weight`, "
                "`aio-max-batch`, or `type`). Returns the value."),
    "qom-set": ("qom-set", "Arguments: `path`, `property` (as `qom-get`, not `type`), "
                "`value` (integer). Applied live: the IOThread resets its adaptive "
                "polling state and wakes up. Negative values are refused; `poll-weight` "
                "is 0..63; 0 selects the default for grow/shrink/weight."),
    "object-add": ("object-add", "Creates an IOThread. Arguments: `qom-type` "
                   "(`iothread` only), `id`, and optionally `poll-max-ns`, `poll-grow`, "
                   "`poll-shrink`, `poll-weight`, `aio-max-batch`. Returns `{}` once the "
                   "thread runs."),
    "object-del": ("object-del", "Stops and removes an IOThread. Argument: `id`. "
                   "Refused while the IOThread has holders; the error names them."),
    "query-block": ("query-block", "One element per virtio-blk drive (vmm-ref's schema): "
                    "`device`, `qdev` (QOM path, the holder name), `file`, `read-only`, "
                    "`direct`, `format`, `engine`, `num-queues`, `queue-size`, "
                    "`activated` (the driver set DRIVER_OK, so the queues run; the "
                    "drive holds its IOThreads either way) and `queues` (per virtqueue: its IOThread and the "
                    "`requests`, `notifications` (guest kicks that woke it), "
                    "`interrupts` and `errors` counted since the drive was created)."),
    "x-drive-set-iothreads": ("x-drive-set-iothreads", "Extension (after QEMU's "
                              "`x-blockdev-set-iothread`): moves a running drive's queues "
                              "to other IOThreads. Arguments: `id` (drive) and exactly one "
                              "of `iothread` (one IOThread for every queue) and "
                              "`iothread-vq-mapping` (QEMU's list of `{\"iothread\", "
                              "\"vqs\"}` objects, or a list of IOThread names served "
                              "round-robin), validated like at start-up. The queues "
                              "quiesce (in-flight requests complete), their handlers move, "
                              "and the holder moves in one step: `query-iothreads` shows "
                              "the drive on the old or on the new IOThreads, never on "
                              "neither or both. Works whether or not the driver activated "
                              "the device. On error the old mapping stays. Returns `{}`."),
    "human-monitor-command": ("human-monitor-command", "Runs an HMP command line and "
                              "returns its text. Arguments: `command-line`, `cpu-index` "
                              "(optional, ignored). Supported: `info iothreads`, `info "
                              "status`, `info version`, `info block`, `info`, `help`, "
                              "`qom-get PATH PROP`, `qom-set PATH PROP VALUE`, `object_add "
                              "iothread,id=ID[,PROP=VALUE...]`, `object_del ID` (these run "
                              "the QMP commands; errors print as `Error: ...`). "
                              "Unknown commands return HMP's text \"unknown command: "
                              "'...'\" (not an error), as QEMU does."),
    "system_reset": ("system_reset", "Resets the machine: devices are reset (their "
                     "queues stop; drives keep holding their IOThreads) and the guest "
                     "restarts. Replies `{}`, then the "
                     "`RESET` event."),
    "stop": ("stop", "Stops the guest: every vCPU leaves the guest and stays out until "
             "`cont`; `query-status` says `paused`. Requests already queued complete on "
             "their IOThreads; kvmclock is saved and restored at `cont`, so the guest's "
             "clock does not count the stop. Replies `{}`, then the `STOP` event if the "
             "guest was running (stopping a stopped machine succeeds without one)."),
    "cont": ("cont", "Lets a stopped guest run again (a `system_reset` done while "
             "stopped takes effect now). Replies `{}`, then the `RESUME` event if the "
             "guest was stopped."),
    "quit": ("quit", "Stops vmm-ref. Replies `{}`, then the `SHUTDOWN` event, then the "
             "VMM exits and the socket goes away."),
}

# (section, subtitle, request or raw bytes)
PLAN = [("protocol", "Any command before `qmp_capabilities`", {"execute": "query-status"})]
PLAN += [("qmp_capabilities", t, r) for t, r in STEPS[:2]]
PLAN += [("protocol", t, raw) for t, raw in RAW_STEPS]
for t, r in STEPS[2:]:
    name = t.split(" ")[0].rstrip(":")
    if name in DESCRIPTIONS:
        PLAN.append((name, t, r))
    else:
        PLAN.append(("protocol", t, r))


def main(path, origin):
    c = Conn(path)
    sections = {k: [] for k in DESCRIPTIONS}
    sections["protocol"].append(("Greeting (sent on connect)", ["<- " + c.line()]))
    for section, title, req in PLAN:
        if isinstance(req, bytes):
            c.send(req)
            shown = req.decode().strip()
        else:
            shown = json.dumps(req)
            c.send(shown.encode() + b"\n")
        text, events = c.reply()
        lines = ["-> " + shown] + ["<- " + e for e in events] + ["<- " + text]
        if title in ("system_reset", "stop", "cont", "quit"):
            # The event follows the reply.
            try:
                lines.append("<- " + c.line())
            except EOFError:
                pass
        sections[section].append((title, lines))
    out = [INTRO.replace("{origin}", origin)]
    for key, (heading, text) in DESCRIPTIONS.items():
        out.append(f"## {heading}\n")
        if text:
            out.append(text + "\n")
        for title, lines in sections[key]:
            if title != heading:
                out.append(f"{title}:\n")
            out.append(block(lines))
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
