//! Export tests against a recording mock device: a well-behaved front-end
//! (the `vhost` crate's `Frontend`), reconnects, holders, and hostile
//! front-ends speaking raw protocol bytes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iothread_registry::{IoThreadHolder, IoThreadParams, IoThreadRegistry};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;
use crate::virtio::device::{
    read_config_bytes, ActivateContext, ActivateError, VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX,
};

const QUEUES: usize = 2;
const MEM_SIZE: u64 = 1 << 20;
/// The front-end's (fake) virtual address of guest memory.
const UADDR: u64 = 0x7f00_0000_0000;
/// Ring layout inside guest memory, per queue `q`: desc at 0x1000 + q*0x4000,
/// avail at +0x1000, used at +0x2000 (size 64).
const RING_SIZE: u16 = 64;

fn desc_gpa(q: usize) -> u64 {
    0x1000 + q as u64 * 0x4000
}

#[derive(Debug, Clone, PartialEq)]
struct Activation {
    ready: Vec<bool>,
    sizes: Vec<u16>,
    desc: Vec<u64>,
    next_avail: Vec<u16>,
    acked: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Activate(Activation),
    Reset,
    Shutdown,
}

#[derive(Default)]
struct Recorder {
    events: Vec<Event>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    written: Vec<(u64, Vec<u8>)>,
}

struct MockDevice {
    rec: Arc<Mutex<Recorder>>,
    config: Vec<u8>,
    max: Vec<u16>,
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        crate::virtio::device::TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max
    }
    fn avail_features(&self) -> u64 {
        feature(VIRTIO_RING_F_EVENT_IDX) | (1 << 12)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.rec
            .lock()
            .unwrap()
            .written
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut rec = self.rec.lock().unwrap();
        rec.events.push(Event::Activate(Activation {
            ready: ctx.queues.iter().map(|q| q.ready()).collect(),
            sizes: ctx.queues.iter().map(|q| q.size()).collect(),
            desc: ctx.queues.iter().map(|q| q.desc_table()).collect(),
            next_avail: ctx.queues.iter().map(|q| q.next_avail()).collect(),
            acked: ctx.acked_features,
        }));
        rec.interrupt = Some(ctx.interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        let mut rec = self.rec.lock().unwrap();
        rec.events.push(Event::Reset);
        rec.interrupt = None;
    }
    fn shutdown(&mut self) {
        self.rec.lock().unwrap().events.push(Event::Shutdown);
    }
}

fn use_feature() -> u64 {
    feature(VIRTIO_RING_F_EVENT_IDX)
}
use crate::virtio::device::feature;

struct Fixture {
    registry: IoThreadRegistry,
    export: Option<Export>,
    rec: Arc<Mutex<Recorder>>,
    socket: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "vu-blk-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn fixture(tag: &str, registry: Option<IoThreadRegistry>) -> Fixture {
    let registry = registry.unwrap_or_else(|| {
        let r = IoThreadRegistry::new();
        r.create("io0", IoThreadParams::default()).unwrap();
        r.create("io1", IoThreadParams::default()).unwrap();
        r
    });
    let dir = TempDir::new(tag);
    let socket = dir.0.join("e.sock");
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let mut config = vec![0u8; VIRTIO_BLK_CONFIG_SIZE as usize];
    config[..8].copy_from_slice(&2048u64.to_le_bytes());
    let device = MockDevice {
        rec: Arc::clone(&rec),
        config,
        max: vec![256; QUEUES],
    };
    let cfg = ExportConfig {
        id: format!("e-{tag}"),
        node_name: format!("d-{tag}"),
        socket: socket.clone(),
        num_queues: QUEUES as u16,
        queue_iothreads: vec!["io0".into(), "io1".into()],
        file: PathBuf::from("/dev/null"),
        readonly: false,
        direct: false,
        engine: Default::default(),
        locking: Default::default(),
    };
    let export = Export::with_device(cfg, &registry, Box::new(device)).unwrap();
    Fixture {
        registry,
        export: Some(export),
        rec,
        socket,
        _dir: dir,
    }
}

fn memfd(size: u64) -> File {
    memory::tests::memfd(size)
}

/// A connected, negotiated front-end with its guest memory.
struct Front {
    fe: Frontend,
    mem: File,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
}

fn connect(f: &Fixture) -> Front {
    let mut fe = Frontend::connect(&f.socket, QUEUES as u64).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    assert_ne!(features & (1 << 32), 0, "VERSION_1 offered");
    fe.set_features(features).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(pf.contains(
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    ));
    fe.set_protocol_features(pf).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().unwrap(), QUEUES as u64);
    let mem = memfd(MEM_SIZE);
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE,
        userspace_addr: UADDR,
        mmap_offset: 0,
        mmap_handle: mem.as_raw_fd(),
    }])
    .unwrap();
    Front {
        fe,
        mem,
        kicks: (0..QUEUES).map(|_| EventFd::new(0).unwrap()).collect(),
        calls: (0..QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect(),
    }
}

fn ring_config(q: usize) -> VringConfigData {
    let d = desc_gpa(q);
    VringConfigData {
        queue_max_size: 256,
        queue_size: RING_SIZE,
        flags: 0,
        desc_table_addr: UADDR + d,
        avail_ring_addr: UADDR + d + 0x1000,
        used_ring_addr: UADDR + d + 0x2000,
        log_addr: None,
    }
}

fn setup_ring(front: &Front, q: usize, base: u16) {
    front.fe.set_vring_num(q, RING_SIZE).unwrap();
    front.fe.set_vring_base(q, base).unwrap();
    front.fe.set_vring_addr(q, &ring_config(q)).unwrap();
    front.fe.set_vring_kick(q, &front.kicks[q]).unwrap();
    front.fe.set_vring_call(q, &front.calls[q]).unwrap();
}

