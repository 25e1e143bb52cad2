//! The device model against a scripted fake back-end (a hand-written
//! vhost-user peer on a Unix socket): negotiation, ring set-up, clean stop,
//! reconnection with ring restore and the in-flight area, and hostile or
//! broken back-ends (garbage replies, unsolicited bytes, silence, missing
//! features). No KVM needed: guest memory is a shared memfd, kicks and
//! interrupts are plain eventfds.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVringState,
};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ};
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::features::PROTOCOL_FEATURES;
use super::*;
use crate::virtio::device::{VirtioInterrupt, VIRTIO_F_VERSION_1};

const CAPACITY: u64 = 8192;
const QSIZE: u16 = 16;
/// Guest-physical layout of the test rings: ring `i` at `RINGS + i * 0x1000`.
const RINGS: u64 = 0x10_0000;
/// Bytes written at the start of the fake's in-flight area, to recognise it.
const INFLIGHT_MARKER: &[u8; 8] = b"inflight";
/// Generous bound for anything asynchronous on a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

/// How one connection of the fake back-end behaves.
#[derive(Clone, Copy, Default)]
struct Script {
    /// Offer INFLIGHT_SHMFD (and hand out a marked area).
    inflight: bool,
    /// Leave CONFIG out of the protocol features.
    no_config: bool,
    /// Queues served (GET_QUEUE_NUM).
    queues: u64,
    /// Answer this request with 256 bytes of garbage.
    garbage_reply_to: Option<FrontendReq>,
    /// Send unsolicited bytes once all rings are enabled.
    garbage_when_enabled: bool,
    /// Close the connection when this request arrives.
    close_on: Option<FrontendReq>,
    /// Never answer this request (nor read anything after it).
    hang_on: Option<FrontendReq>,
    /// Entries taken from each ring while it ran: `GET_VRING_BASE` answers
    /// the base it was started at plus this.
    processed: u32,
}

/// One received message.
struct Msg {
    req: FrontendReq,
    body: Vec<u8>,
    files: Vec<File>,
}

impl Msg {
    fn u64(&self) -> u64 {
        u64::from_le_bytes(self.body[..8].try_into().unwrap())
    }

    fn vring_state(&self) -> (u32, u32) {
        let s = VhostUserVringState::from_slice(&self.body).unwrap();
        (s.index, s.num)
    }
}

/// The fake back-end: a listener thread serving connections one after the
/// other with `scripts[n]` (the last one repeats).
struct Fake {
    path: PathBuf,
    _dir: crate::qmp::test_util::TempDir,
    conns: Arc<Mutex<Vec<Vec<Msg>>>>,
    /// The connection being served (to kill it).
    current: Arc<Mutex<Option<UnixStream>>>,
}

impl Fake {
    fn start(scripts: Vec<Script>) -> Fake {
        let dir = crate::qmp::test_util::TempDir::new("vu-fake");
        let path = dir.path().join("vu.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let conns: Arc<Mutex<Vec<Vec<Msg>>>> = Arc::default();
        let current: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let log = Arc::clone(&conns);
        let cur = Arc::clone(&current);
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let script = scripts[n.min(scripts.len() - 1)];
                log.lock().unwrap().push(Vec::new());
                *cur.lock().unwrap() = stream.try_clone().ok();
                serve(stream, script, &log, n);
            }
        });
        Fake {
            path,
            _dir: dir,
            conns,
            current,
        }
    }

    /// The back-end "dies": its end of the current connection is shut down.
    fn kill(&self) {
        if let Some(s) = self.current.lock().unwrap().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Requests of connection `n` so far.
    fn reqs(&self, n: usize) -> Vec<FrontendReq> {
        self.conns
            .lock()
            .unwrap()
            .get(n)
            .map(|c| c.iter().map(|m| m.req).collect())
            .unwrap_or_default()
    }

    fn with_msgs<T>(&self, n: usize, f: impl FnOnce(&[Msg]) -> T) -> T {
        f(&self.conns.lock().unwrap()[n])
    }

    fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }
}

