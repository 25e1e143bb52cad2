//! The QMP monitor cannot be locked out by clients that connect and never
//! negotiate capabilities (a 17th client is told why it is refused; the
//! idlers are disconnected after the negotiation timeout, here shortened
//! through `VMM_REF_QMP_NEGOTIATION_TIMEOUT_MS`), and `null` is no value for
//! an integer member. Black box over `vmm-ref export` (no KVM needed): the
//! VM's monitor is the same server with the same configuration.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Generous: the machine is shared and noisy.
const T: Duration = Duration::from_secs(120);

/// The monitor's client limit.
const MAX_CLIENTS: usize = 16;

/// A raw connection that read the greeting and sends nothing.
struct Idler(BufReader<UnixStream>);

impl Idler {
    fn connect(path: &Path) -> Idler {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut r = BufReader::new(s);
        let greeting = read_json(&mut r);
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        Idler(r)
    }
}

fn read_json(r: &mut impl BufRead) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
}

/// Reads one message, then expects the server to close the connection.
fn last_message(r: &mut BufReader<UnixStream>) -> Value {
    let msg = read_json(r);
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "closed after {msg}");
    msg
}

#[test]
fn idle_clients_cannot_lock_management_out() {
    let dir = TempDir::new("qmp-lockout");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.join("qmp.sock");
    let daemon = Running::spawn_with_env(
        &[
            "export",
            "--drive",
            &format!("id=d0,file={}", disk.display()),
            "--qmp",
            &format!("unix:{}", sock.display()),
        ],
        &[("VMM_REF_QMP_NEGOTIATION_TIMEOUT_MS", "1500")],
    );
    daemon.expect_line("vmm-ref export: ready", T);

    // Every slot taken by a client that never negotiates.
    let mut idlers: Vec<Idler> = (0..MAX_CLIENTS).map(|_| Idler::connect(&sock)).collect();
    // One more is told why it is refused, then closed (the idlers hold their
    // slots until the timeout; if the machine was slow enough for it to pass
    // already, this client is served instead, and times out itself).
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut extra = BufReader::new(s);
    let first = read_json(&mut extra);
    if first.get("QMP").is_none() {
        assert_eq!(
            first,
            json!({"error": {"class": "GenericError",
                "desc": "too many QMP clients (at most 16); closing the connection"}})
        );
        let mut rest = String::new();
        extra.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "");
    }
    // Past the negotiation timeout every idler is told and disconnected.
    for idler in &mut idlers {
        assert_eq!(
            last_message(&mut idler.0),
            json!({"error": {"class": "GenericError",
                "desc": "QMP capabilities negotiation did not complete within 1.5s; closing the connection"}})
        );
    }
    // Management gets in.
    let mut qmp = Qmp::connect(&sock, T);
    assert_eq!(qmp.execute("query-block-exports", json!(null)), json!([]));

    // null is not a value for an integer member.
    let reply = qmp.execute_result(
        "object-add",
        json!({"qom-type": "iothread", "id": "io0", "poll-max-ns": null}),
    );
    assert_eq!(
        reply,
        Err(json!({"class": "GenericError",
            "desc": "Invalid parameter type for 'poll-max-ns', expected: integer"}))
    );
    assert_eq!(qmp.execute("query-iothreads", json!(null)), json!([]));
    qmp.execute("quit", json!(null));
    assert_eq!(daemon.wait(T), Some(0));
}