fn events(f: &Fixture) -> Vec<Event> {
    f.rec.lock().unwrap().events.clone()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn session_activates_per_enabled_ring_and_returns_bases() {
    let f = fixture("session", None);
    let mut front = connect(&f);
    setup_ring(&front, 0, 3);
    setup_ring(&front, 1, 0);
    // PROTOCOL_FEATURES negotiated: rings start disabled.
    assert!(events(&f).is_empty());
    front.fe.set_vring_enable(0, true).unwrap();
    front.fe.set_vring_enable(1, true).unwrap();
    let ev = events(&f);
    assert_eq!(ev.len(), 3, "{ev:?}");
    let Event::Activate(a) = &ev[0] else {
        panic!("{ev:?}")
    };
    assert_eq!(a.ready, vec![true, false]);
    assert_eq!(
        a.desc[0],
        desc_gpa(0),
        "front-end address translated to guest-physical"
    );
    assert_eq!(a.sizes[0], RING_SIZE);
    assert_eq!(a.next_avail[0], 3);
    assert_ne!(a.acked & use_feature(), 0);
    assert_eq!(ev[1], Event::Reset);
    let Event::Activate(b) = &ev[2] else {
        panic!("{ev:?}")
    };
    assert_eq!(b.ready, vec![true, true]);
    assert_eq!(b.desc[1], desc_gpa(1));
    assert!(f.export.as_ref().unwrap().status().active);

    // The device's interrupt reaches the current call fd, also after the
    // front-end replaced it while running.
    let irq = f.rec.lock().unwrap().interrupt.clone().unwrap();
    irq.trigger_queue(1).unwrap();
    assert_eq!(front.calls[1].read().unwrap(), 1);
    let new_call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    front.fe.set_vring_call(1, &new_call).unwrap();
    irq.trigger_queue(1).unwrap();
    assert_eq!(new_call.read().unwrap(), 1);
    assert!(front.calls[1].read().is_err());

    // A new memory table while the rings run (memory hot-plug): the device
    // is re-activated on the new mapping with the same rings.
    let n_before = events(&f).len();
    let mem2 = memfd(MEM_SIZE);
    front
        .fe
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE,
            userspace_addr: UADDR,
            mmap_offset: 0,
            mmap_handle: mem2.as_raw_fd(),
        }])
        .unwrap();
    let ev = events(&f);
    assert_eq!(ev.get(n_before), Some(&Event::Reset), "{ev:?}");
    assert!(
        matches!(ev.get(n_before + 1), Some(Event::Activate(a)) if a.ready == vec![true, true]),
        "{ev:?}"
    );
    front.mem = mem2;

    // The device "completed" 7 requests on queue 0: used->idx = 7.
    front
        .mem
        .write_all_at(&7u16.to_le_bytes(), desc_gpa(0) + 0x2000 + 2)
        .unwrap();
    assert_eq!(front.fe.get_vring_base(0).unwrap(), 7);
    // Queue 1 keeps running alone.
    let ev = events(&f);
    let Event::Activate(c) = ev.last().unwrap() else {
        panic!("{ev:?}")
    };
    assert_eq!(c.ready, vec![false, true]);
    assert_eq!(front.fe.get_vring_base(1).unwrap(), 0);
    assert_eq!(events(&f).last(), Some(&Event::Reset));
    assert!(!f.export.as_ref().unwrap().status().active);

    // Restart queue 0 where it stopped.
    front.fe.set_vring_base(0, 7).unwrap();
    front.fe.set_vring_kick(0, &front.kicks[0]).unwrap();
    let ev = events(&f);
    let Event::Activate(d) = ev.last().unwrap() else {
        panic!("{ev:?}")
    };
    assert_eq!(d.ready, vec![true, false]);
    assert_eq!(d.next_avail[0], 7);
}

#[test]
fn config_space_is_bounds_checked() {
    let f = fixture("config", None);
    let mut front = connect(&f);
    let flags = vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE;
    let (_, cfg) = front
        .fe
        .get_config(
            0,
            VIRTIO_BLK_CONFIG_SIZE,
            flags,
            &[0u8; VIRTIO_BLK_CONFIG_SIZE as usize],
        )
        .unwrap();
    assert_eq!(&cfg[..8], &2048u64.to_le_bytes());
    let (_, cfg) = front.fe.get_config(8, 4, flags, &[0u8; 4]).unwrap();
    assert_eq!(cfg, vec![0u8; 4]);
    // Past the end: see `config_errors_answer_size_zero` (the crate's
    // front-end waits for a payload that an error reply does not have).
    // writeback byte (offset 32)
    front.fe.set_config(32, flags, &[1]).unwrap();
    assert!(front.fe.set_config(60, flags, &[1]).is_err());
    assert_eq!(f.rec.lock().unwrap().written, vec![(32, vec![1])]);
    // Still usable after the refusals.
    assert_eq!(front.fe.get_queue_num().unwrap(), QUEUES as u64);
}

