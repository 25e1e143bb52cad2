//! A virtio-blk device whose queues an external vhost-user back-end serves
//! (qemu-storage-daemon, SPDK, `vmm-ref export`, ...): the front-end side of
//! vhost-user, built on the `vhost` crate's `Frontend`, behind the same
//! [`VirtioDevice`] trait as our own virtio-blk, so the virtio-mmio
//! transport drives both alike.
//!
//! - At creation the device connects to the back-end's socket and
//!   negotiates (features, protocol features MQ / CONFIG / REPLY_ACK /
//!   INFLIGHT_SHMFD as offered, queue count) and reads the configuration
//!   space (capacity, seg_max, blk_size, ...), which the guest then reads
//!   from a cached copy with `num_queues` set to the device's queue count.
//! - On activation the back-end gets the guest memory table (the VM's RAM
//!   must be shareable: one memfd, see [`crate::vm::memory::create_shared`]),
//!   the rings, each queue's notification eventfd as its kick fd (the KVM
//!   ioeventfd: guest kicks go straight from KVM to the back-end) and the
//!   device's interrupt eventfd as every ring's call fd (the KVM irqfd: the
//!   back-end interrupts the guest directly).
//! - A connection thread (`worker.rs`) owns the connection, watches the idle
//!   socket and reconnects (`reconnect=`); every exchange is bounded by a
//!   watchdog (`watchdog.rs`). Losing the back-end never stops the VMM: the queues stop,
//!   one error is logged, and with `reconnect=` the rings resume on the next
//!   back-end (see the worker's documentation for what is resubmitted).
//!
//! [`features`] holds the negotiation rules as pure functions.

mod connection;
pub mod features;
mod watchdog;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::virtio::device::{
    feature, read_config_bytes, ActivateContext, ActivateError, VirtioDevice, TYPE_BLOCK,
};
use crate::virtio::guest_warn;
use connection::Connection;
use features::{FeatureError, WRITEBACK_OFFSET};
use watchdog::Watchdog;
use worker::{Activation, Command, Ring, Worker};

/// How long the first connection may take to be accepted (the back-end may
/// still be starting up).
const INITIAL_CONNECT_WINDOW: Duration = Duration::from_secs(2);

