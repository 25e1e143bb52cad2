//! The QMP socket server: one named `qmp` thread running a `poll(2)` loop over the
//! listening socket, a wake-up eventfd and every client.
//!
//! # Why a plain `poll(2)` thread and not an aio-poll `AioContext`
//!
//! The monitor manages the IOThreads (`object-del` stops and joins them, `qom-set`
//! wakes them), so it must not run inside one of them, and it needs none of aio-poll's
//! busy-polling: monitor traffic is a few messages per second. A dedicated thread with
//! `poll(2)` keeps the dependency one-way (qmp -> registry) and the loop small enough to
//! read in one sitting. Commands run inline on this thread, one at a time, like QEMU's
//! monitor dispatcher; the [`QmpMachine`] serialises with the rest of the VMM.
//!
//! # Hostile clients
//!
//! * All sockets are non-blocking; writes use `MSG_NOSIGNAL` (no `SIGPIPE`).
//! * Each client has an output queue of at most
//!   [`QmpServerConfig::max_output_queue`] bytes. Past half of it the server stops
//!   reading (and executing) that client's requests until it reads its replies; a client
//!   whose queue still overflows (events while it never reads) is disconnected alone.
//! * At most 4 reads of 64 KiB per client and loop iteration, so a client streaming
//!   100 MiB does not starve the others; the decoder skips oversized messages without
//!   buffering them ([`crate::qmp::protocol`]).
//! * A client that closes its write side still gets its replies; one that goes away
//!   entirely is removed (its already received complete requests still run).
//! * At most [`QmpServerConfig::max_clients`] connections; one more is accepted,
//!   answered with a `GenericError` line ("too many QMP clients") and closed.
//!   Before refusing, clients that hung up since the last `poll` (connect-and-close
//!   probes accepted in the same batch) are removed, so they cannot cost a live
//!   client its slot.
//! * A client must finish capabilities negotiation within
//!   [`QmpServerConfig::negotiation_timeout`] (default 10 s): clients that connect and
//!   never send `qmp_capabilities` cannot hold every slot and lock management out.
//!   Past the deadline the client gets a `GenericError` line and is disconnected;
//!   negotiated clients may stay idle for as long as they like.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::qmp::commands::{Dispatcher, FollowUp};
use crate::qmp::error::{CommandError, QmpError};
use crate::qmp::event::{Event, EventSender, EVENT_QUEUE_CAPACITY};
use crate::qmp::protocol::{encode_error, JsonStreamDecoder, MAX_MESSAGE_SIZE};
use crate::qmp::session::{Output, Session};
use crate::qmp::socket::{bind_listener, poll, send_nosignal};
use crate::qmp::QmpMachine;