#[test]
fn reconnect_resets_state_and_holders_follow_the_export() {
    let mut f = fixture("reconnect", None);
    let holder = IoThreadHolder::block_node("d-reconnect");
    assert_eq!(f.registry.holders("io0").unwrap(), vec![holder.clone()]);
    assert_eq!(f.registry.holders("io1").unwrap(), vec![holder.clone()]);
    {
        let front = connect(&f);
        setup_ring(&front, 0, 0);
        let mut fe = front.fe;
        fe.set_vring_enable(0, true).unwrap();
        // Dropped without stopping the rings.
    }
    wait_until("disconnect", || !f.export.as_ref().unwrap().is_connected());
    assert_eq!(events(&f).last(), Some(&Event::Reset));
    // The second front-end starts from scratch (rings disabled, bases 0).
    let mut front = connect(&f);
    setup_ring(&front, 1, 0);
    front.fe.set_vring_enable(1, true).unwrap();
    let ev = events(&f);
    let Event::Activate(a) = ev.last().unwrap() else {
        panic!("{ev:?}")
    };
    assert_eq!(a.ready, vec![false, true]);
    let st = f.export.as_ref().unwrap().status();
    assert_eq!(st.connections, 2);
    assert!(st.connected);
    assert_eq!(st.info.kind, "vhost-user-blk");
    assert_eq!(
        serde_json::to_value(f.export.as_ref().unwrap().info()).unwrap(),
        serde_json::json!({"id": "e-reconnect", "type": "vhost-user-blk", "node-name": "d-reconnect", "shutting-down": false})
    );
    // IOThreads cannot be deleted while the export holds them.
    assert!(f.registry.delete("io0").is_err());
    // Stopping with a connected front-end: it is cut off, the device shut
    // down, the socket removed and the IOThreads released.
    f.export.take().unwrap().stop();
    assert!(matches!(events(&f).last(), Some(Event::Shutdown)));
    assert!(!f.socket.exists());
    assert!(f.registry.holders("io0").unwrap().is_empty());
    assert!(f.registry.holders("io1").unwrap().is_empty());
    assert!(front.fe.get_queue_num().is_err());
    f.registry.delete("io0").unwrap();
}

#[test]
fn start_fails_cleanly() {
    let registry = IoThreadRegistry::new();
    registry.create("io0", IoThreadParams::default()).unwrap();
    let dir = TempDir::new("startfail");
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let mk = || -> Box<dyn VirtioDevice> {
        Box::new(MockDevice {
            rec: Arc::clone(&rec),
            config: vec![],
            max: vec![256; QUEUES],
        })
    };
    let cfg = ExportConfig {
        id: "e0".into(),
        node_name: "d0".into(),
        socket: dir.0.join("s"),
        num_queues: 2,
        queue_iothreads: vec!["io0".into(), "nope".into()],
        file: PathBuf::from("/dev/null"),
        readonly: false,
        direct: false,
        engine: Default::default(),
        locking: Default::default(),
    };
    // Unknown IOThread: nothing stays held.
    assert!(matches!(
        Export::with_device(cfg.clone(), &registry, mk()),
        Err(ExportError::IoThread { .. })
    ));
    assert!(registry.holders("io0").unwrap().is_empty());
    // Socket path is a regular file: refused, holders released.
    std::fs::write(dir.0.join("f"), b"x").unwrap();
    let cfg2 = ExportConfig {
        socket: dir.0.join("f"),
        queue_iothreads: vec!["io0".into(), "io0".into()],
        ..cfg.clone()
    };
    assert!(matches!(
        Export::with_device(cfg2, &registry, mk()),
        Err(ExportError::Server(_))
    ));
    assert!(registry.holders("io0").unwrap().is_empty());
    // Queue count mismatch.
    let cfg3 = ExportConfig {
        num_queues: 1,
        queue_iothreads: vec!["io0".into()],
        ..cfg
    };
    assert!(matches!(
        Export::with_device(cfg3, &registry, mk()),
        Err(ExportError::DeviceQueues { .. })
    ));
}

// ------------------------------------------------------------ raw protocol

const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;

