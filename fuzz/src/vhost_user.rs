//! `vhost_user`: arbitrary vhost-user front-end messages into a real export
//! ([`vmm_ref::export::Export`], the virtio-blk device model on an IOThread) over a
//! Unix stream socket, with eventfds or a memfd attached (SCM_RIGHTS) where the input
//! says so. The export serves the socket in-process (see [`check`]).
//!
//! Format: a flag byte (bit 0: negotiate first — SET_OWNER, then a valid memory table),
//! then messages: request (u8), flags (u8: bit 0 NEED_REPLY, bit 1 attach an eventfd,
//! bit 2 attach a 64 KiB memfd, bit 3 lie about the body size), body length (u8), body.
//!
//! Invariants: the export never crashes or hangs; after the front-end goes away the
//! export serves the next one (a GET_FEATURES reply arrives); nothing panics.

use std::fs::File;
use std::io::Read;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, OnceLock};

use iothread_registry::{IoThreadParams, IoThreadRegistry};
use vmm_ref::export::{Export, ExportConfig};
use vmm_ref::virtio::block::backend::BlockEngine;

use crate::bytes::{Reader, Writer};

const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;
const GET_FEATURES: u32 = 1;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const MEM_SIZE: u64 = 0x1_0000;

/// One front-end message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Request code.
    pub request: u8,
    /// Set NEED_REPLY.
    pub need_reply: bool,
    /// Attach an eventfd.
    pub eventfd: bool,
    /// Attach a memfd of 64 KiB.
    pub memfd: bool,
    /// Announce a body size one larger than sent.
    pub lie: bool,
    /// The body.
    pub body: Vec<u8>,
}

/// A decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Negotiate a valid owner and memory table first.
    pub negotiate: bool,
    /// The messages.
    pub messages: Vec<Message>,
}

impl Input {
    /// Decodes any byte string.
    pub fn decode(data: &[u8]) -> Input {
        let mut r = Reader::new(data);
        let negotiate = r.u8() & 1 == 1;
        let mut messages = Vec::new();
        while !r.is_empty() && messages.len() < 32 {
            let request = r.u8();
            let flags = r.u8();
            let len = usize::from(r.u8());
            let body = r.take(len).to_vec();
            messages.push(Message {
                request,
                need_reply: flags & 1 != 0,
                eventfd: flags & 2 != 0,
                memfd: flags & 4 != 0,
                lie: flags & 8 != 0,
                body,
            });
        }
        Input {
            negotiate,
            messages,
        }
    }

    /// Encodes (inverse of [`Input::decode`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(u8::from(self.negotiate));
        for m in &self.messages {
            let flags = u8::from(m.need_reply)
                | u8::from(m.eventfd) << 1
                | u8::from(m.memfd) << 2
                | u8::from(m.lie) << 3;
            let body = &m.body[..m.body.len().min(255)];
            w.u8(m.request)
                .u8(flags)
                .u8(u8::try_from(body.len()).unwrap_or(u8::MAX))
                .bytes(body);
        }
        w.finish()
    }
}

struct Fixture {
    _registry: IoThreadRegistry,
    export: Export,
}

fn fixture() -> &'static Mutex<Fixture> {
    static F: OnceLock<Mutex<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let registry = IoThreadRegistry::new();
        registry
            .create("io0", IoThreadParams::default())
            .expect("create IOThread");
        let dir = std::env::temp_dir().join(format!("vmm-ref-fuzz-vhost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fixture dir");
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
        let cfg = ExportConfig {
            id: "e0".into(),
            node_name: "d0".into(),
            socket: dir.join("export.sock"),
            num_queues: 2,
            queue_iothreads: vec!["io0".into(), "io0".into()],
            file: image,
            readonly: false,
            direct: false,
            engine: BlockEngine::Sync,
            locking: Default::default(),
        };
        let export = Export::start(cfg, &registry).expect("start export");
        Mutex::new(Fixture {
            _registry: registry,
            export,
        })
    })
}

fn memfd(size: u64) -> File {
    // SAFETY: a valid NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz-mem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("memfd size");
    f
}

