//! Test doubles: a fake [`QmpMachine`] backed by a real IOThread registry, a temporary
//! directory and a line-oriented test client.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iothread_registry::{HolderGuard, IoThreadHolder, IoThreadParams, IoThreadRegistry};
use serde_json::{json, Value};

use crate::qmp::{BlockInfo, BlockQueueInfo, QmpMachine, RunStatus};

/// Generous: the machine is shared and noisy; tests count events, not durations.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The holder the fake machine registers on `io0`.
pub(crate) const FAKE_HOLDER: &str = "/machine/peripheral/blk0/virtio-backend";

/// A unique temporary directory, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("qmp-test-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake VM: IOThreads `io0` and `io1` in a real registry, `io0` held by a fake
/// virtio-blk device, one block device, counters for resets and quits.
pub(crate) struct FakeMachine {
    registry: IoThreadRegistry,
    pub(crate) status: Mutex<RunStatus>,
    pub(crate) resets: AtomicUsize,
    pub(crate) quits: AtomicUsize,
    pub(crate) fail_reset: AtomicBool,
    pub(crate) panic_on_status: AtomicBool,
    /// When set, the next `system_reset` waits for a message on it (holding up
    /// the QMP worker thread, as a slow command would).
    pub(crate) reset_gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    pub(crate) guards: Mutex<Vec<HolderGuard>>,
    /// When set, `stop` and `cont` emit `STOP` / `RESUME` through it while
    /// they run, as the real machine does (not as a follow-up of the command).
    pub(crate) events: Mutex<Option<crate::qmp::EventSender>>,
}

impl FakeMachine {
    pub(crate) fn new() -> Arc<Self> {
        let registry = IoThreadRegistry::new();
        registry
            .create("io0", IoThreadParams::default())
            .expect("create io0");
        registry
            .create("io1", IoThreadParams::default())
            .expect("create io1");
        let guard = registry
            .acquire("io0", IoThreadHolder::qom_object(FAKE_HOLDER))
            .expect("acquire io0");
        Arc::new(FakeMachine {
            registry,
            status: Mutex::new(RunStatus::Running),
            resets: AtomicUsize::new(0),
            quits: AtomicUsize::new(0),
            fail_reset: AtomicBool::new(false),
            panic_on_status: AtomicBool::new(false),
            reset_gate: Mutex::new(None),
            guards: Mutex::new(vec![guard]),
            events: Mutex::new(None),
        })
    }
}

impl FakeMachine {
    fn emit(&self, name: &str) {
        if let Some(events) = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            events.emit(name, serde_json::Value::Null);
        }
    }

    /// `stop`/`cont`: running <-> paused; refused once shut down.
    fn set_running(&self, running: bool) -> Result<(), String> {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match *status {
            RunStatus::Running | RunStatus::Paused => {
                *status = if running {
                    RunStatus::Running
                } else {
                    RunStatus::Paused
                };
                Ok(())
            }
            other => Err(format!("the fake machine is {}", other.name())),
        }
    }
}