fn reply(stream: &mut UnixStream, req: FrontendReq, body: &[u8], fds: &[RawFd]) {
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&(req as u32).to_le_bytes());
    msg.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes()); // version 1, reply
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    if fds.is_empty() {
        let _ = stream.write_all(&msg);
    } else {
        let _ = stream.send_with_fds(&[&msg[..]], fds);
    }
}

fn serve(mut stream: UnixStream, script: Script, log: &Mutex<Vec<Vec<Msg>>>, n: usize) {
    let features = feature(VIRTIO_F_VERSION_1)
        | PROTOCOL_FEATURES
        | feature(VIRTIO_BLK_F_MQ)
        | feature(VIRTIO_BLK_F_FLUSH);
    let mut protocol = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG;
    if script.no_config {
        protocol.remove(VhostUserProtocolFeatures::CONFIG);
    }
    if script.inflight {
        protocol |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    let queues = if script.queues == 0 { 4 } else { script.queues };
    let mut bases = [0u32; 64];
    let mut enabled = 0u64;
    loop {
        let mut hdr = [0u8; 12];
        let mut fds = [-1 as RawFd; 8];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        }];
        // SAFETY: the iovec points at `hdr`, which may take any bytes.
        let Ok((got, nfds)) = (unsafe { stream.recv_with_fds(&mut iov, &mut fds) }) else {
            return;
        };
        // SAFETY: the first `nfds` entries were just received and are ours.
        let files: Vec<File> = fds[..nfds]
            .iter()
            .map(|&fd| unsafe { File::from_raw_fd(fd) })
            .collect();
        if got == 0 {
            return;
        }
        if got < hdr.len() && stream.read_exact(&mut hdr[got..]).is_err() {
            return;
        }
        let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let Ok(req) = FrontendReq::try_from(code) else {
            return;
        };
        log.lock().unwrap()[n].push(Msg {
            req,
            body: body.clone(),
            files,
        });
        if script.close_on == Some(req) {
            return;
        }
        if script.hang_on == Some(req) {
            // Keep the socket open, say nothing, until the peer gives up.
            let mut sink = [0u8; 64];
            while matches!(stream.read(&mut sink), Ok(k) if k > 0) {}
            return;
        }
        if script.garbage_reply_to == Some(req) {
            let _ = stream.write_all(&[0xff; 256]);
            continue;
        }
        let ack = |stream: &mut UnixStream| {
            if flags & 0x8 != 0 {
                reply(stream, req, &0u64.to_le_bytes(), &[]);
            }
        };
        match req {
            FrontendReq::GET_FEATURES => reply(&mut stream, req, &features.to_le_bytes(), &[]),
            FrontendReq::GET_PROTOCOL_FEATURES => {
                reply(&mut stream, req, &protocol.bits().to_le_bytes(), &[])
            }
            FrontendReq::GET_QUEUE_NUM => reply(&mut stream, req, &queues.to_le_bytes(), &[]),
            FrontendReq::GET_CONFIG => {
                let hdr = VhostUserConfig::from_slice(&body[..12]).unwrap();
                let mut cfg = vec![0u8; hdr.size as usize];
                cfg[..8].copy_from_slice(&CAPACITY.to_le_bytes());
                let mut out = body[..12].to_vec();
                out.extend_from_slice(&cfg);
                reply(&mut stream, req, &out, &[]);
            }
            FrontendReq::GET_INFLIGHT_FD => {
                let want = VhostUserInflight::from_slice(&body).unwrap();
                let area = crate::export::memory::tests::memfd(4096);
                area.write_all_at(INFLIGHT_MARKER, 0).unwrap();
                let info = VhostUserInflight::new(4096, 0, want.num_queues, want.queue_size);
                reply(&mut stream, req, info.as_slice(), &[area.as_raw_fd()]);
            }
            FrontendReq::SET_VRING_BASE => {
                let s = VhostUserVringState::from_slice(&body).unwrap();
                if let Some(b) = bases.get_mut(s.index as usize) {
                    *b = s.num;
                }
                ack(&mut stream);
            }
            FrontendReq::GET_VRING_BASE => {
                let s = VhostUserVringState::from_slice(&body).unwrap();
                let num = bases.get(s.index as usize).copied().unwrap_or(0) + script.processed;
                let out = VhostUserVringState::new(s.index, num);
                reply(&mut stream, req, out.as_slice(), &[]);
            }
            FrontendReq::SET_VRING_ENABLE => {
                let s = VhostUserVringState::from_slice(&body).unwrap();
                if s.num == 1 {
                    enabled |= 1 << s.index;
                } else {
                    enabled &= !(1 << s.index);
                }
                ack(&mut stream);
                if script.garbage_when_enabled && enabled.count_ones() == 2 {
                    let _ = stream.write_all(b"unsolicited garbage");
                }
            }
            _ => ack(&mut stream),
        }
    }
}

