//! `virtio_mmio`: arbitrary sequences of MMIO reads and writes against the virtio-mmio
//! transport with the real virtio-blk device behind it (2 queues on a real IOThread,
//! sync engine, an image in `/dev/shm`), over 64 KiB of guest memory whose contents
//! also come from the input, so activation can succeed and queues get processed.
//!
//! Format: a `u16` giving how many following bytes are guest memory (modulo 64 KiB),
//! those bytes, then ops of 1 + 2 + 4 bytes: kind (bit 0 write, bits 1-2 access size
//! 1/2/4/8), a `u16` offset (modulo 0x200), a `u32` value.
//!
//! Invariants: nothing panics; the magic value always reads back; after a reset
//! (status 0) and after dropping the transport the device holds no IOThread.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use iothread_registry::{IoThreadParams, IoThreadRegistry};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_ref::bus::BusDevice;
use vmm_ref::virtio::block::backend::BlockEngine;
use vmm_ref::virtio::block::{Block, BlockConfig, BlockRole};
use vmm_ref::virtio::mmio::MmioTransport;
use vmm_sys_util::eventfd::EventFd;

use crate::bytes::{Reader, Writer};

/// Guest memory size.
pub const MEM_SIZE: usize = 0x1_0000;
/// Image size.
const IMAGE_SIZE: u64 = 64 * 1024;
/// Queues of the fuzzed device.
pub const NUM_QUEUES: u16 = 2;

/// One MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Write (else read).
    pub write: bool,
    /// Access size: 1, 2, 4 or 8 bytes.
    pub size: u8,
    /// Offset in the 4 KiB slot (only the first 0x200 bytes are interesting).
    pub offset: u16,
    /// Value written (low `size` bytes).
    pub value: u32,
}

/// A decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Initial guest memory from 0.
    pub memory: Vec<u8>,
    /// The accesses.
    pub ops: Vec<Access>,
}

impl Input {
    /// Decodes any byte string.
    pub fn decode(data: &[u8]) -> Input {
        let mut r = Reader::new(data);
        let n = usize::from(r.u16()) % MEM_SIZE;
        let memory = r.take(n).to_vec();
        let mut ops = Vec::new();
        while !r.is_empty() && ops.len() < 4096 {
            let kind = r.u8();
            ops.push(Access {
                write: kind & 1 != 0,
                size: 1 << ((kind >> 1) & 3),
                offset: r.u16() % 0x200,
                value: r.u32(),
            });
        }
        Input { memory, ops }
    }

    /// Encodes (inverse of [`Input::decode`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u16(u16::try_from(self.memory.len()).unwrap_or(0))
            .bytes(&self.memory);
        for op in &self.ops {
            let size_bits = op.size.trailing_zeros() as u8 & 3;
            w.u8(u8::from(op.write) | size_bits << 1)
                .u16(op.offset)
                .u32(op.value);
        }
        w.finish()
    }
}

/// State shared by all runs (creating an IOThread, an image and guest memory per
/// run would cost more than the run). [`check`] puts each piece back into the same
/// state at the start of every run, see there.
struct Fixture {
    registry: IoThreadRegistry,
    image: PathBuf,
    /// The image, open for resetting its contents.
    image_file: std::fs::File,
    mem: GuestMemoryMmap,
    /// Staging buffer for the initial guest memory.
    staging: Vec<u8>,
}

fn fixture() -> &'static Mutex<Fixture> {
    static F: OnceLock<Mutex<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let registry = IoThreadRegistry::new();
        registry
            .create("fuzz0", IoThreadParams::default())
            .expect("create IOThread");
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let image = PathBuf::from(format!(
            "{dir}/vmm-ref-fuzz-mmio-{}.img",
            std::process::id()
        ));
        let image_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&image)
            .expect("image");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
        Mutex::new(Fixture {
            registry,
            image,
            image_file,
            mem,
            staging: vec![0; MEM_SIZE],
        })
    })
}

fn holders(f: &Fixture) -> usize {
    f.registry
        .holders("fuzz0")
        .map(|h| h.len())
        .unwrap_or(usize::MAX)
}

/// Queue handlers registered on the IOThread.
fn handlers(f: &Fixture) -> usize {
    let probe = f
        .registry
        .acquire(
            "fuzz0",
            iothread_registry::IoThreadHolder::block_node("probe"),
        )
        .expect("acquire fuzz0");
    probe.call(|ctx| ctx.handler_count()).unwrap_or(usize::MAX)
}