/// Errors of a vhost-user-blk device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VhostUserBlkError {
    /// The back-end's socket refused the connection.
    #[error("cannot connect to the vhost-user back-end at {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A request failed or its reply was malformed.
    #[error("vhost-user request {request} failed")]
    Request {
        /// The request.
        request: &'static str,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
    /// The back-end did not answer in time (the connection was shut down).
    #[error("the back-end did not finish {request} within {secs} s")]
    Timeout {
        /// The request being answered.
        request: &'static str,
        /// The bound.
        secs: u64,
    },
    /// The back-end lacks something the device needs.
    #[error("unusable vhost-user back-end")]
    Backend(#[source] FeatureError),
    /// Guest RAM is not file-backed, so the back-end cannot map it.
    #[error("guest memory at {gpa:#x} is not shareable (vhost-user needs memfd-backed RAM)")]
    MemoryNotShared {
        /// The region's guest-physical start.
        gpa: u64,
    },
    /// A ring does not lie within one guest memory region.
    #[error("vring {index}: the {what} at {gpa:#x} is not inside guest memory")]
    RingAddress {
        /// Queue index.
        index: usize,
        /// Which part of the ring.
        what: &'static str,
        /// Its guest-physical address.
        gpa: u64,
    },
    /// The transport passed no notification eventfd for a queue.
    #[error("vring {0}: no kick eventfd")]
    NoKick(usize),
    /// No back-end is connected and the device has no `reconnect=`.
    #[error("not connected to the back-end (no reconnect= given)")]
    NotConnected,
    /// The watchdog could not watch the socket.
    #[error("cannot watch the back-end's socket")]
    Watchdog(#[source] std::io::Error),
    /// A thread or an eventfd could not be created.
    #[error("cannot start the device's connection thread")]
    Spawn(#[source] std::io::Error),
    /// The connection thread is gone.
    #[error("the device's connection thread has stopped")]
    WorkerGone,
}

impl VhostUserBlkError {
    /// Whether the back-end broke the protocol (as opposed to going away).
    fn is_protocol_error(&self) -> bool {
        use vhost::vhost_user::Error as VuError;
        match self {
            VhostUserBlkError::Request { source, .. } => !matches!(
                source,
                vhost::Error::VhostUserProtocol(
                    VuError::SocketBroken(_)
                        | VuError::Disconnected
                        | VuError::SocketError(_)
                        | VuError::PartialMessage
                )
            ),
            VhostUserBlkError::Backend(_) => true,
            _ => false,
        }
    }
}

/// Device parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// Device id.
    pub id: String,
    /// Chardev id (for reports).
    pub chardev: String,
    /// The back-end's socket.
    pub socket: PathBuf,
    /// Number of queues.
    pub num_queues: u16,
    /// Queue size.
    pub queue_size: u16,
    /// Reconnection interval, if any.
    pub reconnect: Option<Duration>,
}

/// Connection state shared with the control plane.
#[derive(Debug, Default)]
pub(crate) struct Status {
    connected: AtomicBool,
    activated: AtomicBool,
    connections: AtomicU64,
    disconnects: AtomicU64,
    reconnects: AtomicU64,
    protocol_errors: AtomicU64,
    inflight: AtomicBool,
    protocol: AtomicU64,
    last_error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device's state for `query-block`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserBlkInfo {
    /// Device parameters.
    pub params: Params,
    /// Capacity in bytes (from the configuration space).
    pub capacity: u64,
    /// The back-end offers `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// Virtio features offered to the guest.
    pub features: u64,
    /// vhost-user protocol features in use on the current (or last) connection.
    pub protocol_features: u64,
    /// The driver activated the device.
    pub activated: bool,
    /// A back-end is connected.
    pub connected: bool,
    /// Connections made so far (the first included).
    pub connections: u64,
    /// Connections lost.
    pub disconnects: u64,
    /// Successful reconnections.
    pub reconnects: u64,
    /// Connections dropped because the back-end broke the protocol.
    pub protocol_errors: u64,
    /// The back-end tracks in-flight requests in a shared area (INFLIGHT_SHMFD).
    pub inflight: bool,
    /// Why the last connection was lost or the last attempt failed.
    pub last_error: Option<String>,
}

/// A cloneable handle on a device for the control plane.
#[derive(Clone)]
pub struct VhostUserBlkHandle {
    params: Arc<Params>,
    status: Arc<Status>,
    config: Arc<Mutex<Vec<u8>>>,
    features: u64,
    commands: Commands,
}

/// The way to the device's thread: its command channel and the eventfd that
/// wakes it (shared by the device model and its control-plane handles).
#[derive(Clone)]
struct Commands {
    tx: Sender<Command>,
    wake: Arc<EventFd>,
}

impl Commands {
    fn send(&self, cmd: Command) -> Result<(), VhostUserBlkError> {
        self.tx
            .send(cmd)
            .map_err(|_| VhostUserBlkError::WorkerGone)?;
        self.wake.write(1).map_err(VhostUserBlkError::Spawn)
    }

    /// Sends a command that answers `()` and waits for the answer.
    fn call(&self, id: &str, make: impl FnOnce(Sender<()>) -> Command) {
        let (tx, rx) = mpsc::channel();
        match self.send(make(tx)) {
            Ok(()) => {
                // Err: the thread ended; nothing left to wait for.
                let _ = rx.recv();
            }
            Err(e) => log::error!("vhost-user-blk '{id}': {e}"),
        }
    }
}

impl VhostUserBlkHandle {
    /// QMP `stop`: the back-end stops the rings (disable, `GET_VRING_BASE`),
    /// as QEMU stops a vhost device when the VM stops; they start again
    /// where they stood at [`VhostUserBlkHandle::resume`]. Bounded by the
    /// exchange timeout if the back-end does not answer (the connection is
    /// then dropped, as for any failure).
    pub fn pause(&self) {
        self.commands.call(&self.params.id, Command::Pause);
    }

    /// QMP `cont`: the stopped rings start again.
    pub fn resume(&self) {
        self.commands.call(&self.params.id, Command::Resume);
    }

    /// Current state.
    pub fn info(&self) -> VhostUserBlkInfo {
        let s = &self.status;
        let sectors = features::capacity(&lock(&self.config));
        VhostUserBlkInfo {
            params: (*self.params).clone(),
            capacity: sectors.saturating_mul(512),
            read_only: self.features & feature(virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO) != 0,
            features: self.features,
            protocol_features: s.protocol.load(Ordering::Relaxed),
            activated: s.activated.load(Ordering::SeqCst),
            connected: s.connected.load(Ordering::SeqCst),
            connections: s.connections.load(Ordering::Relaxed),
            disconnects: s.disconnects.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            protocol_errors: s.protocol_errors.load(Ordering::Relaxed),
            inflight: s.inflight.load(Ordering::SeqCst),
            last_error: lock(&s.last_error).clone(),
        }
    }
}

/// The vhost-user-blk device model.
pub struct VhostUserBlk {
    params: Arc<Params>,
    queue_sizes: Vec<u16>,
    features: u64,
    config: Arc<Mutex<Vec<u8>>>,
    commands: Commands,
    thread: Option<JoinHandle<()>>,
    status: Arc<Status>,
}

/// Connects, retrying for [`INITIAL_CONNECT_WINDOW`] while the socket does
/// not exist yet or refuses connections.
fn connect_initial(
    p: &Params,
    watchdog: &Watchdog,
) -> Result<(Connection, Vec<u8>), VhostUserBlkError> {
    let deadline = Instant::now() + INITIAL_CONNECT_WINDOW;
    loop {
        match Connection::open(&p.socket, p.num_queues, p.queue_size, watchdog) {
            Err(VhostUserBlkError::Connect { path, source })
                if Instant::now() < deadline
                    && matches!(
                        source.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                let _ = path;
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

impl VhostUserBlk {
    /// Connects to the back-end, negotiates, reads the configuration space
    /// and starts the connection thread. `call` is the device's interrupt
    /// eventfd (registered with KVM as the irqfd of its slot): the back-end
    /// signals it directly.
    pub fn new(
        params: Params,
        call: EventFd,
    ) -> Result<(VhostUserBlk, VhostUserBlkHandle), VhostUserBlkError> {
        let watchdog =
            Watchdog::start(format!("vu-wd-{}", params.id)).map_err(VhostUserBlkError::Spawn)?;
        let (conn, raw_config) = connect_initial(&params, &watchdog)?;
        let features = features::guest_features(conn.backend_features(), params.num_queues);
        let config = Arc::new(Mutex::new(features::guest_config(
            &raw_config,
            params.num_queues,
        )));
        let status = Arc::new(Status::default());
        status.connected.store(true, Ordering::SeqCst);
        status.connections.store(1, Ordering::Relaxed);
        status
            .protocol
            .store(conn.protocol().bits(), Ordering::Relaxed);
        let params = Arc::new(params);
        log::info!(
            "vhost-user-blk '{}': connected to {} (features {:#x}, protocol features {:#x}, {} sectors)",
            params.id,
            params.socket.display(),
            conn.backend_features(),
            conn.protocol().bits(),
            features::capacity(&lock(&config))
        );
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(VhostUserBlkError::Spawn)?);
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            params: Arc::clone(&params),
            conn: Some(conn),
            active: None,
            lost: false,
            paused: false,
            inflight: None,
            next_attempt: None,
            outage_logged: false,
            call,
            watchdog,
            status: Arc::clone(&status),
            config: Arc::clone(&config),
            commands: rx,
            wake: Arc::clone(&wake),
            generation: 0,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vu-{}", params.id))
            .spawn(move || worker.run())
            .map_err(VhostUserBlkError::Spawn)?;
        let commands = Commands { tx, wake };
        let handle = VhostUserBlkHandle {
            params: Arc::clone(&params),
            status: Arc::clone(&status),
            config: Arc::clone(&config),
            features,
            commands: commands.clone(),
        };
        Ok((
            VhostUserBlk {
                queue_sizes: vec![params.queue_size; usize::from(params.num_queues)],
                params,
                features,
                config,
                commands,
                thread: Some(thread),
                status,
            },
            handle,
        ))
    }

    /// A handle for the control plane.
    pub fn handle(&self) -> VhostUserBlkHandle {
        VhostUserBlkHandle {
            params: Arc::clone(&self.params),
            status: Arc::clone(&self.status),
            config: Arc::clone(&self.config),
            features: self.features,
            commands: self.commands.clone(),
        }
    }

    fn send(&self, cmd: Command) -> Result<(), VhostUserBlkError> {
        self.commands.send(cmd)
    }

    /// Sends a command that answers `()` and waits for the answer.
    fn call(&self, make: impl FnOnce(Sender<()>) -> Command) {
        self.commands.call(&self.params.id, make);
    }

    fn stop_thread(&mut self) {
        if let Some(t) = self.thread.take() {
            self.call(Command::Shutdown);
            let _ = t.join();
        }
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&lock(&self.config), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let wce = feature(virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE);
        if offset != WRITEBACK_OFFSET || data.len() != 1 || self.features & wce == 0 {
            guest_warn!(
                "vhost-user-blk '{}': write of {} byte(s) at config offset {offset} ignored",
                self.params.id,
                data.len()
            );
            return;
        }
        if let Some(b) = lock(&self.config).get_mut(WRITEBACK_OFFSET as usize) {
            *b = data[0];
        }
        let cmd = Command::SetConfig {
            offset: WRITEBACK_OFFSET as u32,
            data: data.to_vec(),
        };
        if let Err(e) = self.send(cmd) {
            log::error!("vhost-user-blk '{}': {e}", self.params.id);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let n = self.queue_sizes.len();
        if ctx.queues.len() != n || ctx.queue_evts.len() != n {
            return Err(ActivateError::QueueCount {
                expected: n,
                queues: ctx.queues.len(),
                evts: ctx.queue_evts.len(),
            });
        }
        let act = Activation {
            mem: ctx.mem,
            rings: ctx.queues.iter().map(Ring::of).collect(),
            kicks: ctx.queue_evts,
            interrupt: ctx.interrupt,
            acked_features: ctx.acked_features,
        };
        let (tx, rx) = mpsc::channel();
        self.send(Command::Activate(Box::new(act), tx))
            .map_err(|e| ActivateError::Device(Box::new(e)))?;
        match rx.recv() {
            Ok(r) => r.map_err(|e| ActivateError::Device(Box::new(e))),
            Err(_) => Err(ActivateError::Device(Box::new(
                VhostUserBlkError::WorkerGone,
            ))),
        }
    }

    fn reset(&mut self) {
        if self.thread.is_some() {
            self.call(Command::Reset);
        }
    }

    fn shutdown(&mut self) {
        self.stop_thread();
    }

    fn notifies_used_buffers_directly(&self) -> bool {
        true
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

#[cfg(test)]
mod tests;