#[derive(Default)]
struct TestInterrupt {
    config: AtomicU32,
    needs_reset: AtomicU32,
}

impl VirtioInterrupt for TestInterrupt {
    fn trigger_queue(&self, _queue_index: u16) -> std::io::Result<()> {
        Ok(())
    }
    fn trigger_config(&self) -> std::io::Result<()> {
        self.config.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn set_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

fn params(fake: &Fake, num_queues: u16, reconnect: Option<Duration>) -> Params {
    Params {
        id: "vu0".into(),
        chardev: "c0".into(),
        socket: fake.path.clone(),
        num_queues,
        queue_size: QSIZE,
        reconnect,
    }
}

fn device(fake: &Fake, num_queues: u16, reconnect: Option<Duration>) -> (VhostUserBlk, EventFd) {
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let (dev, _) = VhostUserBlk::new(
        params(fake, num_queues, reconnect),
        call.try_clone().unwrap(),
    )
    .unwrap();
    (dev, call)
}

/// Guest memory and queues 0..`ready` enabled (the others not), plus kicks.
struct Guest {
    mem: GuestMemoryAtomic<vm_memory::GuestMemoryMmap>,
    kicks: Vec<EventFd>,
    interrupt: Arc<TestInterrupt>,
}

impl Guest {
    fn new(num_queues: u16) -> Guest {
        Guest {
            mem: GuestMemoryAtomic::new(crate::vm::memory::create_shared(16 << 20).unwrap()),
            kicks: (0..num_queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
            interrupt: Arc::default(),
        }
    }

    fn ctx(&self, num_queues: u16, ready: usize, acked: u64) -> ActivateContext {
        let queues = (0..usize::from(num_queues))
            .map(|i| {
                let mut q = Queue::new(QSIZE).unwrap();
                if i < ready {
                    let base = RINGS + i as u64 * 0x1000;
                    q.set_size(QSIZE);
                    q.set_desc_table_address(Some(base as u32), Some(0));
                    q.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
                    q.set_used_ring_address(Some((base + 0x200) as u32), Some(0));
                    q.set_ready(true);
                }
                q
            })
            .collect();
        ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts: self.kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            interrupt: self.interrupt.clone(),
            acked_features: acked,
        }
    }

    fn set_used_idx(&self, ring: u64, idx: u16) {
        use vm_memory::GuestAddressSpace;
        self.mem
            .memory()
            .write_obj(idx.to_le(), GuestAddress(RINGS + ring * 0x1000 + 0x202))
            .unwrap();
    }
}

/// Runs `f` on a thread and fails the test if it does not return within [`WAIT`].
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("{what} did not return within {WAIT:?}"))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const ACKED: u64 = feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BLK_F_FLUSH);

