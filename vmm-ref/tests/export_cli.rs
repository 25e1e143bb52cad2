//! `vmm-ref export`, black box (no KVM needed): bad options exit 2 with one
//! message and leave the image alone; a running daemon's exports hold their
//! IOThreads as `block-node` holders that QMP shows, `block-export-del`
//! releases and `block-export-add` takes again; `quit` and SIGTERM stop it
//! with status 0 and remove the sockets. The data path with a real Linux
//! guest is `ci/vhost-test.sh`'s job.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

/// Generous: the machine is shared and noisy.
const T: Duration = Duration::from_secs(120);

struct Fixture {
    dir: TempDir,
    disk: PathBuf,
    original: Vec<u8>,
    mtime: std::time::SystemTime,
}

fn fixture(tag: &str) -> Fixture {
    let dir = TempDir::new(tag);
    let disk = dir.join("disk.img");
    let original: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&disk, &original).unwrap();
    let mtime = std::fs::metadata(&disk).unwrap().modified().unwrap();
    Fixture {
        dir,
        disk,
        original,
        mtime,
    }
}

impl Fixture {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    fn drive(&self) -> String {
        format!("id=d0,file={}", self.disk.display())
    }

    fn assert_disk_untouched(&self) {
        assert_eq!(std::fs::read(&self.disk).unwrap(), self.original);
        assert_eq!(
            std::fs::metadata(&self.disk).unwrap().modified().unwrap(),
            self.mtime
        );
    }
}

