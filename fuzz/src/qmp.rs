//! `qmp`: arbitrary bytes through vmm-ref's QMP session (streaming JSON decoder,
//! request validation, typed command parsing, the one dispatcher) against a fake machine
//! backed by a real IOThread registry ([`vmm_ref::qmp::Session`]).
//!
//! Format: one flag byte — bit 0: send `qmp_capabilities` first; bits 1..7: chunk size
//! minus one (the rest is fed to the session in chunks of that size, exercising
//! messages split across reads) — then the client's bytes.
//!
//! Invariants: nothing panics; every reply is one JSON object terminated by `\r\n`
//! holding exactly one of `return` / `error`, and errors carry a known class and a
//! non-empty description; the decoder (limit 1 KiB here) never reports a message larger
//! than its limit as a value; IOThread `io0`, held by a fake device, survives whatever
//! the input does (`object-del` is refused while held).
//!
//! The fake machine is shared by all runs (creating IOThreads is slow); after each run
//! the registry is put back to `io0` + `io1` with default parameters and no other
//! IOThread, which is all the state the dispatcher keeps (the session is new per run),
//! so a crash reproduces from its input alone.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock};

use iothread_registry::{HolderGuard, IoThreadHolder, IoThreadParams, IoThreadRegistry};
use serde::de::IgnoredAny;
use serde::Deserialize;
use vmm_ref::qmp::protocol::JsonStreamDecoder;
use vmm_ref::qmp::session::Output;
use vmm_ref::qmp::{BlockInfo, Dispatcher, QmpMachine, RunStatus, Session};

use crate::bytes::{Reader, Writer};

/// Message size limit used here (the server's default is 1 MiB). The limit
/// check does not depend on the size, so a small one reaches the over-limit paths
/// with short inputs: the oversized seed is 2 KiB, well inside libFuzzer's
/// default 4 KiB `-max_len`, and every byte of an input costs both decoders.
pub const LIMIT: usize = 1024;

/// The device path holding `io0`.
pub const HOLDER: &str = "/machine/peripheral/fuzz0/virtio-backend";

/// A decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Prepend `qmp_capabilities`.
    pub negotiate: bool,
    /// Bytes per `feed` call (1..=128).
    pub chunk: usize,
    /// The client's bytes.
    pub data: Vec<u8>,
}

impl Input {
    /// Decodes any byte string.
    pub fn decode(data: &[u8]) -> Input {
        let mut r = Reader::new(data);
        let flags = r.u8();
        Input {
            negotiate: flags & 1 == 1,
            chunk: usize::from(flags >> 1) + 1,
            data: r.rest().to_vec(),
        }
    }

    /// Encodes an input.
    pub fn encode(negotiate: bool, chunk: usize, data: &[u8]) -> Vec<u8> {
        let chunk = u8::try_from(chunk.clamp(1, 128) - 1).unwrap_or(0);
        Writer::new()
            .u8((chunk << 1) | u8::from(negotiate))
            .bytes(data)
            .finish()
    }
}

struct FuzzMachine {
    registry: IoThreadRegistry,
    _guard: HolderGuard,
}

impl QmpMachine for FuzzMachine {
    fn status(&self) -> RunStatus {
        RunStatus::Running
    }
    fn system_reset(&self) -> Result<(), String> {
        Ok(())
    }
    fn quit(&self) {}
    fn query_block(&self) -> Vec<BlockInfo> {
        Vec::new()
    }
    fn registry(&self) -> &IoThreadRegistry {
        &self.registry
    }
}

fn machine() -> &'static Mutex<(Arc<FuzzMachine>, Dispatcher)> {
    static MACHINE: OnceLock<Mutex<(Arc<FuzzMachine>, Dispatcher)>> = OnceLock::new();
    MACHINE.get_or_init(|| {
        let registry = IoThreadRegistry::new();
        for id in ["io0", "io1"] {
            registry
                .create(id, IoThreadParams::default())
                .expect("create IOThread");
        }
        let guard = registry
            .acquire("io0", IoThreadHolder::qom_object(HOLDER))
            .expect("acquire io0");
        let m = Arc::new(FuzzMachine {
            registry,
            _guard: guard,
        });
        let d = Dispatcher::new(m.clone());
        Mutex::new((m, d))
    })
}

/// A reply as QMP defines it: `return` or `error`, and the request's `id`.
/// Parsed into this rather than a `Value`: `IgnoredAny` checks the syntax of the
/// returned value and the id without building (and dropping) them, which was a
/// quarter of this target's time.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reply<'a> {
    #[serde(rename = "return")]
    ret: Option<IgnoredAny>,
    #[serde(borrow)]
    error: Option<ReplyError<'a>>,
    #[allow(dead_code)]
    id: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplyError<'a> {
    #[serde(borrow)]
    class: Cow<'a, str>,
    #[serde(borrow)]
    desc: Cow<'a, str>,
}

fn check_reply(bytes: &[u8]) {
    assert!(bytes.ends_with(b"\r\n"), "reply not CRLF-terminated");
    let text = || String::from_utf8_lossy(bytes);
    let reply: Reply = serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("reply is not a QMP reply ({e}): {}", text()));
    match (reply.ret, reply.error) {
        (Some(_), None) => {}
        (None, Some(err)) => {
            assert!(
                ["GenericError", "CommandNotFound", "DeviceNotFound"].contains(&&*err.class),
                "unknown class {}",
                err.class
            );
            assert!(!err.desc.is_empty(), "empty error desc: {}", text());
        }
        _ => panic!("reply has neither or both of return/error: {}", text()),
    }
}

