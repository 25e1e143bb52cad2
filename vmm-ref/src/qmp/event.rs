//! Asynchronous QMP events and the [`EventSender`] the VMM emits them with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

/// Events queued between [`EventSender::emit`] and the server thread; beyond this the
/// newest events are dropped (and counted) rather than growing without bound.
pub(crate) const EVENT_QUEUE_CAPACITY: usize = 4096;

/// `{"seconds": s, "microseconds": us}` of the host's wall clock, as QEMU stamps events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: since.as_secs(),
            microseconds: since.subsec_micros(),
        }
    }
}

/// One event: `{"timestamp": {...}, "event": NAME, "data": {...}}` (QEMU's order; `data`
/// is omitted when it is `null`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// When the event was emitted.
    pub timestamp: Timestamp,
    /// Event name, e.g. `SHUTDOWN`.
    pub event: String,
    /// Event data.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

impl Event {
    /// An event stamped now.
    pub fn new(name: &str, data: Value) -> Self {
        Event {
            timestamp: Timestamp::now(),
            event: name.to_string(),
            data,
        }
    }

    /// The wire form, terminated by `"\r\n"`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = crate::qmp::protocol::Json::new(self).as_str().to_string();
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// Emits events to every client that finished capabilities negotiation. Cheap to clone,
/// `Send + Sync`; emitting after the server stopped does nothing.
#[derive(Clone, Debug)]
pub struct EventSender {
    tx: SyncSender<Event>,
    wake: Arc<EventFd>,
    dropped: Arc<AtomicU64>,
}

impl EventSender {
    pub(crate) fn new(tx: SyncSender<Event>, wake: Arc<EventFd>) -> Self {
        EventSender {
            tx,
            wake,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Broadcast event `name` with `data` (an object, or `Value::Null` for none),
    /// stamped now. Never blocks.
    pub fn emit(&self, name: &str, data: Value) {
        self.send(Event::new(name, data));
    }

    /// Broadcast an already built event. Never blocks.
    pub fn send(&self, event: Event) {
        match self.tx.try_send(event) {
            Ok(()) => {
                if let Err(e) = self.wake.write(1) {
                    log::warn!("qmp: cannot wake the server thread: {e}");
                }
            }
            Err(TrySendError::Full(ev)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Rate-limited: first drop, then every 1024th.
                if n == 1 || n & 1023 == 0 {
                    log::warn!(
                        "qmp: event queue full, dropped {n} events (latest {})",
                        ev.event
                    );
                }
            }
            Err(TrySendError::Disconnected(ev)) => {
                log::debug!("qmp: server stopped, event {} not sent", ev.event);
            }
        }
    }

    /// Events dropped because the queue to the server thread was full.
    #[allow(dead_code)] // diagnostics for VMMs and tests
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}