/// Runs `vmm-ref export args...`; expects status 2 and exactly one
/// `error: ` line containing `message`.
fn expect_error(args: &[&str], message: &str) {
    let mut full = vec!["export"];
    full.extend_from_slice(args);
    let out = run_vmm(&full, T);
    assert_eq!(out.status, Some(2), "{args:?}: {out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one message: {out:?}");
    assert!(lines[0].starts_with("error: "), "{out:?}");
    assert!(
        lines[0].contains(message),
        "{args:?}: want {message:?} in {out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn bad_options_exit_2_and_touch_nothing() {
    let f = fixture("export-bad");
    let sock = f.path("e0.sock");
    let drive = f.drive();
    let export = |extra: &str| {
        format!("vhost-user-blk,id=e0,node-name=d0,addr=unix:{sock},iothread=io0{extra}")
    };
    let long_sock = socket_path_of_len(f.dir.path(), MAX_SOCKET_PATH + 1);
    let too_long = format!(
        "socket path is {} bytes long; the limit is {MAX_SOCKET_PATH}",
        MAX_SOCKET_PATH + 1
    );
    let export_too_long = format!("--export id=e0: {too_long}");
    let qmp_too_long = format!("--qmp: {too_long}");
    let cases: Vec<(Vec<String>, &str)> = vec![
        // Socket paths bind(2) cannot take (they used to fail at start with
        // status 1).
        (
            vec!["--export".into(), export("").replace(&sock, &long_sock)],
            export_too_long.as_str(),
        ),
        (
            vec![
                "--export".into(),
                export("").replace(
                    &format!("addr=unix:{sock}"),
                    &format!("addr.path={long_sock}"),
                ),
            ],
            export_too_long.as_str(),
        ),
        (
            vec![
                "--export".into(),
                export(""),
                "--qmp".into(),
                format!("unix:{long_sock}"),
            ],
            qmp_too_long.as_str(),
        ),
        (
            vec!["--export".into(), export(",bogus=1")],
            "--export id=e0: unknown option 'bogus'",
        ),
        // The device model's limit (65..256 used to pass here and fail at
        // start with status 1, naming "drive 'e0'").
        (
            vec!["--export".into(), export(",num-queues=65")],
            "--export id=e0: parameter 'num-queues' must be between 1 and 64",
        ),
        (
            vec!["--export".into(), export(",num-queues=256")],
            "--export id=e0: parameter 'num-queues' must be between 1 and 64",
        ),
        (
            vec!["--export".into(), export(",num-queues=0")],
            "--export id=e0: parameter 'num-queues' must be between 1 and 64",
        ),
        (
            vec!["--export".into(), export("").replace("io0", "io7")],
            "--export id=e0: invalid export options: invalid IOThread assignment",
        ),
        (
            vec!["--export".into(), export("").replace("d0", "d5")],
            "--export id=e0: node-name 'd5': no --drive with this id",
        ),
        (
            vec![
                "--export".into(),
                export("").replace("vhost-user-blk", "nbd"),
            ],
            "export type 'nbd' is not supported",
        ),
        (
            vec![
                "--export".into(),
                export("").replace(&format!("unix:{sock}"), "tcp:localhost:1"),
            ],
            "only unix:<path> is supported",
        ),
        (
            vec![
                "--export".into(),
                export("").replace(&sock, "/nonexistent-dir/e0.sock"),
            ],
            "--export id=e0: directory '/nonexistent-dir' does not exist",
        ),
        (
            vec![
                "--export".into(),
                export(""),
                "--qmp".into(),
                format!("unix:{sock}"),
            ],
            "is the QMP monitor's",
        ),
        (
            vec![
                "--export".into(),
                export(""),
                "--object".into(),
                "iothread,id=io0".into(),
            ],
            "--object iothread,id=io0: duplicate object id 'io0'",
        ),
        (
            vec![
                "--export".into(),
                export(""),
                "--object".into(),
                "iothread,id=io1,poll-weight=99".into(),
            ],
            "--object iothread,id=io1: invalid IOThread parameters",
        ),
        (vec![], "--export: at least one --export is required"),
    ];
    for (extra, message) in cases {
        let mut args: Vec<String> = vec![
            "--drive".into(),
            drive.clone(),
            "--object".into(),
            "iothread,id=io0".into(),
        ];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&args, message);
        f.assert_disk_untouched();
        assert!(!Path::new(&sock).exists(), "no socket left by {args:?}");
        assert!(
            !Path::new(&long_sock).exists(),
            "no socket left by {args:?}"
        );
    }
    // Drive errors.
    let missing = f.path("missing.img");
    expect_error(
        &[
            "--drive",
            &format!("id=d0,file={missing}"),
            "--qmp",
            "unix:/tmp/x.sock",
        ],
        "--drive id=d0: cannot open",
    );
    expect_error(
        &["--drive", &format!("{drive},readonly=maybe")],
        "--drive id=d0: invalid value 'maybe' for 'readonly': expected on, off, true or false",
    );
    // A FIFO as the image, read-only (which must not wait for a writer) or not.
    let fifo = f.path("fifo.img");
    mkfifo(Path::new(&fifo));
    for (ro, direct) in [(true, false), (true, true), (false, false), (false, true)] {
        let mut d = format!("id=d0,file={fifo}");
        if ro {
            d.push_str(",readonly=on");
        }
        if direct {
            d.push_str(",direct=on");
        }
        expect_error(
            &[
                "--drive",
                &d,
                "--object",
                "iothread,id=io0",
                "--export",
                &export(""),
            ],
            &format!("--drive id=d0: '{fifo}' is not a regular file or block device"),
        );
        assert!(!Path::new(&sock).exists(), "no socket left by {d}");
    }
    // A writable export of a read-only drive.
    expect_error(
        &[
            "--drive",
            &format!("{drive},readonly=on"),
            "--object",
            "iothread,id=io0",
            "--export",
            &export(",writable=on"),
        ],
        "--export id=e0: drive 'd0' is read-only: the export cannot be writable",
    );
    f.assert_disk_untouched();
    // One image under two names (a hard link), both writable: the first drive is
    // named, not an image lock held by this very process.
    let link = f.path("hard.img");
    std::fs::hard_link(&f.disk, &link).unwrap();
    expect_error(
        &[
            "--drive",
            &drive,
            "--drive",
            &format!("id=d1,file={link}"),
            "--object",
            "iothread,id=io0",
            "--export",
            &export(""),
        ],
        &format!("--drive id=d1: '{link}' is already used by drive 'd0'"),
    );
    f.assert_disk_untouched();
    assert!(!Path::new(&sock).exists(), "no socket left");
}

/// A spawned `vmm-ref export` with its QMP monitor.
struct Daemon {
    proc: Running,
    qmp: QmpClient,
}