/// Sends one message with `fds` attached; errors mean the daemon hung up.
fn send(s: &UnixStream, header: [u32; 3], body: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(12 + body.len());
    for v in header {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    buf.extend_from_slice(body);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; fields are filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        assert!(space <= std::mem::size_of_val(&cmsg));
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `cmsg`, large enough for one header with
        // `fds`; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    // SAFETY: `msg` describes live buffers; MSG_NOSIGNAL avoids SIGPIPE.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn negotiate(s: &UnixStream, mem: &File) -> std::io::Result<()> {
    send(s, [SET_OWNER, VERSION, 0], &[], &[])?;
    let mut body = Vec::new();
    for v in [1u32, 0] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    for v in [0u64, MEM_SIZE, 0x7f00_0000_0000, 0] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    send(
        s,
        [SET_MEM_TABLE, VERSION, body.len() as u32],
        &body,
        &[mem.as_raw_fd()],
    )
}

/// The export must answer a fresh front-end's GET_FEATURES.
fn still_serving(export: &Export) {
    let (front, back) = UnixStream::pair().expect("socket pair");
    send(&front, [GET_FEATURES, VERSION, 0], &[], &[]).expect("send GET_FEATURES");
    front
        .shutdown(std::net::Shutdown::Write)
        .expect("hang up after GET_FEATURES");
    assert!(export.serve_stream(back), "export stopped");
    let mut reply = [0u8; 20];
    (&front)
        .read_exact(&mut reply)
        .unwrap_or_else(|e| panic!("export stopped serving: {e}"));
    let req = u32::from_le_bytes(reply[0..4].try_into().unwrap_or_default());
    assert_eq!(req, GET_FEATURES, "reply to GET_FEATURES");
}

/// Runs an input; panics if the export stops serving.
///
/// The front-end is in-process: one end of a socket pair carries the input's
/// messages (with their fds) and is shut down for writing, and the export serves
/// the other end on this thread ([`Export::serve_stream`], the same code its
/// protocol thread runs for a front-end that connected to its socket) until the
/// front-end's hang-up. That saves a connect, an accept and two thread hand-overs
/// per front-end; the messages are the bytes the socket would carry. The export
/// is shared by all runs; after each front-end it resets its back-end
/// (`DeviceBackend::disconnect`: device stopped, vrings, features and memory
/// table forgotten), which `still_serving` checks, so a crash reproduces from its
/// input alone.
pub fn check(input: &Input) {
    let f = fixture().lock().unwrap_or_else(|e| e.into_inner());
    {
        let (s, back) = UnixStream::pair().expect("socket pair");
        // All messages are queued before the export reads any: at most 34 of
        // at most 267 bytes and two fds, far below the socket buffer. Should it
        // ever fill, the send fails (the rest is not sent) instead of hanging.
        s.set_nonblocking(true).expect("non-blocking front-end");
        let mem = memfd(MEM_SIZE);
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut ok = !input.negotiate || negotiate(&s, &mem).is_ok();
        for m in &input.messages {
            if !ok {
                break;
            }
            let flags = VERSION | if m.need_reply { NEED_REPLY } else { 0 };
            let size = m.body.len() as u32 + u32::from(m.lie);
            let mut fds = Vec::new();
            if m.eventfd {
                fds.push(evt.as_raw_fd());
            }
            if m.memfd {
                fds.push(mem.as_raw_fd());
            }
            ok = send(&s, [u32::from(m.request), flags, size], &m.body, &fds).is_ok();
        }
        // Hang up (replies stay readable): the export sees the end of the stream
        // after the last message, as when a front-end closes its socket.
        let _ = s.shutdown(std::net::Shutdown::Write);
        assert!(f.export.serve_stream(back), "export stopped");
        assert!(!f.export.is_connected(), "front-end still connected");
    }
    still_serving(&f.export);
}

/// Seeds: a valid negotiation then vring setup, and classic hostile messages.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let msg = |request: u8, body: Vec<u8>| Message {
        request,
        need_reply: true,
        eventfd: false,
        memfd: false,
        lie: false,
        body,
    };
    let le = |vals: &[u32]| {
        vals.iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let vring_addr = |index: u32, desc: u64| {
        let mut b = le(&[index, 0]);
        for v in [
            desc,
            desc.wrapping_add(0x1000),
            desc.wrapping_add(0x2000),
            0,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    };
    let setup = vec![
        msg(1, vec![]),
        msg(15, vec![]),
        msg(2, (1u64 << 32 | 1 << 30).to_le_bytes().to_vec()),
        msg(8, le(&[0, 256])),
        msg(9, vring_addr(0, 0x7f00_0000_0000)),
        msg(10, le(&[0, 0])),
        Message {
            eventfd: true,
            ..msg(12, 0u64.to_le_bytes().to_vec())
        },
        Message {
            eventfd: true,
            ..msg(13, 0u64.to_le_bytes().to_vec())
        },
        msg(18, le(&[0, 1])),
        msg(24, le(&[0, 16, 0])),
        msg(11, le(&[0, 0])),
    ];
    let hostile = vec![
        msg(9, vring_addr(7, u64::MAX - 0x100)),
        msg(8, le(&[0, 3])),
        Message {
            memfd: true,
            ..msg(5, le(&[9, 0]))
        },
        Message {
            lie: true,
            ..msg(2, vec![1, 2, 3])
        },
        msg(200, vec![0xff; 40]),
        msg(25, le(&[0, 1000, 0])),
    ];
    vec![
        (
            "setup".into(),
            Input {
                negotiate: true,
                messages: setup,
            }
            .encode(),
        ),
        (
            "hostile".into(),
            Input {
                negotiate: true,
                messages: hostile.clone(),
            }
            .encode(),
        ),
        (
            "hostile-no-owner".into(),
            Input {
                negotiate: false,
                messages: hostile,
            }
            .encode(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_round_trip_and_the_export_keeps_serving() {
        for (name, bytes) in seeds() {
            let input = Input::decode(&bytes);
            assert_eq!(input.encode(), bytes, "{name}");
            check(&input);
        }
    }
}
