//! The device's connection thread: owns the connection, serves the device
//! model's commands (activate, reset, config writes, shutdown), watches the
//! idle socket for the back-end going away (end of file, hang-up) or sending
//! something nobody asked for (a protocol violation: the connection is
//! dropped), and reconnects every `reconnect=` seconds.
//!
//! Ring state across connections: a clean stop (`GET_VRING_BASE`) is only
//! done on device reset and shutdown, after which the next activation starts
//! from the driver's fresh rings. When the back-end is lost while the device
//! runs, every ring restarts at its *used* index read from guest memory (as
//! QEMU does): requests the back-end had taken but not completed are fetched
//! from the available ring again. That is exact when the back-end completed
//! in order; with `INFLIGHT_SHMFD` the back-end itself resubmits what its
//! shared in-flight area lists (the area outlives the connection: it is
//! handed to the new back-end before the rings start), so out-of-order
//! completion is covered too. See `docs/vhost-user-frontend.md`.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{Connection, Inflight, RingFds, RingSpec};
use super::features;
use super::watchdog::Watchdog;
use super::{lock, Params, Status, VhostUserBlkError};
use crate::error_chain;
use crate::virtio::device::VirtioInterrupt;

/// A ring the driver configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
}

impl Ring {
    /// The ring of a queue, if the driver enabled it.
    pub(super) fn of(q: &Queue) -> Option<Ring> {
        q.ready().then(|| Ring {
            size: q.size(),
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            next_avail: q.next_avail(),
        })
    }
}

/// What an activation hands the thread.
pub(super) struct Activation {
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// One entry per queue; `None` for queues the driver did not enable.
    pub rings: Vec<Option<Ring>>,
    pub kicks: Vec<EventFd>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub acked_features: u64,
}

impl Activation {
    /// The queues whose rings the driver enabled.
    fn started_rings(&self) -> Vec<usize> {
        self.rings
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.map(|_| i))
            .collect()
    }
}

/// Requests from the device model.
pub(super) enum Command {
    /// The driver set DRIVER_OK.
    Activate(Box<Activation>, Sender<Result<(), VhostUserBlkError>>),
    /// The driver reset the device.
    Reset(Sender<()>),
    /// The driver wrote the configuration space (`writeback`).
    SetConfig { offset: u32, data: Vec<u8> },
    /// VMM shutdown: stop the rings, close the connection, end the thread.
    Shutdown(Sender<()>),
    /// QMP `stop`: stop the rings, keeping where each one stands.
    Pause(Sender<()>),
    /// QMP `cont`: start them again from there.
    Resume(Sender<()>),
}

/// The thread's state.
pub(super) struct Worker {
    pub params: Arc<Params>,
    pub conn: Option<Connection>,
    pub active: Option<Box<Activation>>,
    /// The rings stopped without `GET_VRING_BASE` (the back-end was lost):
    /// on the next start each resumes at its used index.
    pub lost: bool,
    /// The VM is stopped: the rings stay stopped (also across a
    /// reconnection) until `Resume`.
    pub paused: bool,
    pub inflight: Option<Inflight>,
    pub next_attempt: Option<Instant>,
    /// An outage was logged; no more until the back-end is back.
    pub outage_logged: bool,
    pub call: EventFd,
    pub watchdog: Watchdog,
    pub status: Arc<Status>,
    pub config: Arc<Mutex<Vec<u8>>>,
    pub commands: Receiver<Command>,
    pub wake: Arc<EventFd>,
    /// Incremented whenever `conn` changes, so that a poll result for an
    /// old socket is not applied to a new one.
    pub generation: u64,
}

/// What `poll` saw on the idle socket.
enum SocketEvent {
    Nothing,
    Closed,
    Garbage(usize),
    Error(std::io::Error),
}

