//! The few system calls std does not offer in the form we need; all of this module's
//! `unsafe` is here.
//!
//! * [`bind_listener`]: `socket` + `bind` + `chmod` + `listen`, so the socket file has
//!   its final mode before anyone can connect, whatever the process umask is (std's
//!   `UnixListener::bind` listens right after `bind`).
//! * [`send_nosignal`]: `send(MSG_NOSIGNAL)`: a peer that went away yields `EPIPE`
//!   instead of killing the VMM with `SIGPIPE`.
//! * [`poll`]: `poll(2)` over a slice of `pollfd`s.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Create a listening, non-blocking, close-on-exec Unix stream socket at `path` whose
/// file mode is `mode`. The path must not exist. On error nothing is left behind.
pub(crate) fn bind_listener(path: &Path, mode: u32, backlog: i32) -> io::Result<UnixListener> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // Leave room for the terminating NUL (the zeroed tail).
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path must be 1..{} bytes without NUL",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let addr_len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;

    // SAFETY: plain syscall with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    // SAFETY: `addr` is an initialised sockaddr_un and `addr_len` does not exceed its
    // size (checked above); the kernel only reads it.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            addr_len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let finish = || -> io::Result<()> {
        // fchmod on a socket fd does not change the file's mode on Linux: chmod the path,
        // before listen(), so no one can connect while the mode is the umask's.
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
        // SAFETY: plain syscall on a descriptor we own; the result is checked.
        if unsafe { libc::listen(sock.as_raw_fd(), backlog) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(sock))
}

/// `send(fd, buf, MSG_NOSIGNAL | MSG_DONTWAIT)`.
pub(crate) fn send_nosignal(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid readable slice of `buf.len()` bytes for the call's
    // duration; an invalid `fd` only makes the call fail.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        // Non-negative and at most buf.len(), so it fits.
        Ok(n as usize)
    }
}

/// `poll(2)`, retried on `EINTR`. Returns the number of ready descriptors.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::UnixStream;

    #[test]
    fn bind_sets_mode_and_listens() {
        let dir = crate::qmp::test_util::TempDir::new("sock");
        let path = dir.path().join("s");
        // SAFETY: umask only changes this process's file creation mask.
        let old = unsafe { libc::umask(0) };
        let listener = bind_listener(&path, 0o600, 4);
        // SAFETY: as above, restores the previous mask.
        unsafe { libc::umask(old) };
        let listener = listener.unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let _c = UnixStream::connect(&path).unwrap();
        assert!(listener.accept().is_ok());
        // Path in use: bind fails and leaves the existing file alone.
        assert!(bind_listener(&path, 0o600, 4).is_err());
        assert!(path.exists());
    }

    #[test]
    fn rejects_bad_paths() {
        let long = "/tmp/".to_string() + &"x".repeat(200);
        assert_eq!(
            bind_listener(Path::new(&long), 0o600, 4)
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(bind_listener(Path::new(""), 0o600, 4).is_err());
    }
}