/// Runs an input; panics on a broken invariant.
///
/// The IOThread, the image file and the guest memory mapping are created once; the
/// device, its transport and eventfds are created per run. Each run starts by
/// zeroing the image (truncated to 0 and back to 64 KiB) and rewriting *all* of the
/// guest memory (the input's bytes, zero after them), and ends with no holder and no
/// handler left on the IOThread (asserted below), so no state of an earlier run is
/// visible and a crash reproduces from its input alone.
pub fn check(input: &Input) {
    let mut f = fixture().lock().unwrap_or_else(|e| e.into_inner());
    let f = &mut *f;
    f.image_file.set_len(0).expect("image reset");
    f.image_file.set_len(IMAGE_SIZE).expect("image size");
    f.staging.fill(0);
    f.staging[..input.memory.len()].copy_from_slice(&input.memory);
    f.mem
        .write_slice(&f.staging, GuestAddress(0))
        .expect("memory contents");
    let cfg = BlockConfig {
        id: "fz".into(),
        path: f.image.clone(),
        num_queues: NUM_QUEUES,
        queue_size: 16,
        readonly: false,
        direct: false,
        iothreads: vec![iothread_registry::IoThreadVqMapping::new("fuzz0")],
        engine: BlockEngine::Sync,
        serial: None,
        holder: Block::device_holder("fuzz"),
        role: BlockRole::Drive,
    };
    let block = Block::new(cfg, f.registry.clone()).expect("block device");
    let evts = (0..NUM_QUEUES)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let mem = GuestMemoryAtomic::new(f.mem.clone());
    let mut t = MmioTransport::new(Box::new(block), mem, irq, evts).expect("transport");
    for op in &input.ops {
        let len = usize::from(op.size);
        let offset = u64::from(op.offset);
        if op.write {
            let bytes = u64::from(op.value).to_le_bytes();
            t.write(offset, &bytes[..len]);
        } else {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..len]);
        }
    }
    let mut magic = [0u8; 4];
    t.read(0, &mut magic);
    assert_eq!(&magic, b"virt", "magic value");
    // The device holds its IOThread while attached, whatever the driver did.
    assert_eq!(
        holders(f),
        1,
        "IOThread not held exactly once while attached"
    );
    t.write(0x70, &0u32.to_le_bytes());
    assert_eq!(holders(f), 1, "IOThread not held after device reset");
    assert_eq!(handlers(f), 0, "queue handlers left after device reset");
    drop(t);
    assert_eq!(
        holders(f),
        0,
        "IOThread still held after the transport was dropped"
    );
}

/// A driver's bring-up of both queues (rings in guest memory), a few requests
/// kicked through QueueNotify, then a reset; and odd accesses.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let w = |offset: u16, value: u32| Access {
        write: true,
        size: 4,
        offset,
        value,
    };
    let r = |offset: u16| Access {
        write: false,
        size: 4,
        offset,
        value: 0,
    };
    let mut bring_up = vec![r(0), r(4), r(8), w(0x70, 1), w(0x70, 3)];
    for sel in 0..2u32 {
        bring_up.push(w(0x14, sel));
        bring_up.push(r(0x10));
        bring_up.push(w(0x24, sel));
        bring_up.push(w(0x20, if sel == 1 { 1 } else { 1 << 12 | 1 << 9 }));
    }
    bring_up.push(w(0x70, 0xb));
    bring_up.push(r(0x70));
    for q in 0..2u32 {
        let base = 0x1000 * (q + 1);
        bring_up.extend([
            w(0x30, q),
            r(0x34),
            w(0x38, 16),
            w(0x80, base),
            w(0x84, 0),
            w(0x90, base + 0x100),
            w(0x94, 0),
            w(0xa0, base + 0x200),
            w(0xa4, 0),
            w(0x44, 1),
        ]);
    }
    bring_up.push(w(0x70, 0xf));
    bring_up.push(w(0x50, 0));
    bring_up.push(w(0x50, 1));
    bring_up.push(r(0x60));
    bring_up.push(w(0x64, 1));
    bring_up.push(r(0x100));
    bring_up.push(r(0x122));
    // Guest memory: queue 0 ring with one read request (header at 0x8000, data
    // 0x8200, status 0x8400).
    let mut memory = vec![0u8; 0x9000];
    let put = |m: &mut Vec<u8>, at: usize, b: &[u8]| m[at..at + b.len()].copy_from_slice(b);
    let d = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut v = Vec::new();
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&next.to_le_bytes());
        v
    };
    put(&mut memory, 0x1000, &d(0x8000, 16, 1, 1));
    put(&mut memory, 0x1010, &d(0x8200, 512, 3, 2));
    put(&mut memory, 0x1020, &d(0x8400, 1, 2, 0));
    put(&mut memory, 0x1102, &1u16.to_le_bytes());
    let odd = vec![
        Access {
            write: true,
            size: 1,
            offset: 0x70,
            value: 0xff,
        },
        Access {
            write: true,
            size: 8,
            offset: 0x30,
            value: 0xffff,
        },
        Access {
            write: false,
            size: 2,
            offset: 0x1ff,
            value: 0,
        },
        w(0x30, 0xffff_ffff),
        w(0x38, 3),
        w(0x44, 1),
        w(0x50, 77),
        w(0x70, 0x40),
    ];
    vec![
        (
            "bring-up".to_string(),
            Input {
                memory,
                ops: bring_up,
            }
            .encode(),
        ),
        (
            "odd-accesses".to_string(),
            Input {
                memory: Vec::new(),
                ops: odd,
            }
            .encode(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_round_trip_and_pass() {
        for (name, bytes) in seeds() {
            let input = Input::decode(&bytes);
            assert_eq!(input.encode(), bytes, "{name}");
            check(&input);
        }
    }
}