/// Runs one input (see the module documentation).
pub fn check(input: &Input) {
    let guard = machine().lock().unwrap_or_else(|e| e.into_inner());
    let (m, d) = &*guard;
    let mut session = Session::with_decoder(JsonStreamDecoder::with_limit(LIMIT));
    if input.negotiate {
        session.feed(b"{\"execute\": \"qmp_capabilities\"}");
    }
    for chunk in input.data.chunks(input.chunk) {
        session.feed(chunk);
        while let Some(outputs) = session.process_next(d) {
            for o in outputs {
                if let Output::Reply(bytes) = o {
                    check_reply(&bytes);
                }
            }
        }
    }
    assert!(m.registry.contains("io0"), "held IOThread io0 was deleted");
    // Back to the initial state for the next run.
    for id in m.registry.ids() {
        if id != "io0" && id != "io1" {
            let _ = m.registry.delete(&id);
        }
    }
    if !m.registry.contains("io1") {
        m.registry
            .create("io1", IoThreadParams::default())
            .expect("recreate io1");
    }
    // Only where a command changed them: `set_params` wakes the IOThread to apply
    // them, a cross-thread round trip per run that costs more than most inputs.
    // Skipping it when the stored parameters already are the defaults leaves the
    // same registry state; what it would also reset is the loop's adaptive polling
    // window, which follows wall-clock timing and no reply depends on.
    for id in ["io0", "io1"] {
        if m.registry.params(id).ok() != Some(default_params()) {
            m.registry
                .set_params(id, IoThreadParams::default())
                .expect("reset params");
        }
    }
}

/// The parameters an IOThread created with the defaults stores.
fn default_params() -> IoThreadParams {
    static DEFAULT: OnceLock<IoThreadParams> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        let registry = IoThreadRegistry::new();
        registry
            .create("probe", IoThreadParams::default())
            .expect("create IOThread");
        registry.params("probe").expect("params")
    })
}

/// Seed corpus: every command with valid and invalid arguments, protocol errors,
/// messages split across reads, an oversized message.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut all = Vec::new();
    let mut add = |name: &str, negotiate: bool, chunk: usize, text: &str| {
        all.push((
            name.to_string(),
            Input::encode(negotiate, chunk, text.as_bytes()),
        ));
    };
    add(
        "negotiation",
        false,
        128,
        r#"{"execute":"query-status"}{"execute":"qmp_capabilities"}{"execute":"qmp_capabilities"}"#,
    );
    add(
        "queries",
        true,
        7,
        r#"{"execute":"query-version","id":1}{"execute":"query-status"}{"execute":"query-commands"}
           {"execute":"query-iothreads"}{"execute":"query-block"}{"execute":"x-query-iothread-stats","arguments":{"id":"io1"}}"#,
    );
    add(
        "qom",
        true,
        128,
        r#"{"execute":"qom-set","arguments":{"path":"/objects/io1","property":"poll-weight","value":5}}
           {"execute":"qom-get","arguments":{"path":"/objects/io1","property":"poll-weight"}}
           {"execute":"qom-set","arguments":{"path":"/objects/io1","property":"poll-weight","value":"5"}}
           {"execute":"qom-get","arguments":{"path":"/objects/nope","property":"x"}}"#,
    );
    add(
        "objects",
        true,
        3,
        r#"{"execute":"object-add","arguments":{"qom-type":"iothread","id":"io2","poll-max-ns":0,"poll-algorithm":"classic"}}
           {"execute":"object-del","arguments":{"id":"io2"}}{"execute":"object-del","arguments":{"id":"io0"}}
           {"execute":"object-add","arguments":{"qom-type":"memory-backend-ram","id":"m"}}"#,
    );
    add(
        "hmp",
        true,
        128,
        r#"{"execute":"human-monitor-command","arguments":{"command-line":"info iothreads"}}
           {"execute":"human-monitor-command","arguments":{"command-line":"help"}}"#,
    );
    add(
        "lifecycle",
        true,
        128,
        r#"{"execute":"stop"}{"execute":"cont"}{"execute":"system_reset"}{"execute":"quit"}"#,
    );
    add(
        "protocol_errors",
        true,
        1,
        "{\"execute\": query}\n[1]\n}\n{\"exec-oob\":\"x\"}\n{\"execute\":1}\n\u{7f}x\n",
    );
    let big = format!(
        r#"{{"execute":"query-status","arguments":{{"x":"{}"}}}}{{"execute":"query-status"}}"#,
        "a".repeat(LIMIT * 2)
    );
    add("oversized", true, 128, &big);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_check_refuses_what_qmp_does_not_send() {
        check_reply(b"{\"return\": {\"a\": [1, \"x\"]}, \"id\": {\"k\": null}}\r\n");
        check_reply(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"\\u00e9\"}}\r\n");
        for bad in [
            &b"{\"return\": {}}"[..],
            b"{\"return\": {}, \"error\": {\"class\": \"GenericError\", \"desc\": \"d\"}}\r\n",
            b"{\"id\": 1}\r\n",
            b"{\"return\": {}, \"extra\": 1}\r\n",
            b"{\"return\": [1,]}\r\n",
            b"{\"error\": {\"class\": \"Bogus\", \"desc\": \"d\"}}\r\n",
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"\"}}\r\n",
            b"[]\r\n",
        ] {
            let r = std::panic::catch_unwind(|| check_reply(bad));
            assert!(r.is_err(), "accepted {}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn seeds_round_trip_and_pass() {
        for (name, bytes) in seeds() {
            let input = Input::decode(&bytes);
            assert_eq!(
                Input::encode(input.negotiate, input.chunk, &input.data),
                bytes,
                "{name}"
            );
            check(&input);
        }
        check(&Input::decode(&[]));
        check(&Input::decode(&[0xFF, 0xFF, b'{']));
    }
}