fn raw_connect(f: &Fixture) -> UnixStream {
    let s = UnixStream::connect(&f.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn send(s: &UnixStream, req: u32, flags: u32, body: &[u8], fds: &[i32]) {
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&req.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    let n = s.send_with_fds(&[&msg[..]], fds).unwrap();
    assert_eq!(n, msg.len());
}

/// Reads one reply: (request, body).
fn recv(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut hdr = [0u8; 12];
    s.read_exact(&mut hdr).unwrap();
    let req = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
    let mut body = vec![0u8; size as usize];
    s.read_exact(&mut body).unwrap();
    (req, body)
}

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// GET_FEATURES(1), SET_FEATURES(2), SET_PROTOCOL_FEATURES(16) with
/// REPLY_ACK, SET_MEM_TABLE(5) of `mem`.
fn raw_negotiate(s: &mut UnixStream, mem: &File) {
    send(s, 1, VERSION, &[], &[]);
    let (req, body) = recv(s);
    assert_eq!(req, 1);
    let features = u64::from_le_bytes(body[..8].try_into().unwrap());
    send(s, 2, VERSION, &u64s(&[features]), &[]);
    let pf = (VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK)
        .bits();
    send(s, 16, VERSION, &u64s(&[pf]), &[]);
    let table = [u32s(&[1, 0]), u64s(&[0, MEM_SIZE, UADDR, 0])].concat();
    assert_eq!(ack(s, 5, &table, &[mem.as_raw_fd()]), 0);
}

/// Sends a request with NEED_REPLY and returns the ack value.
fn ack(s: &mut UnixStream, req: u32, body: &[u8], fds: &[i32]) -> u64 {
    send(s, req, VERSION | NEED_REPLY, body, fds);
    let (r, body) = recv(s);
    assert_eq!(r, req);
    u64::from_le_bytes(body[..8].try_into().unwrap())
}

fn still_serving(f: &Fixture) {
    // A fresh, well-behaved front-end works after whatever came before.
    let mut front = connect(f);
    assert_eq!(front.fe.get_queue_num().unwrap(), QUEUES as u64);
}

#[test]
fn hostile_requests_are_refused_and_the_connection_survives() {
    let f = fixture("nack", None);
    let mut s = raw_connect(&f);
    let mem = memfd(MEM_SIZE);
    raw_negotiate(&mut s, &mem);
    // SET_VRING_NUM(8): bad index, zero, not a power of two, too big.
    for (idx, num) in [
        (2u32, 64u32),
        (200, 64),
        (0, 0),
        (0, 100),
        (0, 512),
        (0, 1 << 20),
    ] {
        assert_eq!(
            ack(&mut s, 8, &u32s(&[idx, num]), &[]),
            1,
            "num {idx} {num}"
        );
    }
    assert_eq!(ack(&mut s, 8, &u32s(&[0, 64]), &[]), 0);
    // SET_VRING_ADDR(9): index, flags, desc, used, avail, log — outside memory,
    // straddling its end, overflowing.
    let addr = |d: u64, u: u64, a: u64| [u32s(&[0, 0]), u64s(&[d, u, a, 0])].concat();
    for (d, u, a) in [
        (0x1000, UADDR + 0x2000, UADDR + 0x3000),
        (UADDR + MEM_SIZE - 16, UADDR + 0x2000, UADDR + 0x3000),
        (UADDR, UADDR + 0x2000, u64::MAX - 0xf),
        (UADDR, UADDR + MEM_SIZE, UADDR + 0x3000),
    ] {
        assert_eq!(
            ack(&mut s, 9, &addr(d, u, a), &[]),
            1,
            "{d:#x} {u:#x} {a:#x}"
        );
    }
    // SET_VRING_KICK(12) before the ring has addresses; then with a pipe.
    let kick = EventFd::new(0).unwrap();
    assert_eq!(ack(&mut s, 12, &u64s(&[0]), &[kick.as_raw_fd()]), 1);
    assert_eq!(
        ack(
            &mut s,
            9,
            &addr(UADDR + 0x1000, UADDR + 0x3000, UADDR + 0x2000),
            &[]
        ),
        0
    );
    let mut p = [0; 2];
    // SAFETY: valid array of two ints.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: fresh fds owned here.
    let (pr, _pw) = unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) };
    assert_eq!(ack(&mut s, 12, &u64s(&[0]), &[pr.as_raw_fd()]), 1);
    assert_eq!(
        ack(&mut s, 13, &u64s(&[0]), &[pr.as_raw_fd()]),
        1,
        "call fd must be an eventfd"
    );
    // Kick without fd (polling mode): refused.
    assert_eq!(ack(&mut s, 12, &u64s(&[0x100]), &[]), 1);
    // SET_MEM_TABLE past the end of the file, overlapping, unaligned.
    let small = memfd(0x1000);
    let t = |regions: &[[u64; 4]]| {
        let mut b = u32s(&[regions.len() as u32, 0]);
        for r in regions {
            b.extend(u64s(r));
        }
        b
    };
    assert_eq!(
        ack(
            &mut s,
            5,
            &t(&[[0, 0x10000, UADDR, 0]]),
            &[small.as_raw_fd()]
        ),
        1
    );
    assert_eq!(
        ack(
            &mut s,
            5,
            &t(&[[0, 0x1000, UADDR, 0], [0, 0x1000, UADDR + 0x1000, 0]]),
            &[small.as_raw_fd(), small.as_raw_fd()]
        ),
        1
    );
    assert_eq!(
        ack(
            &mut s,
            5,
            &t(&[[0, 0x1000, UADDR, 8]]),
            &[small.as_raw_fd()]
        ),
        1
    );
    // The good state survived: the ring starts with the old table.
    assert_eq!(ack(&mut s, 12, &u64s(&[0]), &[kick.as_raw_fd()]), 0);
    assert_eq!(ack(&mut s, 18, &u32s(&[0, 1]), &[]), 0); // SET_VRING_ENABLE
    let ev = events(&f);
    assert!(
        matches!(ev.last(), Some(Event::Activate(a)) if a.ready == vec![true, false]),
        "{ev:?}"
    );
    assert!(f.export.as_ref().unwrap().status().refused_requests >= 14);
    // SET_FEATURES with bits never offered: NACKed, and since the `vhost`
    // crate already adopted them, the connection is closed.
    assert_eq!(ack(&mut s, 2, &u64s(&[1 << 60]), &[]), 1);
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    wait_until("device reset", || events(&f).last() == Some(&Event::Reset));
    still_serving(&f);
}

#[test]
fn config_errors_answer_size_zero() {
    let f = fixture("cfgerr", None);
    let mut s = raw_connect(&f);
    let mem = memfd(MEM_SIZE);
    raw_negotiate(&mut s, &mem);
    // GET_CONFIG(24): offset, size, flags + payload. Past the end, empty.
    for (off, size) in [(56u32, 8u32), (60, 1), (0, 61)] {
        let body = [u32s(&[off, size, 0]), vec![0u8; size as usize]].concat();
        send(&s, 24, VERSION, &body, &[]);
        let (req, reply) = recv(&mut s);
        assert_eq!(req, 24);
        assert_eq!(
            reply.len(),
            12,
            "error reply carries no payload ({off}, {size})"
        );
        assert_eq!(
            u32::from_le_bytes(reply[4..8].try_into().unwrap()),
            0,
            "size 0 = error"
        );
    }
    // A valid read on the same connection.
    let body = [u32s(&[0, 8, 0]), vec![0u8; 8]].concat();
    send(&s, 24, VERSION, &body, &[]);
    let (_, reply) = recv(&mut s);
    assert_eq!(&reply[12..20], &2048u64.to_le_bytes());
}