#[test]
fn negotiates_reads_config_and_starts_and_stops_rings() {
    let fake = Fake::start(vec![Script::default()]);
    let (mut dev, _call) = device(&fake, 2, None);
    assert_eq!(
        fake.reqs(0),
        [
            FrontendReq::SET_OWNER,
            FrontendReq::GET_FEATURES,
            FrontendReq::GET_PROTOCOL_FEATURES,
            FrontendReq::SET_PROTOCOL_FEATURES,
            FrontendReq::GET_QUEUE_NUM,
            FrontendReq::GET_CONFIG
        ]
    );
    // MQ, CONFIG and REPLY_ACK acknowledged, nothing else.
    let acked_protocol = fake.with_msgs(0, |m| m[3].u64());
    assert_eq!(acked_protocol, 0x209);
    // The guest sees the back-end's features within the mask, MQ for 2 queues.
    assert_eq!(
        dev.avail_features(),
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BLK_F_MQ) | feature(VIRTIO_BLK_F_FLUSH)
    );
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CAPACITY);
    let mut nq = [0u8; 2];
    dev.read_config(34, &mut nq);
    assert_eq!(
        u16::from_le_bytes(nq),
        2,
        "num_queues is the device's, not the back-end's 4"
    );
    assert!(dev.notifies_used_buffers_directly());

    let guest = Guest::new(2);
    // Only queue 0 enabled by the driver.
    dev.activate(guest.ctx(2, 1, ACKED)).unwrap();
    wait_for("ring start", || {
        fake.reqs(0).last() == Some(&FrontendReq::SET_VRING_ENABLE)
    });
    let started: Vec<FrontendReq> = fake.reqs(0)[6..].to_vec();
    assert_eq!(
        started,
        [
            FrontendReq::SET_FEATURES,
            FrontendReq::SET_MEM_TABLE,
            FrontendReq::SET_VRING_NUM,
            FrontendReq::SET_VRING_ADDR,
            FrontendReq::SET_VRING_BASE,
            FrontendReq::SET_VRING_CALL,
            FrontendReq::SET_VRING_KICK,
            FrontendReq::SET_VRING_ENABLE
        ]
    );
    fake.with_msgs(0, |m| {
        assert_eq!(m[6].u64(), ACKED | PROTOCOL_FEATURES);
        assert_eq!(m[7].files.len(), 1, "one memfd region");
        assert_eq!(m[8].vring_state(), (0, u32::from(QSIZE)));
        assert_eq!(m[10].vring_state(), (0, 0));
        assert_eq!(m[11].files.len(), 1, "call fd");
        assert_eq!(m[12].files.len(), 1, "kick fd");
        assert_eq!(m[13].vring_state(), (0, 1));
    });
    dev.reset();
    let stopped: Vec<FrontendReq> = fake.reqs(0)[14..].to_vec();
    assert_eq!(
        stopped,
        [FrontendReq::SET_VRING_ENABLE, FrontendReq::GET_VRING_BASE]
    );
    let info = dev.handle().info();
    assert!(info.connected && !info.activated);
    assert_eq!((info.disconnects, info.protocol_errors), (0, 0));
    dev.shutdown();
    assert!(!dev.handle().info().connected);
}

