//! The export's protocol thread: listens on the Unix socket, serves one
//! front-end at a time with the `vhost` crate's [`BackendReqHandler`], and
//! goes back to listening when the front-end disconnects (after resetting
//! the back-end so the next front-end starts from scratch).
//!
//! The thread waits with `poll(2)` on a stop eventfd and the listening or
//! connected socket, so [`Server::stop`] never waits for a front-end. A
//! front-end that stops in the middle of a message is cut off by a receive
//! timeout, and `stop` also shuts the connection down.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::{BackendReqHandler, Error as VuError};
use vmm_sys_util::eventfd::EventFd;

use super::backend::DeviceBackend;
use crate::error_chain;

/// How long a front-end may take to send the rest of a message it started.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors starting the protocol thread.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The socket path exists and is not a socket.
    #[error("{0}: exists and is not a socket")]
    PathInUse(PathBuf),
    /// Binding or configuring the listening socket failed.
    #[error("cannot listen on {path}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating the stop eventfd or the thread failed.
    #[error("cannot start the export thread")]
    Spawn(#[source] io::Error),
}

/// Connection state shared with [`Server`] for queries.
#[derive(Debug, Default)]
pub struct ConnState {
    /// A front-end is connected.
    pub connected: AtomicBool,
    /// Front-ends accepted so far.
    pub connections: AtomicU64,
    /// Connections dropped because of a protocol error.
    pub protocol_errors: AtomicU64,
    /// Messages handled.
    pub messages: AtomicU64,
    conn: Mutex<Option<UnixStream>>,
    /// Held while a front-end is served: the protocol thread and
    /// [`Server::serve_stream`] serve one front-end at a time.
    serving: Mutex<()>,
}

/// The running protocol thread of one export.
#[derive(Debug)]
pub struct Server {
    thread: Option<JoinHandle<()>>,
    stop: Arc<EventFd>,
    state: Arc<ConnState>,
    path: PathBuf,
}

/// Binds `path`, replacing a stale socket file (as QEMU does).
fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| ServerError::Listen {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => return Err(ServerError::PathInUse(path.to_owned())),
        Err(_) => {}
    }
    let l = UnixListener::bind(path).map_err(|source| ServerError::Listen {
        path: path.to_owned(),
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| ServerError::Listen {
            path: path.to_owned(),
            source,
        })?;
    Ok(l)
}

/// Waits until `fd` or the stop eventfd is readable. Returns false on stop.
fn wait(stop: &EventFd, fd: RawFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("vhost-user-blk: poll: {}", io::Error::last_os_error());
            return false;
        }
        if fds[0].revents != 0 {
            return false;
        }
        if fds[1].revents != 0 {
            return true;
        }
    }
}

/// Whether the connection survives this error from `handle_request`.
///
/// Only errors raised by our request handlers (after the whole message was
/// read and, with REPLY_ACK, a NACK was sent) keep it; anything else means
/// the stream is broken or out of sync, or the front-end waits for a reply
/// that was not sent.
fn recoverable(e: &VuError) -> bool {
    matches!(e, VuError::ReqHandlerError(_))
}

impl Server {
    /// Starts the protocol thread of export `id`, listening on `path`.
    pub fn start(
        id: &str,
        path: &Path,
        backend: Arc<Mutex<DeviceBackend>>,
    ) -> Result<Server, ServerError> {
        let listener = bind(path)?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(ServerError::Spawn)?);
        let state = Arc::new(ConnState::default());
        let (t_stop, t_state) = (Arc::clone(&stop), Arc::clone(&state));
        let label = id.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("vu-blk {id}"))
            .spawn(move || serve(&label, listener, backend, &t_stop, &t_state))
            .map_err(ServerError::Spawn)?;
        Ok(Server {
            thread: Some(thread),
            stop,
            state,
            path: path.to_owned(),
        })
    }

    /// Connection state.
    pub fn state(&self) -> &Arc<ConnState> {
        &self.state
    }

    /// Socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves a front-end already connected over `stream` on the calling thread,
    /// exactly as the protocol thread serves an accepted connection: until it
    /// disconnects or breaks the protocol, then the back-end is reset for the next
    /// front-end. While a front-end that connected to the socket is served, this
    /// waits for it to go (and the protocol thread waits for this one), so the
    /// back-end still serves one front-end at a time. Returns false if the export
    /// was stopped before or meanwhile.
    pub(crate) fn serve_stream(
        &self,
        id: &str,
        stream: UnixStream,
        backend: &Arc<Mutex<DeviceBackend>>,
    ) -> bool {
        !serve_connection(id, stream, backend, &self.stop, &self.state)
    }

    /// Disconnects the front-end, stops the thread and removes the socket.
    /// Idempotent.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            log::error!("vhost-user-blk: cannot signal the export thread: {e}");
        }
        if let Some(c) = self
            .state
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            // Unblocks a receive in the middle of a message.
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if thread.join().is_err() {
            log::error!("vhost-user-blk: export thread panicked");
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::debug!("vhost-user-blk: removing {}: {e}", self.path.display());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    id: &str,
    listener: UnixListener,
    backend: Arc<Mutex<DeviceBackend>>,
    stop: &EventFd,
    state: &ConnState,
) {
    while wait(stop, listener.as_raw_fd()) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                log::warn!("vhost-user-blk {id}: accept: {e}");
                continue;
            }
        };
        if serve_connection(id, stream, &backend, stop, state) {
            return;
        }
    }
}

/// Whether the stop eventfd was signalled (it stays readable once written).
fn stopped(stop: &EventFd) -> bool {
    let mut fd = libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `fd` is a valid pollfd for the whole call; zero timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents != 0
}

/// Serves one connected front-end until it disconnects, breaks the protocol or
/// the export stops (then returns true), and resets the back-end for the next one.
/// Waits for a front-end being served by another thread to go first.
fn serve_connection(
    id: &str,
    stream: UnixStream,
    backend: &Arc<Mutex<DeviceBackend>>,
    stop: &EventFd,
    state: &ConnState,
) -> bool {
    let _serving = state.serving.lock().unwrap_or_else(|e| e.into_inner());
    if stopped(stop) {
        return true;
    }
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(MESSAGE_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(MESSAGE_TIMEOUT)))
        .and_then(|()| stream.try_clone());
    let clone = match setup {
        Ok(c) => c,
        Err(e) => {
            log::warn!("vhost-user-blk {id}: cannot set up the connection: {e}");
            return false;
        }
    };
    let fd = stream.as_raw_fd();
    *state.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(clone);
    state.connections.fetch_add(1, Ordering::Relaxed);
    state.connected.store(true, Ordering::SeqCst);
    log::info!("vhost-user-blk {id}: front-end connected");
    let mut handler = BackendReqHandler::from_stream(stream, Arc::clone(backend));
    let mut stopping = false;
    loop {
        if !wait(stop, fd) {
            stopping = true;
            break;
        }
        let res = handler.handle_request();
        state.messages.fetch_add(1, Ordering::Relaxed);
        let fatal = backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_fatal();
        match res {
            Ok(()) if !fatal => {}
            Ok(()) => {
                state.protocol_errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(VuError::Disconnected) => {
                log::info!("vhost-user-blk {id}: front-end disconnected");
                break;
            }
            Err(e) if recoverable(&e) && !fatal => {}
            Err(e) => {
                state.protocol_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "vhost-user-blk {id}: dropping the front-end: {}",
                    error_chain(&e)
                );
                break;
            }
        }
    }
    drop(handler);
    backend
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .disconnect();
    *state.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    state.connected.store(false, Ordering::SeqCst);
    stopping
}