#[test]
fn broken_front_ends_are_dropped_and_the_export_keeps_listening() {
    let f = fixture("broken", None);
    // Garbage header (version 0), then a valid request: connection dropped.
    {
        let mut s = raw_connect(&f);
        s.write_all(&[0xff; 12]).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0, "connection closed");
    }
    still_serving(&f);
    // Closed in the middle of a message: header announces 40 bytes, 10 sent.
    {
        let s = raw_connect(&f);
        let mut m = u32s(&[9, VERSION, 40]);
        m.extend_from_slice(&[0u8; 10]);
        (&s).write_all(&m).unwrap();
    }
    still_serving(&f);
    // Oversized body announcement.
    {
        let mut s = raw_connect(&f);
        s.write_all(&u32s(&[5, VERSION, 0x7fff_ffff])).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    }
    still_serving(&f);
    // GET_VRING_BASE(11) for a ring that does not exist: the crate sends no
    // reply on error, so the connection must be closed (not left hanging).
    {
        let mut s = raw_connect(&f);
        let mem = memfd(MEM_SIZE);
        raw_negotiate(&mut s, &mem);
        send(&s, 11, VERSION, &u32s(&[99, 0]), &[]);
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    }
    // Unknown request code.
    {
        let mut s = raw_connect(&f);
        send(&s, 9999, VERSION, &[], &[]);
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    }
    still_serving(&f);
    let st = f.export.as_ref().unwrap().status();
    assert!(st.protocol_errors >= 4, "{st:?}");
}

#[test]
fn a_hostile_front_end_does_not_disturb_another_export() {
    let a = fixture("iso-a", None);
    let b = fixture("iso-b", Some(a.registry.clone()));
    let mut good = connect(&a);
    setup_ring(&good, 0, 0);
    good.fe.set_vring_enable(0, true).unwrap();
    for _ in 0..20 {
        let mut s = raw_connect(&b);
        s.write_all(&[0x5a; 7]).unwrap();
        drop(s);
        let mut s = raw_connect(&b);
        let mem = memfd(MEM_SIZE);
        raw_negotiate(&mut s, &mem);
        send(&s, 9, VERSION, &[0u8; 3], &[]);
    }
    // The first export's session is untouched.
    assert_eq!(good.fe.get_queue_num().unwrap(), QUEUES as u64);
    assert!(a.export.as_ref().unwrap().status().active);
    assert_eq!(a.export.as_ref().unwrap().status().protocol_errors, 0);
    // Both IOThreads list both exports.
    assert_eq!(a.registry.holders("io0").unwrap().len(), 2);
}

// ------------------------------------------------------------ real device

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// Writes descriptor `i` of the table at `table`.
fn put_desc(
    mem: &vm_memory::GuestMemoryMmap,
    table: u64,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    use vm_memory::{Bytes, GuestAddress};
    let base = GuestAddress(table + 16 * u64::from(i));
    mem.write_obj(addr.to_le(), base).unwrap();
    mem.write_obj(len.to_le(), GuestAddress(base.0 + 8))
        .unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(base.0 + 12))
        .unwrap();
    mem.write_obj(next.to_le(), GuestAddress(base.0 + 14))
        .unwrap();
}

/// Publishes head `head` at avail position `pos` and sets avail->idx.
fn publish(mem: &vm_memory::GuestMemoryMmap, avail: u64, pos: u16, head: u16) {
    use vm_memory::{Bytes, GuestAddress};
    mem.write_obj(
        head.to_le(),
        GuestAddress(avail + 4 + 2 * u64::from(pos % RING_SIZE)),
    )
    .unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    mem.write_obj((pos + 1).to_le(), GuestAddress(avail + 2))
        .unwrap();
}

fn wait_used(mem: &vm_memory::GuestMemoryMmap, used: u64, call: &EventFd, want: u16) {
    use vm_memory::{Bytes, GuestAddress};
    wait_until("used ring", || {
        let _ = call.read();
        u16::from_le(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap()) == want
    });
}

/// The export `id` of node `node` on the image `img`: one queue on `io0`,
/// its socket in `dir`.
fn one_queue_export(id: &str, node: &str, dir: &TempDir, img: &std::path::Path) -> ExportConfig {
    ExportConfig {
        id: id.into(),
        node_name: node.into(),
        socket: dir.0.join("s"),
        num_queues: 1,
        queue_iothreads: vec!["io0".into()],
        file: img.to_path_buf(),
        readonly: false,
        direct: false,
        engine: Default::default(),
        locking: Default::default(),
    }
}