#[test]
fn reconnect_restores_rings_at_the_used_index_with_the_same_inflight_area() {
    let fake = Fake::start(vec![
        Script {
            inflight: true,
            ..Default::default()
        },
        Script {
            inflight: true,
            ..Default::default()
        },
    ]);
    let (mut dev, _call) = device(&fake, 2, Some(Duration::from_millis(50)));
    let guest = Guest::new(2);
    dev.activate(guest.ctx(2, 2, ACKED)).unwrap();
    let first = fake.reqs(0);
    assert!(first.contains(&FrontendReq::GET_INFLIGHT_FD));
    assert!(first.contains(&FrontendReq::SET_INFLIGHT_FD));
    assert!(dev.handle().info().inflight);
    // The back-end completed 5 requests on ring 0 and 3 on ring 1, then dies.
    guest.set_used_idx(0, 5);
    guest.set_used_idx(1, 3);
    while guest.kicks[0].read().is_ok() {}
    fake.kill();
    wait_for("reconnection", || {
        let i = dev.handle().info();
        i.reconnects == 1 && i.connected
    });
    let second = fake.reqs(1);
    assert!(
        !second.contains(&FrontendReq::GET_INFLIGHT_FD),
        "the area outlives the connection: {second:?}"
    );
    fake.with_msgs(1, |m| {
        let set = m
            .iter()
            .find(|m| m.req == FrontendReq::SET_INFLIGHT_FD)
            .expect("SET_INFLIGHT_FD on the new connection");
        let mut marker = [0u8; 8];
        set.files[0].read_exact_at(&mut marker, 0).unwrap();
        assert_eq!(&marker, INFLIGHT_MARKER, "the same area is handed over");
        let bases: Vec<(u32, u32)> = m
            .iter()
            .filter(|m| m.req == FrontendReq::SET_VRING_BASE)
            .map(Msg::vring_state)
            .collect();
        assert_eq!(bases, [(0, 5), (1, 3)], "rings resume at their used index");
    });
    assert_eq!(
        guest.kicks[0].read().unwrap(),
        1,
        "restored rings are kicked"
    );
    let info = dev.handle().info();
    assert_eq!((info.connections, info.disconnects), (2, 1));
    // A device reset drops the area: the next activation fetches a new one.
    dev.reset();
    dev.activate(guest.ctx(2, 2, ACKED)).unwrap();
    let n = fake
        .reqs(1)
        .iter()
        .filter(|r| **r == FrontendReq::GET_INFLIGHT_FD)
        .count();
    assert_eq!(n, 1);
    dev.shutdown();
}

#[test]
fn a_garbage_reply_disconnects_and_fails_activation_without_reconnect() {
    let fake = Fake::start(vec![Script {
        garbage_reply_to: Some(FrontendReq::SET_VRING_ADDR),
        ..Default::default()
    }]);
    let (mut dev, _call) = device(&fake, 1, None);
    let guest = Guest::new(1);
    let e = dev.activate(guest.ctx(1, 1, ACKED)).unwrap_err();
    let msg = crate::error_chain(&e);
    assert!(msg.contains("SET_VRING_ADDR"), "{msg}");
    let info = dev.handle().info();
    assert!(!info.connected && !info.activated);
    assert_eq!((info.disconnects, info.protocol_errors), (1, 1));
    assert!(info.last_error.unwrap().contains("SET_VRING_ADDR"));
    // Without a back-end and without reconnect=, activation is refused
    // (the transport then sets DEVICE_NEEDS_RESET); nothing hangs.
    let e = dev.activate(guest.ctx(1, 1, ACKED)).unwrap_err();
    assert!(crate::error_chain(&e).contains("not connected"), "{e}");
    dev.reset();
    dev.shutdown();
    assert_eq!(fake.connections(), 1, "no reconnection attempt");
}

#[test]
fn unsolicited_bytes_are_a_protocol_violation_and_reconnect_recovers() {
    let fake = Fake::start(vec![
        Script {
            garbage_when_enabled: true,
            ..Default::default()
        },
        Script::default(),
    ]);
    let (mut dev, _call) = device(&fake, 2, Some(Duration::from_millis(50)));
    let guest = Guest::new(2);
    dev.activate(guest.ctx(2, 2, ACKED)).unwrap();
    wait_for("reconnection", || dev.handle().info().reconnects == 1);
    let info = dev.handle().info();
    assert_eq!((info.disconnects, info.protocol_errors), (1, 1));
    assert!(info.connected && info.activated);
    let restored = fake
        .reqs(1)
        .iter()
        .filter(|r| **r == FrontendReq::SET_VRING_ENABLE)
        .count();
    assert_eq!(restored, 2, "both rings restarted on the new connection");
    dev.shutdown();
}