/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// Reads per client and loop iteration.
const READS_PER_ROUND: usize = 4;
/// Connections accepted per loop iteration.
const ACCEPTS_PER_ROUND: usize = 16;
/// How long stopping the server keeps flushing queued output.
const STOP_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default of [`QmpServerConfig::negotiation_timeout`].
pub const DEFAULT_NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of a [`QmpServer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpServerConfig {
    /// Largest JSON message accepted from a client (default
    /// [`MAX_MESSAGE_SIZE`] = 1 MiB).
    pub max_message_size: usize,
    /// Largest per-client output queue in bytes (default 4 MiB).
    pub max_output_queue: usize,
    /// Most simultaneous clients (default 16).
    pub max_clients: usize,
    /// Mode of the socket file (default `0o600`).
    pub socket_mode: u32,
    /// How long a new client may take to complete capabilities negotiation
    /// (`qmp_capabilities`) before it is disconnected (default
    /// [`DEFAULT_NEGOTIATION_TIMEOUT`], 10 s; `None`: no limit).
    pub negotiation_timeout: Option<Duration>,
}

impl Default for QmpServerConfig {
    fn default() -> Self {
        QmpServerConfig {
            max_message_size: MAX_MESSAGE_SIZE,
            max_output_queue: 4 << 20,
            max_clients: 16,
            socket_mode: 0o600,
            negotiation_timeout: Some(DEFAULT_NEGOTIATION_TIMEOUT),
        }
    }
}

/// The socket file we created, identified by device + inode so that stopping never
/// removes a file someone else put at the path since.
#[derive(Clone, Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn remove_if_ours(&self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.file_type().is_socket() && meta.dev() == self.dev && meta.ino() == self.ino {
                if let Err(e) = fs::remove_file(&self.path) {
                    log::warn!("qmp: cannot remove {}: {e}", self.path.display());
                }
            }
        }
    }
}

/// A running QMP server. Dropping it stops the `qmp` thread (after flushing queued
/// output for up to a second), closes every connection and removes the socket file.
#[derive(Debug)]
pub struct QmpServer {
    socket: SocketFile,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    events: EventSender,
    thread: Option<JoinHandle<()>>,
    thread_id: ThreadId,
}

/// Make `path` free for a new socket: nothing there, or a stale socket (removed).
fn prepare_path(path: &Path) -> Result<(), QmpError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(QmpError::Inspect {
            path: path.to_path_buf(),
            source,
        }),
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(QmpError::InUse {
                    path: path.to_path_buf(),
                });
            }
            fs::remove_file(path).map_err(|source| QmpError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(_) => Err(QmpError::NotASocket {
            path: path.to_path_buf(),
        }),
    }
}

impl QmpServer {
    /// Serve QMP for `machine` on a new Unix socket at `path` (mode 0600), with the
    /// default [`QmpServerConfig`]. A stale socket file at `path` is replaced; any other
    /// file, or a socket a live server listens on, is an error.
    pub fn start(path: &Path, machine: Arc<dyn QmpMachine>) -> Result<QmpServer, QmpError> {
        Self::start_with_config(path, machine, QmpServerConfig::default())
    }

    /// [`QmpServer::start`] with explicit limits.
    pub fn start_with_config(
        path: &Path,
        machine: Arc<dyn QmpMachine>,
        config: QmpServerConfig,
    ) -> Result<QmpServer, QmpError> {
        Self::bind(path, config)?.serve(machine)
    }

    /// Creates the listening socket at `path` without serving it yet: a VMM
    /// binds before it creates the machine, so that a path it cannot use fails
    /// before any guest runs, and serves once the machine exists
    /// ([`QmpListener::serve`]). Connections made in between wait in the
    /// listen backlog and get their greeting when serving starts.
    pub fn bind(path: &Path, config: QmpServerConfig) -> Result<QmpListener, QmpError> {
        prepare_path(path)?;
        let bind_err = |source| QmpError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = bind_listener(path, config.socket_mode, 16).map_err(bind_err)?;
        let meta = fs::symlink_metadata(path).map_err(bind_err)?;
        let socket = SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        Ok(QmpListener {
            bound: Some((listener, socket)),
            config,
        })
    }
    /// A handle to emit events to every negotiated client.
    pub fn events(&self) -> EventSender {
        self.events.clone()
    }

    /// The socket path.
    #[allow(dead_code)] // for logs and tests
    pub fn path(&self) -> &Path {
        &self.socket.path
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            log::warn!("qmp: cannot wake the server thread to stop it: {e}");
        }
        let Some(thread) = self.thread.take() else {
            return;
        };
        if thread::current().id() == self.thread_id {
            // Dropped from a command on the qmp thread itself (e.g. inside
            // `QmpMachine::quit`): joining would wait for ourselves. The loop sees the
            // stop flag when the command returns and cleans up on its own.
            return;
        }
        if thread.join().is_err() {
            log::error!("qmp: server thread panicked");
        }
        self.socket.remove_if_ours();
    }
}

/// A QMP socket bound by [`QmpServer::bind`], not served yet. Dropping it
/// removes the socket file.
#[derive(Debug)]
pub struct QmpListener {
    /// `None` once served.
    bound: Option<(UnixListener, SocketFile)>,
    config: QmpServerConfig,
}

impl QmpListener {
    /// The socket path.
    #[allow(dead_code)] // for logs and tests
    pub fn path(&self) -> &Path {
        self.bound
            .as_ref()
            .map_or(Path::new(""), |(_, socket)| socket.path.as_path())
    }

    /// Serves QMP for `machine` on the bound socket, on a thread named `qmp`.
    pub fn serve(mut self, machine: Arc<dyn QmpMachine>) -> Result<QmpServer, QmpError> {
        // Always there: only `serve`, which takes `self`, and drop take it.
        let Some((listener, socket)) = self.bound.take() else {
            return Err(QmpError::Bind {
                path: PathBuf::new(),
                source: io::ErrorKind::NotConnected.into(),
            });
        };
        let config = self.config.clone();
        let wake = match EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                socket.remove_if_ours();
                return Err(QmpError::EventFd(e));
            }
        };
        let (tx, rx) = mpsc::sync_channel(EVENT_QUEUE_CAPACITY);
        let events = EventSender::new(tx, wake.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let mut worker = Worker {
            listener,
            wake: wake.clone(),
            stop: stop.clone(),
            events: rx,
            dispatcher: Dispatcher::new(machine),
            config,
            clients: Vec::new(),
            next_client: 0,
        };
        let worker_socket = socket.clone();
        let thread = thread::Builder::new()
            .name("qmp".to_string())
            .spawn(move || {
                if catch_unwind(AssertUnwindSafe(|| worker.run())).is_err() {
                    log::error!("qmp: server thread panicked; QMP is no longer served");
                }
                worker_socket.remove_if_ours();
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                socket.remove_if_ours();
                return Err(QmpError::Spawn(e));
            }
        };
        Ok(QmpServer {
            socket,
            stop,
            wake,
            events,
            thread_id: thread.thread().id(),
            thread: Some(thread),
        })
    }
}

impl Drop for QmpListener {
    fn drop(&mut self) {
        if let Some((_, socket)) = self.bound.take() {
            socket.remove_if_ours();
        }
    }
}

/// One connection.
struct Client {
    id: u64,
    stream: UnixStream,
    /// When capabilities negotiation must be complete (`None`: no limit).
    negotiation_deadline: Option<Instant>,
    session: Session,
    out: VecDeque<u8>,
    /// The peer closed its write side (EOF read).
    read_closed: bool,
    /// The peer is gone entirely (POLLHUP): output is discarded.
    hung_up: bool,
    /// To be removed (error, overflow).
    dead: bool,
}

impl Client {
    fn wants_read(&self, high_water: usize) -> bool {
        !self.dead
            && !self.read_closed
            && !self.session.has_pending()
            && (self.hung_up || self.out.len() < high_water)
    }

    fn finished(&self) -> bool {
        self.dead
            || (self.read_closed
                && !self.session.has_pending()
                && (self.out.is_empty() || self.hung_up))
    }

    /// Write as much queued output as the socket takes.
    fn flush(&mut self) {
        while !self.dead && !self.out.is_empty() {
            let (front, _) = self.out.as_slices();
            match send_nosignal(self.stream.as_raw_fd(), front) {
                Ok(0) => break,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("qmp: client {} write error: {e}", self.id);
                    self.dead = true;
                }
            }
        }
    }
}

/// The server thread's state.
struct Worker {
    listener: UnixListener,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    events: Receiver<Event>,
    dispatcher: Dispatcher,
    config: QmpServerConfig,
    clients: Vec<Client>,
    next_client: u64,
}

impl Worker {
    fn high_water(&self) -> usize {
        self.config.max_output_queue / 2
    }

    fn run(&mut self) {
        let mut buf = vec![0u8; READ_CHUNK];
        while !self.stop.load(Ordering::Acquire) {
            let high_water = self.high_water();
            let mut fds = Vec::with_capacity(2 + self.clients.len());
            fds.push(pollfd(self.wake.as_raw_fd(), libc::POLLIN));
            fds.push(pollfd(self.listener.as_raw_fd(), libc::POLLIN));
            for c in &self.clients {
                let mut events = 0;
                if c.wants_read(high_water) {
                    events |= libc::POLLIN;
                }
                if !c.out.is_empty() && !c.hung_up {
                    events |= libc::POLLOUT;
                }
                fds.push(pollfd(c.stream.as_raw_fd(), events));
            }
            if let Err(e) = poll(&mut fds, self.poll_timeout_ms(Instant::now())) {
                log::error!("qmp: poll failed, stopping the server: {e}");
                break;
            }
            if fds[0].revents != 0 {
                // Only a wake-up; the counter value does not matter.
                let _ = self.wake.read();
            }
            // Client i is fds[2 + i]: clients are only added (accept) and removed
            // (retain) after this loop.
            for (i, pfd) in fds.iter().skip(2).enumerate() {
                self.service(i, pfd.revents, &mut buf);
            }
            for i in 0..self.clients.len() {
                self.process_client(i);
            }
            self.drain_events();
            if fds[1].revents & libc::POLLIN != 0 {
                self.accept_clients();
            }
            self.expire_negotiations(Instant::now());
            for c in &mut self.clients {
                c.flush();
            }
            self.remove_finished();
        }
        self.flush_before_stop();
    }

    /// Handles what `poll` reported for client `i`.
    fn service(&mut self, i: usize, revents: i16, buf: &mut [u8]) {
        if revents == 0 {
            return;
        }
        if revents & libc::POLLNVAL != 0 {
            self.clients[i].dead = true;
            return;
        }
        if revents & libc::POLLHUP != 0 {
            self.clients[i].hung_up = true;
            self.clients[i].out.clear();
        }
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.read_client(i, buf);
        }
        if revents & (libc::POLLOUT | libc::POLLERR) != 0 {
            self.clients[i].flush();
        }
    }

    fn remove_finished(&mut self) {
        self.clients.retain(|c| {
            let done = c.finished();
            if done {
                log::debug!("qmp: client {} disconnected", c.id);
            }
            !done
        });
    }

    /// With every slot taken, looks (without waiting) for clients that hung up
    /// since the last `poll`, e.g. earlier connections of the same accept
    /// batch that closed at once, and handles them as the main loop would
    /// (their last requests still run), so that they do not cost a live
    /// client its slot.
    fn reap_hung_up(&mut self) {
        let mut fds: Vec<libc::pollfd> = self
            .clients
            .iter()
            .map(|c| pollfd(c.stream.as_raw_fd(), 0))
            .collect();
        if poll(&mut fds, 0).is_err() {
            return;
        }
        let mut buf = vec![0u8; READ_CHUNK];
        for (i, pfd) in fds.iter().enumerate() {
            // POLLHUP, POLLERR and POLLNVAL are reported without being asked for.
            if pfd.revents != 0 {
                self.service(i, pfd.revents, &mut buf);
                self.process_client(i);
                self.clients[i].flush();
            }
        }
        self.remove_finished();
    }

    /// The `poll` timeout: until the earliest negotiation deadline (rounded up to
    /// a millisecond, so that the deadline has passed on wake-up), else forever.
    fn poll_timeout_ms(&self, now: Instant) -> i32 {
        self.clients
            .iter()
            .filter(|c| !c.dead && !c.session.negotiated())
            .filter_map(|c| c.negotiation_deadline)
            .min()
            .map_or(-1, |deadline| {
                let ms = deadline
                    .saturating_duration_since(now)
                    .as_micros()
                    .div_ceil(1000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            })
    }

    /// Disconnects the clients whose negotiation deadline has passed, after
    /// telling them why (one non-blocking write: a client that does not read
    /// does not get to keep its slot).
    fn expire_negotiations(&mut self, now: Instant) {
        let Some(limit) = self.config.negotiation_timeout else {
            return;
        };
        for c in &mut self.clients {
            let expired = c.negotiation_deadline.is_some_and(|d| now >= d);
            if c.dead || c.session.negotiated() || !expired {
                continue;
            }
            log::warn!(
                "qmp: client {} did not negotiate capabilities within {limit:?}, disconnecting it",
                c.id
            );
            if !c.hung_up {
                c.out.extend(encode_error(
                    &CommandError::generic(format!(
                        "QMP capabilities negotiation did not complete within {limit:?}; \
                         closing the connection"
                    )),
                    None,
                ));
                c.flush();
            }
            c.dead = true;
        }
    }

    fn read_client(&mut self, i: usize, buf: &mut [u8]) {
        let high_water = self.high_water();
        for _ in 0..READS_PER_ROUND {
            let c = &mut self.clients[i];
            if !c.wants_read(high_water) {
                break;
            }
            match c.stream.read(buf) {
                Ok(0) => {
                    c.read_closed = true;
                }
                Ok(n) => {
                    c.session.feed(&buf[..n]);
                    self.process_client(i);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("qmp: client {} read error: {e}", c.id);
                    c.dead = true;
                }
            }
        }
    }

    /// Run client `i`'s decoded requests while its output queue has room.
    fn process_client(&mut self, i: usize) {
        let high_water = self.high_water();
        loop {
            let c = &mut self.clients[i];
            if c.dead || (!c.hung_up && c.out.len() >= high_water) {
                return;
            }
            let Some(outputs) = c.session.process_next(&self.dispatcher) else {
                return;
            };
            for output in outputs {
                match output {
                    Output::Reply(bytes) => self.queue(i, &bytes),
                    Output::FollowUp(FollowUp::None) => {}
                    Output::FollowUp(FollowUp::Event(event)) => self.broadcast(&event),
                    Output::FollowUp(FollowUp::Quit(event)) => {
                        self.broadcast(&event);
                        for c in &mut self.clients {
                            c.flush();
                        }
                        let machine = self.dispatcher.machine().clone();
                        if catch_unwind(AssertUnwindSafe(|| machine.quit())).is_err() {
                            log::error!("qmp: QmpMachine::quit panicked");
                        }
                    }
                }
            }
            // Events the machine emitted while the command ran (`STOP` after
            // `stop`) go out now: after its reply, before the next command's.
            // (Also keeps a flood of such commands from overflowing the
            // event channel, which is drained once per poll otherwise.)
            self.drain_events();
        }
    }

    /// Queue bytes for client `i`; disconnect it if its queue overflows.
    fn queue(&mut self, i: usize, bytes: &[u8]) {
        let max = self.config.max_output_queue;
        let c = &mut self.clients[i];
        if c.dead || c.hung_up {
            return;
        }
        if c.out.len().saturating_add(bytes.len()) > max {
            // Full only if the socket takes nothing more either.
            c.flush();
        }
        if c.dead {
            return;
        }
        if c.out.len().saturating_add(bytes.len()) > max {
            log::warn!(
                "qmp: client {} does not read its output ({} bytes queued), disconnecting it",
                c.id,
                c.out.len()
            );
            c.dead = true;
            c.out = VecDeque::new();
            return;
        }
        c.out.extend(bytes);
        if c.out.len() >= READ_CHUNK {
            c.flush();
        }
    }

    fn broadcast(&mut self, event: &Event) {
        let bytes = event.encode();
        for i in 0..self.clients.len() {
            if self.clients[i].session.negotiated() {
                self.queue(i, &bytes);
            }
        }
    }

    fn drain_events(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.broadcast(&event);
        }
    }

    fn accept_clients(&mut self) {
        for _ in 0..ACCEPTS_PER_ROUND {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_client(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. EMFILE: the connection stays pending and poll reports it
                    // again at once; back off instead of spinning.
                    log::warn!("qmp: accept failed: {e}");
                    thread::sleep(Duration::from_millis(50));
                    return;
                }
            }
        }
    }

    fn add_client(&mut self, stream: UnixStream) {
        if self.clients.len() >= self.config.max_clients {
            self.reap_hung_up();
        }
        if self.clients.len() >= self.config.max_clients {
            log::warn!(
                "qmp: refusing a connection: {} clients connected",
                self.clients.len()
            );
            // Say why before closing (one MSG_DONTWAIT write; the new socket's
            // buffer is empty, so it fits).
            let refusal = encode_error(
                &CommandError::generic(format!(
                    "too many QMP clients (at most {}); closing the connection",
                    self.config.max_clients
                )),
                None,
            );
            if let Err(e) = send_nosignal(stream.as_raw_fd(), &refusal) {
                log::debug!("qmp: cannot tell a refused client why: {e}");
            }
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("qmp: cannot make a client socket non-blocking: {e}");
            return;
        }
        let id = self.next_client;
        self.next_client += 1;
        log::debug!("qmp: client {id} connected");
        let mut client = Client {
            id,
            stream,
            negotiation_deadline: self
                .config
                .negotiation_timeout
                .and_then(|t| Instant::now().checked_add(t)),
            session: Session::with_decoder(JsonStreamDecoder::with_limit(
                self.config.max_message_size,
            )),
            out: VecDeque::new(),
            read_closed: false,
            hung_up: false,
            dead: false,
        };
        client.out.extend(Session::greeting(&self.dispatcher));
        client.flush();
        self.clients.push(client);
    }

    /// Give queued output (e.g. the `quit` reply and `SHUTDOWN`) a bounded chance to
    /// reach the clients before the connections close.
    fn flush_before_stop(&mut self) {
        self.drain_events();
        let deadline = Instant::now() + STOP_FLUSH_TIMEOUT;
        loop {
            for c in &mut self.clients {
                c.flush();
            }
            self.clients
                .retain(|c| !c.dead && !c.hung_up && !c.out.is_empty());
            let now = Instant::now();
            if self.clients.is_empty() || now >= deadline {
                break;
            }
            let mut fds: Vec<libc::pollfd> = self
                .clients
                .iter()
                .map(|c| pollfd(c.stream.as_raw_fd(), libc::POLLOUT))
                .collect();
            let wait = deadline.saturating_duration_since(now).as_millis();
            let wait = i32::try_from(wait).unwrap_or(i32::MAX).max(1);
            if poll(&mut fds, wait).is_err() {
                break;
            }
        }
        self.clients.clear();
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}