/// A virtio-blk write and read-back through the real device model, served
/// on an IOThread, with guest memory and eventfds shared over vhost-user.
#[test]
fn block_device_serves_requests_over_vhost_user() {
    use vm_memory::{Bytes, GuestAddress};
    let registry = IoThreadRegistry::new();
    registry.create("io0", IoThreadParams::default()).unwrap();
    let dir = TempDir::new("block");
    let img = dir.0.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let cfg = one_queue_export("eb", "db", &dir, &img);
    let export = Export::start(cfg, &registry).unwrap();
    assert_eq!(
        registry.holders("io0").unwrap(),
        vec![IoThreadHolder::block_node("db")]
    );

    let mut fe = Frontend::connect(dir.0.join("s"), 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    for bit in [1u64, 2, 6, 9, 13, 14, 32] {
        assert_ne!(
            features & (1 << bit),
            0,
            "virtio-blk feature bit {bit} offered"
        );
    }
    fe.set_features(features & !feature(VIRTIO_RING_F_EVENT_IDX))
        .unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let file = memfd(MEM_SIZE);
    let (mem, _) = memory::build(
        &[vhost::vhost_user::message::VhostUserMemoryRegion::new(
            0, MEM_SIZE, UADDR, 0,
        )],
        vec![file.try_clone().unwrap()],
    )
    .unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE,
        userspace_addr: UADDR,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }])
    .unwrap();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let (desc, avail, used) = (desc_gpa(0), desc_gpa(0) + 0x1000, desc_gpa(0) + 0x2000);
    fe.set_vring_num(0, RING_SIZE).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(0, &ring_config(0)).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_enable(0, true).unwrap();

    // OUT request: sector 2, 512 bytes of pattern.
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    let hdr = |t: u32, sector: u64| {
        [
            t.to_le_bytes().as_slice(),
            &0u32.to_le_bytes(),
            &sector.to_le_bytes(),
        ]
        .concat()
    };
    mem.write_slice(&hdr(1, 2), GuestAddress(0x2_0000)).unwrap();
    mem.write_slice(&pattern, GuestAddress(0x2_1000)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(0x3_0000)).unwrap();
    put_desc(&mem, desc, 0, 0x2_0000, 16, VRING_DESC_F_NEXT, 1);
    put_desc(&mem, desc, 1, 0x2_1000, 512, VRING_DESC_F_NEXT, 2);
    put_desc(&mem, desc, 2, 0x3_0000, 1, VRING_DESC_F_WRITE, 0);
    publish(&mem, avail, 0, 0);
    kick.write(1).unwrap();
    wait_used(&mem, used, &call, 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x3_0000)).unwrap(),
        0,
        "status OK"
    );
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[1024..1536], &pattern[..]);
    // The running device adds no holder of its own: the export's
    // `block-node` is the only one, connected or not.
    assert!(export.status().block.expect("block info").activated);
    assert_eq!(
        registry.holders("io0").unwrap(),
        vec![IoThreadHolder::block_node("db")]
    );

    // IN request: read the sector back into other guest memory.
    mem.write_slice(&hdr(0, 2), GuestAddress(0x2_2000)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(0x3_0001)).unwrap();
    put_desc(&mem, desc, 3, 0x2_2000, 16, VRING_DESC_F_NEXT, 4);
    put_desc(
        &mem,
        desc,
        4,
        0x4_0000,
        512,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        5,
    );
    put_desc(&mem, desc, 5, 0x3_0001, 1, VRING_DESC_F_WRITE, 0);
    publish(&mem, avail, 1, 3);
    kick.write(1).unwrap();
    wait_used(&mem, used, &call, 2);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3_0001)).unwrap(), 0);
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(0x4_0000)).unwrap();
    assert_eq!(back, pattern);

    // A request beyond the disk's end fails with IOERR, the device survives.
    mem.write_slice(&hdr(0, 1 << 20), GuestAddress(0x2_3000))
        .unwrap();
    put_desc(&mem, desc, 6, 0x2_3000, 16, VRING_DESC_F_NEXT, 7);
    put_desc(
        &mem,
        desc,
        7,
        0x4_1000,
        512,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        8,
    );
    put_desc(&mem, desc, 8, 0x3_0002, 1, VRING_DESC_F_WRITE, 0);
    publish(&mem, avail, 2, 6);
    kick.write(1).unwrap();
    wait_used(&mem, used, &call, 3);
    assert_ne!(mem.read_obj::<u8>(GuestAddress(0x3_0002)).unwrap(), 0);

    // Stop: the ring's position comes back, the counters saw 3 requests.
    assert_eq!(fe.get_vring_base(0).unwrap(), 3);
    let st = export.status();
    let block = st.block.expect("block info");
    assert_eq!(block.queues[0].requests, 3);
    assert_eq!(block.queues[0].iothread, "io0");
    export.stop();
    assert!(registry.holders("io0").unwrap().is_empty());
}