#[test]
fn a_silent_backend_is_cut_off_by_the_watchdog() {
    let fake = Fake::start(vec![
        Script {
            hang_on: Some(FrontendReq::SET_MEM_TABLE),
            ..Default::default()
        },
        Script::default(),
    ]);
    let (mut dev, _call) = device(&fake, 1, Some(Duration::from_millis(50)));
    let guest = Guest::new(1);
    // With reconnect=, activation succeeds; the rings start on the next back-end.
    let ctx = guest.ctx(1, 1, ACKED);
    let (mut dev, r) = within("activation", move || {
        let r = dev.activate(ctx);
        (dev, r)
    });
    r.unwrap();
    wait_for("reconnection", || dev.handle().info().reconnects == 1);
    assert!(fake.reqs(1).contains(&FrontendReq::SET_VRING_KICK));
    let info = dev.handle().info();
    assert_eq!(info.disconnects, 1);
    assert_eq!(
        info.protocol_errors, 0,
        "silence is not a protocol violation"
    );
    dev.shutdown();
}

#[test]
fn a_silent_backend_fails_activation_in_bounded_time() {
    let fake = Fake::start(vec![Script {
        hang_on: Some(FrontendReq::SET_VRING_KICK),
        ..Default::default()
    }]);
    let (mut dev, _call) = device(&fake, 1, None);
    let guest = Guest::new(1);
    let ctx = guest.ctx(1, 1, ACKED);
    let (mut dev, r) = within("activation", move || {
        let r = dev.activate(ctx);
        (dev, r)
    });
    let msg = crate::error_chain(&r.unwrap_err());
    assert!(
        msg.contains("did not finish SET_VRING_KICK within"),
        "{msg}"
    );
    dev.shutdown();
}

#[test]
fn unusable_backends_are_refused_with_the_reason() {
    let fake = Fake::start(vec![Script {
        no_config: true,
        ..Default::default()
    }]);
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let e = VhostUserBlk::new(params(&fake, 1, None), call)
        .err()
        .unwrap();
    assert_eq!(
        crate::error_chain(&e),
        "unusable vhost-user back-end: the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG (the configuration space)"
    );
    let fake = Fake::start(vec![Script {
        queues: 2,
        ..Default::default()
    }]);
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let e = VhostUserBlk::new(params(&fake, 4, None), call)
        .err()
        .unwrap();
    assert_eq!(
        crate::error_chain(&e),
        "unusable vhost-user back-end: the back-end serves 2 queues, the device has 4"
    );
    let fake = Fake::start(vec![Script {
        garbage_reply_to: Some(FrontendReq::GET_CONFIG),
        ..Default::default()
    }]);
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let e = VhostUserBlk::new(params(&fake, 1, None), call)
        .err()
        .unwrap();
    assert!(
        crate::error_chain(&e).starts_with("vhost-user request GET_CONFIG failed"),
        "{e}"
    );
    let dir = crate::qmp::test_util::TempDir::new("vu-none");
    let p = Params {
        socket: dir.path().join("nobody.sock"),
        ..params(&fake, 1, None)
    };
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let e = VhostUserBlk::new(p, call).err().unwrap();
    assert!(
        crate::error_chain(&e).starts_with("cannot connect to the vhost-user back-end at"),
        "{e}"
    );
}

#[test]
fn config_writes_reach_the_backend_only_for_writeback() {
    let fake = Fake::start(vec![Script::default()]);
    let (mut dev, _call) = device(&fake, 1, None);
    // The fake offers no CONFIG_WCE: the write is ignored.
    dev.write_config(WRITEBACK_OFFSET, &[1]);
    dev.write_config(0, &[1, 2, 3, 4]);
    let mut b = [0u8; 1];
    dev.read_config(WRITEBACK_OFFSET, &mut b);
    assert_eq!(b, [0]);
    dev.reset();
    assert!(!fake.reqs(0).contains(&FrontendReq::SET_CONFIG));
    dev.shutdown();
}