impl QmpMachine for FakeMachine {
    fn status(&self) -> RunStatus {
        if self.panic_on_status.load(Ordering::SeqCst) {
            panic!("fake machine: status panics on purpose");
        }
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop(&self) -> Result<(), String> {
        self.set_running(false)?;
        self.emit("STOP");
        Ok(())
    }

    fn cont(&self) -> Result<(), String> {
        self.set_running(true)?;
        self.emit("RESUME");
        Ok(())
    }

    fn system_reset(&self) -> Result<(), String> {
        if self.fail_reset.load(Ordering::SeqCst) {
            return Err("reset refused by the fake machine".to_string());
        }
        let gate = self
            .reset_gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(gate) = gate {
            let _ = gate.recv_timeout(IO_TIMEOUT);
        }
        self.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn quit(&self) {
        self.quits.fetch_add(1, Ordering::SeqCst);
    }

    fn query_block(&self) -> Vec<BlockInfo> {
        vec![BlockInfo {
            device: "blk0".to_string(),
            qdev: FAKE_HOLDER.to_string(),
            file: "/tmp/fake-disk.img".to_string(),
            read_only: false,
            direct: false,
            format: "raw".to_string(),
            engine: "sync".to_string(),
            num_queues: 2,
            queue_size: 256,
            activated: true,
            queues: vec![
                BlockQueueInfo {
                    queue: 0,
                    iothread: "io0".to_string(),
                    requests: 0,
                    notifications: 0,
                    interrupts: 0,
                    errors: 0,
                },
                BlockQueueInfo {
                    queue: 1,
                    iothread: "io0".to_string(),
                    requests: 0,
                    notifications: 0,
                    interrupts: 0,
                    errors: 0,
                },
            ],
            vhost_user: None,
        }]
    }

    fn registry(&self) -> &IoThreadRegistry {
        &self.registry
    }
}

/// A QMP test client: the server writes one message per line, so reading lines is fine
/// on this side.
pub(crate) struct TestClient {
    pub(crate) writer: UnixStream,
    pub(crate) reader: BufReader<UnixStream>,
    /// Events received while waiting for replies.
    pub(crate) events: Vec<Value>,
}

impl TestClient {
    /// Connect and read the greeting (returned).
    pub(crate) fn connect(path: &Path) -> (Self, Value) {
        let stream = UnixStream::connect(path).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut client = TestClient {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
            events: Vec::new(),
        };
        let greeting = client.read_msg();
        (client, greeting)
    }

    /// Connect and negotiate capabilities.
    pub(crate) fn negotiated(path: &Path) -> Self {
        let (mut c, greeting) = Self::connect(path);
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        assert_eq!(c.execute("qmp_capabilities", None), json!({"return": {}}));
        c
    }

    pub(crate) fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Read one message (a line).
    pub(crate) fn read_line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read");
        assert!(n > 0, "server closed the connection");
        assert!(
            line.ends_with("\r\n"),
            "message not CRLF-terminated: {line:?}"
        );
        line
    }

    pub(crate) fn read_msg(&mut self) -> Value {
        let line = self.read_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// Read the next non-event message, keeping events in `self.events`.
    pub(crate) fn read_reply(&mut self) -> Value {
        loop {
            let msg = self.read_msg();
            if msg.get("event").is_some() {
                self.events.push(msg);
            } else {
                return msg;
            }
        }
    }

    /// Send a request and return the whole reply.
    pub(crate) fn request(&mut self, req: &Value) -> Value {
        self.send_raw(format!("{req}\n").as_bytes());
        self.read_reply()
    }

    pub(crate) fn execute(&mut self, name: &str, args: Option<Value>) -> Value {
        let mut req = json!({"execute": name});
        if let Some(args) = args {
            req["arguments"] = args;
        }
        self.request(&req)
    }

    /// Execute and return `return`, panicking on an error reply.
    pub(crate) fn ok(&mut self, name: &str, args: Option<Value>) -> Value {
        let reply = self.execute(name, args);
        match reply.get("return") {
            Some(ret) => ret.clone(),
            None => panic!("{name} failed: {reply}"),
        }
    }

    /// Execute and return `(class, desc)` of the error, panicking on success.
    pub(crate) fn err(&mut self, name: &str, args: Option<Value>) -> (String, String) {
        let reply = self.execute(name, args);
        error_of(&reply)
    }

    /// Wait for the next event (from the backlog first).
    pub(crate) fn next_event(&mut self) -> Value {
        if !self.events.is_empty() {
            return self.events.remove(0);
        }
        let msg = self.read_msg();
        assert!(msg.get("event").is_some(), "expected an event, got {msg}");
        msg
    }
}

pub(crate) fn error_of(reply: &Value) -> (String, String) {
    let err = reply
        .get("error")
        .unwrap_or_else(|| panic!("expected an error, got {reply}"));
    (
        err["class"].as_str().unwrap().to_string(),
        err["desc"].as_str().unwrap().to_string(),
    )
}