/// A virtio-blk IN request (one sector of `sector` into `data`) as a
/// three-descriptor chain starting at `head` of ring `q`, published at avail
/// position `pos`. Returns the status byte's guest address.
fn post_read(mem: &vm_memory::GuestMemoryMmap, q: usize, head: u16, pos: u16, sector: u64) -> u64 {
    use vm_memory::{Bytes, GuestAddress};
    let slot = q as u64 * 32 + u64::from(pos);
    let (hdr, data, status) = (
        0x2_0000 + slot * 0x20,
        0x4_0000 + slot * 0x200,
        0x8_0000 + slot,
    );
    let header = [
        0u32.to_le_bytes().as_slice(),
        &0u32.to_le_bytes(),
        &sector.to_le_bytes(),
    ]
    .concat();
    mem.write_slice(&header, GuestAddress(hdr)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let desc = desc_gpa(q);
    put_desc(mem, desc, head, hdr, 16, VRING_DESC_F_NEXT, head + 1);
    put_desc(
        mem,
        desc,
        head + 1,
        data,
        512,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        head + 2,
    );
    put_desc(mem, desc, head + 2, status, 1, VRING_DESC_F_WRITE, 0);
    publish(mem, desc + 0x1000, pos, head);
    status
}

/// Issue #16: an IOThread with `poll-max-ns` and `poll-grow` at `i64::MAX`
/// serving a vhost-user-blk export. Requests on queue 0 with lengthening
/// gaps grow its polling window to `i64::MAX` (~292 years); then the
/// front-end uses queue 1, whose handler was never dispatched and so is not
/// on the poll list: only its kick can announce the request. The IOThread
/// must serve it (before the fix it polled queue 0 forever at 100 % CPU with
/// `successful_polls = 0`), and queue 0 must keep working.
#[test]
fn huge_poll_parameters_do_not_live_lock_the_export() {
    use vm_memory::{Bytes, GuestAddress};
    let registry = IoThreadRegistry::new();
    registry
        .create(
            "io0",
            IoThreadParams::default().with_poll(
                aio_poll::PollParams::default()
                    .with_max_ns(i64::MAX)
                    .with_grow_shrink(i64::MAX, 0),
            ),
        )
        .unwrap();
    let dir = TempDir::new("livelock");
    let img = dir.0.join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..512].fill(0x5a);
    std::fs::write(&img, image).unwrap();
    let cfg = ExportConfig {
        id: "el".into(),
        node_name: "dl".into(),
        socket: dir.0.join("s"),
        num_queues: 2,
        queue_iothreads: vec!["io0".into(), "io0".into()],
        file: img.clone(),
        readonly: false,
        direct: false,
        engine: Default::default(),
        locking: Default::default(),
    };
    let export = Export::start(cfg, &registry).unwrap();
    // A guard of our own, to ask the IOThread's loop directly.
    let io0 = registry
        .acquire("io0", IoThreadHolder::block_node("livelock-probe"))
        .unwrap();
    let mut fe = Frontend::connect(dir.0.join("s"), 2).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features & !feature(VIRTIO_RING_F_EVENT_IDX))
        .unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let file = memfd(MEM_SIZE);
    let (mem, _) = memory::build(
        &[vhost::vhost_user::message::VhostUserMemoryRegion::new(
            0, MEM_SIZE, UADDR, 0,
        )],
        vec![file.try_clone().unwrap()],
    )
    .unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM_SIZE,
        userspace_addr: UADDR,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }])
    .unwrap();
    let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    let calls: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    for q in 0..2 {
        fe.set_vring_num(q, RING_SIZE).unwrap();
        fe.set_vring_base(q, 0).unwrap();
        fe.set_vring_addr(q, &ring_config(q)).unwrap();
        fe.set_vring_kick(q, &kicks[q]).unwrap();
        fe.set_vring_call(q, &calls[q]).unwrap();
        fe.set_vring_enable(q, true).unwrap();
    }
    let used = |q: usize| desc_gpa(q) + 0x2000;
    let check = |status: u64| {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
            0,
            "status OK"
        );
    };

    // Queue 0, gaps 1, 2, 4, ... ms: the smoothed interval exceeds the window
    // and one grow step (x i64::MAX) saturates it.
    let mut pos0 = 0u16;
    for gap_ms in [1u64, 2, 4, 8, 16, 32] {
        std::thread::sleep(Duration::from_millis(gap_ms));
        let status = post_read(&mem, 0, pos0 * 3, pos0, 0);
        kicks[0].write(1).unwrap();
        pos0 += 1;
        wait_used(&mem, used(0), &calls[0], pos0);
        check(status);
        // Asked inside the loop (a bottom half ends polling at once).
        if io0.call(|ctx| ctx.poll_ns()).unwrap() > 3_600_000_000_000 {
            break;
        }
    }
    let before = io0.call(|ctx| ctx.stats()).unwrap();
    assert!(
        before.poll_ns > 3_600_000_000_000,
        "the window did not grow: {before:?}"
    );

    // Queue 1: not on the poll list; its kick must be seen while io0 polls.
    let status = post_read(&mem, 1, 0, 0, 0);
    kicks[1].write(1).unwrap();
    wait_used(&mem, used(1), &calls[1], 1);
    check(status);
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(0x4_0000 + 32 * 0x200))
        .unwrap();
    assert!(back.iter().all(|b| *b == 0x5a), "sector 0 read back");

    // Both queues keep being served.
    for _ in 0..3 {
        let s0 = post_read(&mem, 0, pos0 * 3, pos0, 0);
        kicks[0].write(1).unwrap();
        pos0 += 1;
        wait_used(&mem, used(0), &calls[0], pos0);
        check(s0);
    }
    let after = io0.call(|ctx| ctx.stats()).unwrap();
    eprintln!(
        "io0 with poll-max-ns = poll-grow = i64::MAX: poll_ns {} -> {}, successful_polls {} -> {}, \
         dispatches {} -> {}",
        before.poll_ns,
        after.poll_ns,
        before.successful_polls,
        after.successful_polls,
        before.dispatches,
        after.dispatches
    );
    drop(io0);
    export.stop();
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn message() -> impl Strategy<Value = (u32, u32, Vec<u8>)> {
        (
            prop_oneof![0u32..50, any::<u32>()],
            prop_oneof![Just(VERSION), Just(VERSION | NEED_REPLY), any::<u32>()],
            proptest::collection::vec(any::<u8>(), 0..80),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Arbitrary message sequences (after a valid negotiation or not)
        /// never take the export down: a well-behaved front-end is served
        /// afterwards.
        #[test]
        fn random_messages_never_break_the_export(
            negotiate in any::<bool>(),
            msgs in proptest::collection::vec(message(), 1..12),
        ) {
            let f = fixture("fuzz", None);
            {
                let mut s = raw_connect(&f);
                let mem = memfd(MEM_SIZE);
                if negotiate {
                    raw_negotiate(&mut s, &mem);
                }
                for (req, flags, body) in &msgs {
                    let mut m = u32s(&[*req, *flags, body.len() as u32]);
                    m.extend_from_slice(body);
                    if (&s).write_all(&m).is_err() {
                        break;
                    }
                }
            }
            still_serving(&f);
        }
    }
}

#[test]
fn export_config_from_cli_spec() {
    let spec = ExportSpec::parse_cli(
        "vhost-user-blk,id=e0,node-name=d0,addr=unix:/tmp/e0.sock,num-queues=2,iothread-vq-mapping=io0:io1",
    )
    .unwrap();
    let drive = DriveSpec::parse_cli("id=d0,file=/tmp/d.img,aio=sync,cache.direct=on").unwrap();
    let cfg = ExportConfig::from_spec(&spec, &drive, |_| true).unwrap();
    assert_eq!(cfg.queue_iothreads, vec!["io0", "io1"]);
    assert_eq!(cfg.engine, crate::virtio::block::backend::BlockEngine::Sync);
    assert!(cfg.direct && !cfg.readonly);
    // Read-only drive: read-only export; writable=on is refused.
    let ro = DriveSpec::parse_cli("id=d0,file=/tmp/d.img,readonly=on").unwrap();
    assert!(
        ExportConfig::from_spec(&spec, &ro, |_| true)
            .unwrap()
            .readonly
    );
    let w = ExportSpec {
        writable: Some(true),
        ..spec.clone()
    };
    assert!(matches!(
        ExportConfig::from_spec(&w, &ro, |_| true),
        Err(ExportError::ReadOnlyDrive(_))
    ));
    // writable=off on a writable drive.
    let r = ExportSpec {
        writable: Some(false),
        ..spec.clone()
    };
    assert!(
        ExportConfig::from_spec(&r, &drive, |_| true)
            .unwrap()
            .readonly
    );
    // Wrong node, unknown IOThread, bad engine.
    let other = DriveSpec::parse_cli("id=d1,file=/tmp/d.img").unwrap();
    assert!(matches!(
        ExportConfig::from_spec(&spec, &other, |_| true),
        Err(ExportError::NodeMismatch { .. })
    ));
    assert!(ExportConfig::from_spec(&spec, &drive, |id| id == "io0").is_err());
    let bad = DriveSpec::parse_cli("id=d0,file=/tmp/d.img,aio=posix").unwrap();
    assert!(ExportConfig::from_spec(&spec, &bad, |_| true).is_err());
}