#[test]
fn losing_the_backend_while_idle_is_logged_as_a_disconnect() {
    let fake = Fake::start(vec![Script::default()]);
    let (mut dev, _call) = device(&fake, 1, None);
    let guest = Guest::new(1);
    dev.activate(guest.ctx(1, 1, ACKED)).unwrap();
    fake.kill();
    wait_for("disconnect", || !dev.handle().info().connected);
    let info = dev.handle().info();
    assert_eq!((info.disconnects, info.protocol_errors), (1, 0));
    assert!(
        info.activated,
        "the device stays activated, its queues stopped"
    );
    assert_eq!(
        info.last_error.as_deref(),
        Some("the back-end closed the connection")
    );
    // Reset and shutdown still work without a back-end.
    dev.reset();
    dev.shutdown();
}

#[test]
fn stop_and_cont_stop_the_rings_and_restart_them_where_they_stood() {
    use FrontendReq as R;
    let fake = Fake::start(vec![Script {
        processed: 5,
        ..Default::default()
    }]);
    let (mut dev, _call) = device(&fake, 2, None);
    let guest = Guest::new(2);
    dev.activate(guest.ctx(2, 2, ACKED)).unwrap();
    let enables = |reqs: &[R]| reqs.iter().filter(|r| **r == R::SET_VRING_ENABLE).count();
    wait_for("ring start", || enables(&fake.reqs(0)) == 2);
    let h = dev.handle();
    let n = fake.reqs(0).len();
    h.pause();
    assert_eq!(
        fake.reqs(0)[n..],
        [
            R::SET_VRING_ENABLE,
            R::SET_VRING_ENABLE,
            R::GET_VRING_BASE,
            R::GET_VRING_BASE
        ]
    );
    fake.with_msgs(0, |m| {
        assert_eq!(m[n].vring_state(), (0, 0), "disabled");
        assert_eq!(m[n + 1].vring_state(), (1, 0), "disabled");
    });
    // Stopped twice: nothing more is sent.
    h.pause();
    assert_eq!(fake.reqs(0).len(), n + 4);
    // cont: both rings start again at the base the back-end returned.
    h.resume();
    let restart = [
        R::SET_FEATURES,
        R::SET_MEM_TABLE,
        R::SET_VRING_NUM,
        R::SET_VRING_ADDR,
        R::SET_VRING_BASE,
        R::SET_VRING_CALL,
        R::SET_VRING_KICK,
        R::SET_VRING_NUM,
        R::SET_VRING_ADDR,
        R::SET_VRING_BASE,
        R::SET_VRING_CALL,
        R::SET_VRING_KICK,
        R::SET_VRING_ENABLE,
        R::SET_VRING_ENABLE,
    ];
    assert_eq!(fake.reqs(0)[n + 4..], restart);
    fake.with_msgs(0, |m| {
        let bases: Vec<(u32, u32)> = m[n + 4..]
            .iter()
            .filter(|m| m.req == R::SET_VRING_BASE)
            .map(Msg::vring_state)
            .collect();
        assert_eq!(bases, [(0, 5), (1, 5)], "where the stop left the rings");
    });
    h.resume();
    assert_eq!(fake.reqs(0).len(), n + 4 + restart.len(), "cont twice");
    // A reset while stopped does not stop the stopped rings again; the
    // device stays usable.
    h.pause();
    let m = fake.reqs(0).len();
    dev.reset();
    h.resume();
    assert_eq!(
        fake.reqs(0).len(),
        m,
        "reset or cont after a reset while stopped"
    );
    let info = h.info();
    assert!(info.connected && !info.activated);
    assert_eq!((info.disconnects, info.protocol_errors), (0, 0));
    dev.activate(guest.ctx(2, 1, ACKED)).unwrap();
    wait_for("ring start after the reset", || {
        enables(&fake.reqs(0)[m..]) == 1
    });
    dev.shutdown();
}