fn spawn_daemon(args: &[String], qmp_sock: &Path) -> Daemon {
    let mut full = vec!["export".to_owned()];
    full.extend_from_slice(args);
    full.push("--qmp".into());
    full.push(format!("unix:{}", qmp_sock.display()));
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let proc = Running::spawn(&full);
    let line = proc.expect_line("vmm-ref export: ready", T);
    assert!(line.contains("ready"), "{line}");
    let qmp = QmpClient::connect(qmp_sock);
    Daemon { proc, qmp }
}

/// A QMP client that returns errors instead of panicking, and keeps events.
struct QmpClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl QmpClient {
    fn connect(path: &Path) -> QmpClient {
        let deadline = Instant::now() + T;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => panic!("connect {path:?}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(T)).unwrap();
        let mut c = QmpClient {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: Vec::new(),
        };
        assert!(c.read().get("QMP").is_some());
        assert_eq!(c.call("qmp_capabilities", Value::Null), Ok(json!({})));
        c
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read QMP");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// `Ok(return)` or `Err((class, desc))`.
    fn call(&mut self, cmd: &str, args: Value) -> Result<Value, (String, String)> {
        let mut req = json!({"execute": cmd});
        if !args.is_null() {
            req["arguments"] = args;
        }
        writeln!(self.writer, "{req}").unwrap();
        loop {
            let msg = self.read();
            if msg.get("event").is_some() {
                self.events.push(msg);
            } else if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            } else {
                let e = &msg["error"];
                return Err((
                    e["class"].as_str().unwrap_or_default().to_owned(),
                    e["desc"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    }

    fn ok(&mut self, cmd: &str, args: Value) -> Value {
        self.call(cmd, args)
            .unwrap_or_else(|e| panic!("{cmd} failed: {e:?}"))
    }

    /// Holders of IOThread `id` in `query-iothreads`.
    fn holders(&mut self, id: &str) -> Value {
        let list = self.ok("query-iothreads", Value::Null);
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap_or_else(|| panic!("no IOThread {id} in {list}"))["holders"]
            .clone()
    }

    /// Reads messages until event `name` arrives (it may already have).
    fn wait_event(&mut self, name: &str) -> Value {
        loop {
            if let Some(pos) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(pos);
            }
            let msg = self.read();
            assert!(msg.get("event").is_some(), "unexpected {msg}");
            self.events.push(msg);
        }
    }
}

fn add_args(id: &str, sock: &str, iothread: Value) -> Value {
    json!({
        "type": "vhost-user-blk", "id": id, "node-name": "d0",
        "addr": {"type": "unix", "path": sock}, "num-queues": 2, "iothread": iothread
    })
}

#[test]
fn qmp_manages_exports_and_their_iothread_holders() {
    let f = fixture("export-qmp");
    let sock = f.path("e0.sock");
    let qmp_sock = f.dir.join("qmp.sock");
    let disk1 = f.dir.join("disk1.img");
    std::fs::write(&disk1, vec![0u8; 1 << 16]).unwrap();
    let mut d = spawn_daemon(
        &[
            "--drive".into(),
            f.drive(),
            "--drive".into(),
            format!("id=d1,file={}", disk1.display()),
            "--object".into(),
            "iothread,id=io0".into(),
            "--object".into(),
            "iothread,id=io1,poll-max-ns=0".into(),
            "--export".into(),
            format!(
                "vhost-user-blk,id=e0,node-name=d0,addr=unix:{sock},num-queues=2,iothread-vq-mapping=io0:io1"
            ),
        ],
        &qmp_sock,
    );
    let q = &mut d.qmp;
    assert!(Path::new(&sock).exists());
    let holder = json!([{"type": "block-node", "node-name": "d0"}]);
    assert_eq!(q.holders("io0"), holder);
    assert_eq!(q.holders("io1"), holder);
    assert_eq!(
        q.ok("query-status", Value::Null),
        json!({"status": "running", "running": true})
    );
    assert_eq!(
        q.ok("query-block-exports", Value::Null),
        json!([{
            "type": "vhost-user-blk", "id": "e0", "node-name": "d0", "shutting-down": false,
            "addr": {"type": "unix", "path": sock}, "num-queues": 2,
            "iothreads": ["io0", "io1"], "writable": true, "connected": false
        }])
    );
    let blocks = q.ok("query-block", Value::Null);
    assert_eq!(blocks[0]["device"], "d0");
    assert_eq!(blocks[0]["qdev"], "export:e0");
    assert_eq!(blocks[0]["num-queues"], 2);
    let names: Vec<Value> = q
        .ok("query-commands", Value::Null)
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    for cmd in [
        "block-export-add",
        "block-export-del",
        "query-block-exports",
    ] {
        assert!(names.contains(&json!(cmd)), "{cmd} in {names:?}");
    }

    // A held IOThread cannot be deleted; the error names the holder.
    let (class, desc) = q.call("object-del", json!({"id": "io1"})).unwrap_err();
    assert_eq!(class, "GenericError");
    assert!(desc.contains("block-node d0"), "{desc}");
    assert_eq!(
        q.call("system_reset", Value::Null),
        Err((
            "GenericError".into(),
            "system_reset is not supported by the export daemon".into()
        ))
    );
    for cmd in ["stop", "cont"] {
        assert_eq!(
            q.call(cmd, Value::Null),
            Err((
                "GenericError".into(),
                format!("{cmd} is not supported by the export daemon")
            ))
        );
    }

    // Deleting the export releases the IOThreads and removes its socket.
    assert_eq!(q.ok("block-export-del", json!({"id": "e0"})), json!({}));
    let ev = q.wait_event("BLOCK_EXPORT_DELETED");
    assert_eq!(ev["data"], json!({"id": "e0"}));
    assert_eq!(q.holders("io0"), json!([]));
    assert_eq!(q.holders("io1"), json!([]));
    assert!(!Path::new(&sock).exists());
    assert_eq!(q.ok("query-block-exports", Value::Null), json!([]));
    assert_eq!(
        q.call("block-export-del", json!({"id": "e0"})),
        Err(("GenericError".into(), "Export 'e0' is not found".into()))
    );

    // Added again through QMP (both queues on io1 this time): holder back.
    assert_eq!(
        q.ok("block-export-add", add_args("e0", &sock, json!("io1"))),
        json!({})
    );
    assert_eq!(q.holders("io1"), holder);
    assert_eq!(q.holders("io0"), json!([]));
    assert!(Path::new(&sock).exists());
    let (_, desc) = q.call("object-del", json!({"id": "io1"})).unwrap_err();
    assert!(desc.contains("block-node d0"), "{desc}");
    // io0 is free again: deleting it works.
    assert_eq!(q.ok("object-del", json!({"id": "io0"})), json!({}));

    // Refused additions leave nothing behind.
    let other = f.path("e1.sock");
    let long_sock = socket_path_of_len(f.dir.path(), MAX_SOCKET_PATH + 1);
    let long_sock_refused = format!(
        "invalid options for export 'e1': socket path is {} bytes long; the limit is {MAX_SOCKET_PATH}",
        MAX_SOCKET_PATH + 1
    );
    for (args, want) in [
        (
            add_args("e0", &other, json!("io1")),
            "Block export id 'e0' is already in use",
        ),
        (
            add_args("e1", &sock, json!("io1")),
            "is already used by export 'e0'",
        ),
        (
            add_args("e1", &other, json!("io1")),
            "drive 'd0' is already exported by 'e0'",
        ),
        (
            add_args("e1", &other, json!("io0")),
            "invalid IOThread assignment",
        ),
        (
            {
                let mut a = add_args("e1", &other, json!("io1"));
                a["node-name"] = json!("nope");
                a
            },
            "Cannot find device= nor node-name=nope",
        ),
        (
            {
                let mut a = add_args("e1", qmp_sock.to_str().unwrap(), json!("io1"));
                a["node-name"] = json!("d1");
                a
            },
            "is the QMP monitor's",
        ),
        (
            {
                let mut a = add_args("e1", &other, json!("io1"));
                a["node-name"] = json!("d1");
                a["num-queues"] = json!(65);
                a
            },
            "invalid options for export 'e1': parameter 'num-queues' must be between 1 and 64",
        ),
        (
            {
                let mut a = add_args("e1", &long_sock, json!("io1"));
                a["node-name"] = json!("d1");
                a
            },
            long_sock_refused.as_str(),
        ),
    ] {
        let (class, desc) = q.call("block-export-add", args.clone()).unwrap_err();
        assert_eq!(class, "GenericError", "{args}");
        assert!(desc.contains(want), "{args}: got {desc:?}, want {want:?}");
        // Nothing started: the IOThread's only holder is still e0's drive.
        assert_eq!(q.holders("io1"), holder, "{args}");
    }
    assert!(!Path::new(&other).exists());
    assert!(!Path::new(&long_sock).exists());
    assert_eq!(
        q.ok("query-block-exports", Value::Null)
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A second export, of the other drive, on the same IOThread: two holders.
    let mut a = add_args("e1", &other, json!("io1"));
    a["node-name"] = json!("d1");
    assert_eq!(q.ok("block-export-add", a), json!({}));
    assert_eq!(
        q.holders("io1"),
        json!([{"type": "block-node", "node-name": "d0"},
               {"type": "block-node", "node-name": "d1"}])
    );
    let ids: Vec<Value> = q
        .ok("query-block-exports", Value::Null)
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(ids, [json!("e0"), json!("e1")]);

    // quit: status 0, every socket removed.
    assert_eq!(q.ok("quit", Value::Null), json!({}));
    let ev = q.wait_event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    let Daemon { proc, .. } = d;
    assert_eq!(proc.wait(T), Some(0));
    assert!(!Path::new(&sock).exists());
    assert!(!Path::new(&other).exists());
    assert!(!qmp_sock.exists());
    f.assert_disk_untouched();
}

#[test]
fn connected_front_end_blocks_safe_removal_and_sigterm_stops_cleanly() {
    let f = fixture("export-conn");
    let sock = f.path("e0.sock");
    let qmp_sock = f.dir.join("qmp.sock");
    let mut d = spawn_daemon(
        &[
            "--drive".into(),
            format!("{},readonly=on", f.drive()),
            "--object".into(),
            "iothread,id=io0".into(),
            "--export".into(),
            format!("vhost-user-blk,id=e0,node-name=d0,addr=unix:{sock},iothread=io0"),
        ],
        &qmp_sock,
    );
    let q = &mut d.qmp;
    // A vhost-user front-end connects and talks to the export.
    let frontend = Frontend::connect(&sock, 1).expect("connect to the export");
    frontend.set_owner().expect("SET_OWNER");
    let features = frontend.get_features().expect("GET_FEATURES");
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1 offered");
    let deadline = Instant::now() + T;
    while q.ok("query-block-exports", Value::Null)[0]["connected"] != json!(true) {
        assert!(
            Instant::now() < deadline,
            "the export never saw the front-end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        q.ok("query-block-exports", Value::Null)[0]["writable"],
        json!(false)
    );
    let (class, desc) = q.call("block-export-del", json!({"id": "e0"})).unwrap_err();
    assert_eq!(class, "GenericError");
    assert!(desc.starts_with("export 'e0' still in use"), "{desc}");
    assert_eq!(
        q.holders("io0"),
        json!([{"type": "block-node", "node-name": "d0"}])
    );
    // Hard mode disconnects the front-end.
    assert_eq!(
        q.ok("block-export-del", json!({"id": "e0", "mode": "hard"})),
        json!({})
    );
    assert_eq!(q.holders("io0"), json!([]));
    assert!(frontend.get_features().is_err(), "disconnected");
    drop(frontend);
    assert_eq!(
        q.ok(
            "block-export-add",
            json!({"type": "vhost-user-blk", "id": "e0", "node-name": "d0",
                   "addr": {"type": "unix", "path": sock}, "iothread": "io0"})
        ),
        json!({})
    );
    assert_eq!(
        q.holders("io0"),
        json!([{"type": "block-node", "node-name": "d0"}])
    );

    // SIGTERM: a clean stop, status 0, sockets removed; QMP clients get
    // SHUTDOWN `host-signal` first.
    let pid = d.proc.child.id() as libc::pid_t;
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let ev = d.qmp.wait_event("SHUTDOWN");
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-signal"}));
    let Daemon { proc, .. } = d;
    assert_eq!(proc.wait(T), Some(0));
    assert!(!Path::new(&sock).exists());
    assert!(!qmp_sock.exists());
    f.assert_disk_untouched();
}