#[test]
fn an_invalid_ring_is_stopped_and_the_others_run() {
    let f = fixture("badring", None);
    let mut front = connect(&f);
    setup_ring(&front, 0, 0);
    // Ring 1: addresses that fit 16 entries at the very end of guest memory,
    // then the size grows to 256: the descriptor table no longer fits.
    let end = UADDR + MEM_SIZE;
    front.fe.set_vring_num(1, 16).unwrap();
    let cfg = VringConfigData {
        queue_max_size: 256,
        queue_size: 16,
        flags: 0,
        desc_table_addr: end - 0x800,
        avail_ring_addr: end - 0x600,
        used_ring_addr: end - 0x400,
        log_addr: None,
    };
    front.fe.set_vring_addr(1, &cfg).unwrap();
    front.fe.set_vring_num(1, 256).unwrap();
    front.fe.set_vring_kick(1, &front.kicks[1]).unwrap();
    front.fe.set_vring_enable(0, true).unwrap();
    // Enabling ring 1 is refused; ring 0 keeps running alone.
    assert!(front.fe.set_vring_enable(1, true).is_err());
    let ev = events(&f);
    let Event::Activate(a) = ev.last().unwrap() else {
        panic!("{ev:?}")
    };
    assert_eq!(a.ready, vec![true, false]);
    assert!(f.export.as_ref().unwrap().status().active);
    assert_eq!(front.fe.get_queue_num().unwrap(), QUEUES as u64);
}

/// `serve_stream` serves a front-end on the calling thread like an accepted
/// connection: replies, state reset when it hangs up, the socket still served.
#[test]
fn serve_stream_serves_an_in_process_front_end_then_resets() {
    let f = fixture("inproc", None);
    let export = f.export.as_ref().unwrap();
    let mem = memfd(MEM_SIZE);
    let (front, back) = UnixStream::pair().unwrap();
    send(&front, 3, VERSION, &[], &[]);
    send(&front, 1, VERSION, &[], &[]);
    let table = [u32s(&[1, 0]), u64s(&[0, MEM_SIZE, UADDR, 0])].concat();
    send(&front, 5, VERSION, &table, &[mem.as_raw_fd()]);
    front.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(export.serve_stream(back), "export not stopped");
    let mut front = front;
    let (req, body) = recv(&mut front);
    assert_eq!(req, 1);
    assert_ne!(u64::from_le_bytes(body[..8].try_into().unwrap()), 0);
    let status = export.status();
    assert!(!status.connected);
    assert_eq!((status.connections, status.protocol_errors), (1, 0));
    // Back-end reset: a well-behaved front-end over the socket works.
    still_serving(&f);
}

/// A front-end on the socket and one served with `serve_stream` take turns:
/// `serve_stream` waits until the socket's front-end has gone.
#[test]
fn serve_stream_waits_for_the_socket_front_end() {
    let f = fixture("inproc-turns", None);
    let export = f.export.as_ref().unwrap();
    let mut s = raw_connect(&f);
    let mem = memfd(MEM_SIZE);
    raw_negotiate(&mut s, &mem);
    let (mut front, back) = UnixStream::pair().unwrap();
    send(&front, 1, VERSION, &[], &[]);
    front.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::scope(|scope| {
        let inproc = scope.spawn(|| export.serve_stream(back));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!inproc.is_finished(), "served beside a connected front-end");
        // The socket's session is undisturbed.
        assert_eq!(
            ack(
                &mut s,
                5,
                &[u32s(&[1, 0]), u64s(&[0, MEM_SIZE, UADDR, 0])].concat(),
                &[mem.as_raw_fd()]
            ),
            0
        );
        assert_eq!(export.status().connections, 1);
        drop(s);
        assert!(inproc.join().unwrap(), "export not stopped");
    });
    let (req, _) = recv(&mut front);
    assert_eq!(req, 1);
    let status = export.status();
    assert!(!status.connected);
    assert_eq!(status.connections, 2);
    still_serving(&f);
}

/// The device model's errors name the export, not a drive of that id.
#[test]
fn device_model_errors_name_the_export() {
    let registry = IoThreadRegistry::new();
    registry.create("io0", IoThreadParams::default()).unwrap();
    let dir = TempDir::new("small");
    let img = dir.0.join("small.img");
    std::fs::write(&img, [0u8; 100]).unwrap();
    let cfg = one_queue_export("es", "ds", &dir, &img);
    let err = crate::error_chain(&Export::start(cfg, &registry).unwrap_err());
    assert!(
        err.contains(&format!(
            "export 'es': image '{}' is smaller than 512 bytes",
            img.display()
        )),
        "{err}"
    );
    assert!(!err.contains("drive"), "{err}");
    assert!(registry.holders("io0").unwrap().is_empty());
}