/// Looks at the idle socket without consuming anything.
fn peek(fd: RawFd, revents: i16) -> SocketEvent {
    let mut buf = [0u8; 64];
    // SAFETY: `buf` is valid for `buf.len()` bytes; the fd is the live socket.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => SocketEvent::Closed,
        n if n > 0 => SocketEvent::Garbage(n as usize),
        _ => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) != 0 {
                    SocketEvent::Closed
                } else {
                    SocketEvent::Nothing
                }
            } else {
                SocketEvent::Error(e)
            }
        }
    }
}

impl Worker {
    /// Runs until a `Shutdown` command (or the device is dropped).
    pub(super) fn run(mut self) {
        loop {
            let timeout_ms = self.next_attempt.map_or(-1, |t| {
                let left = t.saturating_duration_since(Instant::now());
                i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
            });
            let generation = self.generation;
            let sock = self.conn.as_ref().map(Connection::raw_fd);
            let mut fds = [
                libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&*self.wake),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: sock.unwrap_or(-1),
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the whole call
            // (a negative fd is ignored by poll).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("vhost-user-blk '{}': poll: {e}", self.params.id);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            }
            if fds[0].revents != 0 {
                let _ = self.wake.read();
                loop {
                    match self.commands.try_recv() {
                        Ok(Command::Shutdown(reply)) => {
                            self.shutdown();
                            let _ = reply.send(());
                            return;
                        }
                        Ok(cmd) => self.handle(cmd),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            self.shutdown();
                            return;
                        }
                    }
                }
            }
            if let Some(fd) = sock {
                if fds[1].revents != 0 && generation == self.generation {
                    match peek(fd, fds[1].revents) {
                        SocketEvent::Nothing => {}
                        SocketEvent::Closed => {
                            self.lose("the back-end closed the connection".into(), false)
                        }
                        SocketEvent::Garbage(n) => self.lose(
                            format!(
                                "the back-end sent {n} unsolicited byte(s), a protocol violation"
                            ),
                            true,
                        ),
                        SocketEvent::Error(e) => self.lose(format!("socket error: {e}"), false),
                    }
                }
            }
            if self.next_attempt.is_some_and(|t| Instant::now() >= t) {
                self.reconnect();
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Activate(act, reply) => {
                let r = self.activate(act);
                let _ = reply.send(r);
            }
            Command::Reset(reply) => {
                self.reset();
                let _ = reply.send(());
            }
            Command::SetConfig { offset, data } => self.set_config(offset, &data),
            Command::Pause(reply) => {
                self.pause();
                let _ = reply.send(());
            }
            Command::Resume(reply) => {
                self.resume();
                let _ = reply.send(());
            }
            // Handled by the loop.
            Command::Shutdown(reply) => {
                let _ = reply.send(());
            }
        }
    }

    fn set_conn(&mut self, conn: Option<Connection>) {
        self.conn = conn;
        self.generation = self.generation.wrapping_add(1);
        self.status
            .connected
            .store(self.conn.is_some(), Ordering::SeqCst);
    }

    /// The back-end is gone (or misbehaved): drop the connection, log once
    /// per outage, schedule a reconnection if configured.
    fn lose(&mut self, reason: String, protocol_error: bool) {
        self.set_conn(None);
        self.status.disconnects.fetch_add(1, Ordering::Relaxed);
        if protocol_error {
            self.status.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
        if self.active.is_some() {
            self.lost = true;
        }
        *lock(&self.status.last_error) = Some(reason.clone());
        if !self.outage_logged {
            self.outage_logged = true;
            let then = match self.params.reconnect {
                Some(d) => format!("reconnecting every {} s", d.as_secs()),
                None => "no reconnect= given, they stay stopped".to_owned(),
            };
            log::error!(
                "vhost-user-blk '{}': lost the back-end at {}: {reason}; the queues are stopped, {then}",
                self.params.id,
                self.params.socket.display()
            );
        }
        self.next_attempt = self.params.reconnect.map(|d| Instant::now() + d);
    }

    fn fail(&mut self, e: &VhostUserBlkError) {
        self.lose(error_chain(e), e.is_protocol_error());
    }

    /// Starts the rings of the active device on the current connection.
    fn start_rings(&mut self) -> Result<(), VhostUserBlkError> {
        let (Some(conn), Some(act)) = (self.conn.as_mut(), self.active.as_ref()) else {
            return Err(VhostUserBlkError::NotConnected);
        };
        let mem = act.mem.memory();
        let mut specs = Vec::new();
        for (index, ring) in act.rings.iter().enumerate() {
            let Some(r) = ring else { continue };
            let base = if self.lost {
                // used->idx, as the back-end left it.
                let addr = r.used.checked_add(2).map(GuestAddress);
                match addr.map(|a| mem.read_obj::<u16>(a)) {
                    Some(Ok(idx)) => u16::from_le(idx),
                    _ => {
                        return Err(VhostUserBlkError::RingAddress {
                            index,
                            what: "used ring",
                            gpa: r.used,
                        })
                    }
                }
            } else {
                r.next_avail
            };
            specs.push(RingSpec {
                index,
                size: r.size,
                desc: r.desc,
                avail: r.avail,
                used: r.used,
                base,
            });
        }
        let fds = RingFds {
            kicks: &act.kicks,
            call: &self.call,
        };
        conn.start(
            &self.watchdog,
            &mem,
            act.acked_features,
            &specs,
            &fds,
            &mut self.inflight,
        )?;
        if self.lost {
            // Whatever the guest queued while nobody listened: look now.
            for s in &specs {
                if let Some(k) = act.kicks.get(s.index) {
                    let _ = k.write(1);
                }
            }
        }
        self.lost = false;
        self.status
            .inflight
            .store(self.inflight.is_some(), Ordering::SeqCst);
        Ok(())
    }

    fn activate(&mut self, act: Box<Activation>) -> Result<(), VhostUserBlkError> {
        if self.active.is_some() {
            self.reset();
        }
        self.active = Some(act);
        self.lost = false;
        if self.conn.is_none() {
            if self.params.reconnect.is_some() {
                // The rings start when the back-end is back.
                self.lost = true;
                self.status.activated.store(true, Ordering::SeqCst);
                return Ok(());
            }
            self.active = None;
            return Err(VhostUserBlkError::NotConnected);
        }
        match self.start_rings() {
            Ok(()) => {
                self.status.activated.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                self.fail(&e);
                if self.params.reconnect.is_some() {
                    self.status.activated.store(true, Ordering::SeqCst);
                    Ok(())
                } else {
                    self.active = None;
                    self.lost = false;
                    Err(e)
                }
            }
        }
    }

    fn reset(&mut self) {
        if let Some(act) = self.active.take() {
            if let (Some(conn), false) = (self.conn.as_mut(), self.paused) {
                if let Err(e) = conn.stop(&self.watchdog, &act.started_rings()) {
                    self.fail(&e);
                }
            }
        }
        // A reset device starts over: a new in-flight area at the next
        // activation (the old one describes rings that no longer exist).
        self.inflight = None;
        self.lost = false;
        self.status.activated.store(false, Ordering::SeqCst);
        self.status.inflight.store(false, Ordering::SeqCst);
    }

    /// QMP `stop`, as QEMU's `vhost_dev_stop` at a VM stop: every started
    /// ring is disabled and stopped (`GET_VRING_BASE`), and the base the
    /// back-end returns is where the ring starts again at `Resume`. If the
    /// back-end does not answer, the connection is dropped as for any
    /// failure (the rings then restart at their used index).
    fn pause(&mut self) {
        if self.paused {
            return;
        }
        self.paused = true;
        let (Some(conn), Some(act)) = (self.conn.as_mut(), self.active.as_mut()) else {
            return;
        };
        if self.lost {
            return; // not started on this connection
        }
        let started = act.started_rings();
        match conn.stop(&self.watchdog, &started) {
            Ok(bases) => {
                for (i, base) in started.into_iter().zip(bases) {
                    if let Some(Some(r)) = act.rings.get_mut(i) {
                        // The protocol's 32-bit state carries a 16-bit index.
                        r.next_avail = base as u16;
                    }
                }
            }
            Err(e) => self.fail(&e),
        }
    }

    /// QMP `cont`: the rings of the active device start again where the
    /// stop left them (or at their used index after a lost connection).
    fn resume(&mut self) {
        if !self.paused {
            return;
        }
        self.paused = false;
        if self.active.is_none() || self.conn.is_none() {
            return; // a reconnection starts them
        }
        if let Err(e) = self.start_rings() {
            self.fail(&e);
        }
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) {
        if let Some(conn) = self.conn.as_mut() {
            if let Err(e) = conn.set_config(&self.watchdog, offset, data) {
                self.fail(&e);
            }
        }
    }

    fn shutdown(&mut self) {
        self.reset();
        self.set_conn(None);
        self.next_attempt = None;
    }

    fn reconnect(&mut self) {
        self.next_attempt = None;
        let p = Arc::clone(&self.params);
        let (conn, raw_config) =
            match Connection::open(&p.socket, p.num_queues, p.queue_size, &self.watchdog) {
                Ok(c) => c,
                Err(e) => {
                    log::debug!(
                        "vhost-user-blk '{}': reconnection failed: {}",
                        p.id,
                        error_chain(&e)
                    );
                    *lock(&self.status.last_error) = Some(error_chain(&e));
                    self.next_attempt = p.reconnect.map(|d| Instant::now() + d);
                    return;
                }
            };
        if let Some(act) = &self.active {
            if let Err(e) = features::check_reconnect(conn.backend_features(), act.acked_features) {
                drop(conn);
                let e = VhostUserBlkError::Backend(e);
                log::error!(
                    "vhost-user-blk '{}': the back-end at {} cannot resume the device: {}",
                    p.id,
                    p.socket.display(),
                    error_chain(&e)
                );
                *lock(&self.status.last_error) = Some(error_chain(&e));
                self.next_attempt = p.reconnect.map(|d| Instant::now() + d);
                return;
            }
        }
        self.status.connections.fetch_add(1, Ordering::Relaxed);
        self.status
            .protocol
            .store(conn.protocol().bits(), Ordering::Relaxed);
        self.set_conn(Some(conn));
        let config = features::guest_config(&raw_config, p.num_queues);
        let changed = {
            let mut c = lock(&self.config);
            let changed = *c != config;
            *c = config;
            changed
        };
        if changed {
            log::warn!(
                "vhost-user-blk '{}': the reconnected back-end has a different configuration space",
                p.id
            );
            if let Some(act) = &self.active {
                if let Err(e) = act.interrupt.trigger_config() {
                    log::error!("vhost-user-blk '{}': config interrupt: {e}", p.id);
                }
            }
        }
        let rings = self
            .active
            .as_ref()
            .map_or(0, |a| a.rings.iter().flatten().count());
        if self.active.is_some() && !self.paused {
            if let Err(e) = self.start_rings() {
                self.fail(&e);
                return;
            }
        }
        self.outage_logged = false;
        self.status.reconnects.fetch_add(1, Ordering::Relaxed);
        *lock(&self.status.last_error) = None;
        log::warn!(
            "vhost-user-blk '{}': reconnected to {}, {rings} ring(s) restarted{}",
            p.id,
            p.socket.display(),
            if rings == 0 {
                ""
            } else if self.inflight.is_some() {
                " (in-flight requests resubmitted by the back-end from its INFLIGHT_SHMFD area)"
            } else {
                " at their used index (no INFLIGHT_SHMFD: exact only for in-order back-ends)"
            }
        );
    }
}
