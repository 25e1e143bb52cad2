//! `virtio_blk_request`: arbitrary descriptor tables and guest memory through the
//! virtio-blk request parser and executor ([`vmm_ref::virtio::block::request::execute`])
//! with the crate's memory-backed disk ([`MemDisk`]).
//!
//! Guest memory (64 KiB) layout: descriptor table at 0 (16 entries), avail ring at
//! 0x100, used ring at 0x200, everything from 0x1000 is data. Format: a byte of
//! flags (bit 0 read-only drive, bit 1 DISCARD, bit 2 WRITE_ZEROES), a byte with the
//! number of avail entries (1..=4) and their head indexes, the 256-byte descriptor
//! table, then the data area.
//!
//! Invariants: nothing panics; the guest memory changes only inside device-writable
//! descriptors (direct or in indirect tables) and the used ring; the disk is only
//! accessed inside its capacity (`MemDisk::refused` stays 0); a read-only drive is
//! never modified.

use std::cell::RefCell;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_ref::virtio::block::mem_disk::MemDisk;
use vmm_ref::virtio::block::request::{execute, DiskLimits};
use vmm_ref::virtio::block::sync_engine::SyncEngine;

use crate::bytes::{Reader, Writer};

/// Guest memory size.
pub const MEM_SIZE: usize = 0x1_0000;
/// Queue size (descriptor table entries).
pub const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const DATA: u64 = 0x1000;
/// Disk size in bytes (64 sectors).
pub const DISK_BYTES: usize = 64 * 512;
const TABLE_BYTES: usize = QUEUE_SIZE as usize * 16;
const USED_END: u64 = USED + 4 + 8 * QUEUE_SIZE as u64 + 2;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// A decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Read-only drive.
    pub read_only: bool,
    /// DISCARD negotiated.
    pub discard: bool,
    /// WRITE_ZEROES negotiated.
    pub write_zeroes: bool,
    /// Heads put in the avail ring.
    pub heads: Vec<u16>,
    /// The descriptor table (16 entries of 16 bytes).
    pub table: Vec<u8>,
    /// The data area from 0x1000.
    pub data: Vec<u8>,
}

impl Input {
    /// Decodes any byte string.
    pub fn decode(bytes: &[u8]) -> Input {
        let mut r = Reader::new(bytes);
        let flags = r.u8();
        let n = 1 + usize::from(r.u8() % 4);
        let heads = (0..n).map(|_| u16::from(r.u8())).collect();
        let mut table = r.take(TABLE_BYTES).to_vec();
        table.resize(TABLE_BYTES, 0);
        let data = r.take(MEM_SIZE - DATA as usize).to_vec();
        Input {
            read_only: flags & 1 != 0,
            discard: flags & 2 != 0,
            write_zeroes: flags & 4 != 0,
            heads,
            table,
            data,
        }
    }

    /// Encodes (inverse of [`Input::decode`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(u8::from(self.read_only)
            | u8::from(self.discard) << 1
            | u8::from(self.write_zeroes) << 2);
        w.u8(u8::try_from(self.heads.len().clamp(1, 4) - 1).unwrap_or(0));
        for h in self.heads.iter().take(4) {
            w.u8(u8::try_from(*h).unwrap_or(u8::MAX));
        }
        let mut table = self.table.clone();
        table.resize(TABLE_BYTES, 0);
        w.bytes(&table).bytes(&self.data);
        w.finish()
    }
}

/// Device-writable byte ranges reachable from the descriptor table in `mem` (a copy
/// of the whole guest memory), including one level of indirect tables (what a correct
/// device may write besides the used ring), appended to `out`. A descriptor that is
/// not entirely inside guest memory ends its table, as a failed guest read would.
/// Only the parts inside guest memory are kept (nothing else can be compared), and
/// an indirect table listed several times is read once. The byte ranges of `mem`
/// the result depends on (the tables read) are appended to `read`.
fn writable_ranges(mem: &[u8], out: &mut Vec<(u64, u64)>, read: &mut Vec<(usize, usize)>) {
    let size = mem.len() as u64;
    let mut tables = vec![(DESC_TABLE, u64::from(QUEUE_SIZE))];
    let mut depth = 0;
    while let Some((base, n)) = tables.pop() {
        let first_table = depth == 0;
        depth += 1;
        // The entries wholly inside guest memory, up to the first one that is not
        // (a non-empty range starts inside memory: the casts are lossless).
        let count = n.min(4096).min(size.saturating_sub(base) / 16);
        if count == 0 {
            continue;
        }
        let (b, e) = (base as usize, base as usize + 16 * count as usize);
        read.push((b, e));
        let entries = &mem[b..e];
        // One 16-byte load per descriptor: under ASan every load is a shadow check,
        // and the fuzz build traces each check's comparison, in a loop that may run
        // 64 Ki times per chain.
        for d in entries.as_chunks::<16>().0 {
            let d = u128::from_le_bytes(*d);
            let addr = d as u64;
            let len = u64::from((d >> 64) as u32);
            let flags = (d >> 96) as u16;
            if flags & VRING_DESC_F_INDIRECT != 0 && first_table {
                if !tables.contains(&(addr, len / 16)) {
                    tables.push((addr, len / 16));
                }
            } else if flags & VRING_DESC_F_WRITE != 0 && addr < size && len > 0 {
                out.push((addr, addr.saturating_add(len).min(size)));
            }
        }
    }
}

/// Panics on the first byte that differs between `before` and `after` outside
/// `allowed` (byte ranges, in any order, possibly overlapping or past the end).
/// Compares the gaps between the allowed ranges as whole slices: the same check as a
/// byte-by-byte loop, without 64 Ki instrumented comparisons per run.
fn assert_unchanged_outside(before: &[u8], after: &[u8], allowed: &mut [(u64, u64)]) {
    allowed.sort_unstable();
    let size = before.len().min(after.len());
    let clip = |v: u64| usize::try_from(v).unwrap_or(usize::MAX).min(size);
    let mut at = 0usize;
    let gaps = allowed
        .iter()
        .map(|&(s, e)| (clip(s), clip(e)))
        .chain(std::iter::once((size, size)));
    for (s, e) in gaps {
        if s > at && before[at..s] != after[at..s] {
            let off = (at..s).find(|&a| before[a] != after[a]).unwrap_or(at);
            panic!("guest byte {off:#x} changed outside every device-writable descriptor");
        }
        at = at.max(e);
    }
}

/// Per-thread state reused across runs: creating and mapping guest memory and
/// allocating its snapshots cost more than the request path itself.
struct Fixture {
    mem: Arc<GuestMemoryMmap>,
    /// The guest memory as the input sets it up (all of it).
    before: Vec<u8>,
    /// A copy of the guest memory (before each chain, then at the end).
    now: Vec<u8>,
}

thread_local! {
    static FIXTURE: RefCell<Fixture> = RefCell::new(Fixture {
        mem: Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory"),
        ),
        before: vec![0; MEM_SIZE],
        now: vec![0; MEM_SIZE],
    });
}

/// Runs an input; panics on a broken invariant.
///
/// Guest memory is mapped once per thread and reused. Every run first writes the
/// *whole* 64 KiB (the image built from the input, zero where the input says
/// nothing), and the device model, disk and queue are created afresh, so nothing of
/// an earlier run can be observed and a crash reproduces from its input alone.
pub fn check(input: &Input) {
    FIXTURE.with(|f| check_with(&mut f.borrow_mut(), input));
}

/// [`check`], returning the guest memory afterwards.
pub fn check_and_read_memory(input: &Input) -> Vec<u8> {
    FIXTURE.with(|f| {
        let mut f = f.borrow_mut();
        check_with(&mut f, input);
        f.now.clone()
    })
}

fn check_with(f: &mut Fixture, input: &Input) {
    let Fixture { mem, before, now } = f;
    // The complete initial image: descriptor table, avail ring (flags 0, idx =
    // number of heads, ring entries), data area; zero elsewhere.
    before.fill(0);
    before[DESC_TABLE as usize..][..input.table.len()].copy_from_slice(&input.table);
    let n = u16::try_from(input.heads.len()).unwrap_or(0);
    before[AVAIL as usize + 2..][..2].copy_from_slice(&n.to_le_bytes());
    for (i, h) in input.heads.iter().enumerate() {
        before[AVAIL as usize + 4 + 2 * i..][..2].copy_from_slice(&(*h % QUEUE_SIZE).to_le_bytes());
    }
    before[DATA as usize..][..input.data.len()].copy_from_slice(&input.data);
    mem.write_slice(before, GuestAddress(0))
        .expect("guest image");

    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(&**mem));

    // What the device may write, collected before each chain: a guest may
    // hand the device its own descriptor table as a writable buffer, and the
    // descriptors the device wrote there then authorise later chains' writes.
    // The used ring is the device's too.
    let mut writable = vec![(USED, USED_END)];
    let limits = DiskLimits {
        capacity_sectors: (DISK_BYTES / 512) as u64,
        read_only: input.read_only,
        seg_max: 8,
        size_max: 16 * 1024,
        discard: input.discard,
        write_zeroes: input.write_zeroes,
        max_discard_sectors: 32,
        max_write_zeroes_sectors: 32,
    };
    let mut disk = SyncEngine::new(MemDisk::new(DISK_BYTES, input.read_only));
    let id = *b"fuzz-disk\0\0\0\0\0\0\0\0\0\0\0";
    let mut completed = 0u16;
    // The tables the last scan read, and their bytes then: a later chain whose
    // tables are unchanged would find the same ranges (scanning 16 indirect tables
    // of 4096 entries per chain was most of a run's time).
    let mut read: Vec<(usize, usize)> = Vec::new();
    let mut read_bytes: Vec<u8> = Vec::new();
    while let Some(chain) = q.pop_descriptor_chain(&**mem) {
        mem.read_slice(now, GuestAddress(0)).expect("snapshot");
        let mut at = 0;
        let unchanged = !read.is_empty()
            && read.iter().all(|&(s, e)| {
                let same = now[s..e] == read_bytes[at..at + (e - s)];
                at += e - s;
                same
            });
        if !unchanged {
            read.clear();
            writable_ranges(now, &mut writable, &mut read);
            read_bytes.clear();
            for &(s, e) in &read {
                read_bytes.extend_from_slice(&now[s..e]);
            }
            writable.sort_unstable();
            writable.dedup();
        }
        let (head, used_len) = execute(chain, &limits, &mut disk, mem, &id);
        if head >= QUEUE_SIZE {
            // The image puts every head in range; only a device write the guest
            // allowed (a writable buffer over the avail ring) can change one.
            // add_used refuses it, and the queue handler then stops the queue
            // (device needs reset): so does this run.
            let slot = AVAIL + 4 + 2 * u64::from(q.next_avail().wrapping_sub(1) % QUEUE_SIZE);
            assert!(
                writable.iter().any(|&(s, e)| s < slot + 2 && slot < e),
                "head {head} out of range in an avail slot the device may not write"
            );
            assert!(q.add_used(&**mem, head, used_len).is_err());
            break;
        }
        q.add_used(&**mem, head, used_len).expect("add_used");
        completed += 1;
    }
    assert!(completed <= n);
    assert_eq!(
        disk.disk().refused(),
        0,
        "the parser let through an access past capacity or to a read-only disk"
    );
    if input.read_only {
        static ZERO: [u8; DISK_BYTES] = [0; DISK_BYTES];
        assert!(disk.disk().data() == &ZERO[..], "read-only drive modified");
    }
    mem.read_slice(now, GuestAddress(0)).expect("snapshot");
    assert_unchanged_outside(before, now, &mut writable);
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One request chain: header at 0x1000, data descriptors, status descriptor.
fn chain_input(
    kind: u32,
    sector: u64,
    data: &[(u64, u32, bool)],
    status: Option<(u64, u32)>,
) -> Input {
    let mut table = Vec::new();
    let n = data.len() + 1 + usize::from(status.is_some());
    let next = |i: usize| if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
    table.extend_from_slice(&desc(DATA, 16, next(0), 1));
    for (i, (addr, len, write)) in data.iter().enumerate() {
        let f = next(i + 1) | if *write { VRING_DESC_F_WRITE } else { 0 };
        table.extend_from_slice(&desc(*addr, *len, f, (i + 2) as u16));
    }
    if let Some((addr, len)) = status {
        table.extend_from_slice(&desc(addr, len, VRING_DESC_F_WRITE, 0));
    }
    let mut bytes = vec![0u8; 0x3000];
    bytes[..16].copy_from_slice(&header(kind, sector));
    for (i, b) in bytes.iter_mut().enumerate().skip(0x100) {
        *b = (i % 251) as u8;
    }
    Input {
        read_only: false,
        discard: true,
        write_zeroes: true,
        heads: vec![0],
        table,
        data: bytes,
    }
}

/// Canonical requests and the reliability catalogue's malformed descriptors.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    const IN: u32 = 0;
    const OUT: u32 = 1;
    const FLUSH: u32 = 4;
    const GET_ID: u32 = 8;
    const DISCARD: u32 = 11;
    const WRITE_ZEROES: u32 = 13;
    let st = Some((0x2f00, 1));
    let mut loop_chain = chain_input(IN, 0, &[(0x1200, 512, true)], st);
    // Make the status descriptor point back at the header: a loop.
    loop_chain.table[2 * 16 + 12..2 * 16 + 14].copy_from_slice(&VRING_DESC_F_NEXT.to_le_bytes());
    let mut ro = chain_input(OUT, 2, &[(0x1200, 512, false)], st);
    ro.read_only = true;
    let mut discard = chain_input(DISCARD, 0, &[(0x1100, 16, false)], st);
    discard.data[0x100..0x110].copy_from_slice(&header(0, 0)[..]);
    discard.data[0x100..0x108].copy_from_slice(&4u64.to_le_bytes());
    discard.data[0x108..0x10c].copy_from_slice(&8u32.to_le_bytes());
    let mut wz = discard.clone();
    wz.data[..4].copy_from_slice(&WRITE_ZEROES.to_le_bytes());
    let cases = vec![
        ("read", chain_input(IN, 1, &[(0x1200, 1024, true)], st)),
        (
            "write",
            chain_input(OUT, 3, &[(0x1200, 512, false), (0x1800, 512, false)], st),
        ),
        ("flush", chain_input(FLUSH, 0, &[], st)),
        ("get-id", chain_input(GET_ID, 0, &[(0x1200, 20, true)], st)),
        ("discard", discard),
        ("write-zeroes", wz),
        ("read-only-write", ro),
        (
            "addr-outside-memory",
            chain_input(IN, 0, &[(0x10_0000_0000, 512, true)], st),
        ),
        (
            "addr-len-overflow",
            chain_input(IN, 0, &[(u64::MAX - 100, 512, true)], st),
        ),
        ("chain-loop", loop_chain),
        (
            "wrong-direction",
            chain_input(IN, 0, &[(0x1200, 512, false)], st),
        ),
        (
            "missing-status",
            chain_input(IN, 0, &[(0x1200, 512, true)], None),
        ),
        (
            "short-status",
            chain_input(IN, 0, &[(0x1200, 512, true)], Some((0x2f00, 0))),
        ),
        (
            "length-4g",
            chain_input(
                IN,
                0,
                &[(0x1200, u32::MAX, true), (0x1200, u32::MAX, true)],
                st,
            ),
        ),
        (
            "past-capacity",
            chain_input(IN, 63, &[(0x1200, 1024, true)], st),
        ),
        ("unknown-type", chain_input(0x77, 0, &[], st)),
    ];
    cases
        .into_iter()
        .map(|(name, input)| (name.to_string(), input.encode()))
        .collect()
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

    /// Found by the fuzzer: a chain's writable buffer covers the avail ring, the
    /// device's write there puts an out-of-range head in a later slot. The
    /// device refuses to complete it (add_used fails, the queue stops); nothing
    /// else may change.
    #[test]
    fn a_device_write_over_the_avail_ring_stops_the_queue() {
        let bytes: [u8; 191] = [
            0x00, 0x02, 0x00, 0x00, 0x2f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08,
            0x01, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xfb,
            0x00, 0x6c, 0x00, 0x00, 0x00, 0xbb, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x2e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
            0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
            0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
            0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
            0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
            0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
            0x90, 0x90, 0x90, 0x90, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x3a, 0x00, 0x00, 0x00, 0x00, 0x06, 0x00,
        ];
        check(&Input::decode(&bytes));
    }

    /// Found by the fuzzer: head 0 is one writable byte at guest address 0,
    /// inside the descriptor table. Its status write (IOERR) turns descriptor
    /// 0's address into 1, and the second time head 0 is used the device
    /// writes the status to byte 1: allowed by the table as it is then.
    #[test]
    fn a_status_written_into_the_descriptor_table_moves_the_next_status() {
        let mut table = vec![0u8; usize::from(QUEUE_SIZE) * 16];
        table[..16].copy_from_slice(&desc(0, 1, VRING_DESC_F_WRITE, 0));
        let input = Input {
            read_only: true,
            discard: false,
            write_zeroes: false,
            heads: vec![0, 0],
            table,
            data: vec![],
        };
        let after = check_and_read_memory(&input);
        // Both requests lack a header: IOERR (1) into byte 0, then byte 1.
        assert_eq!(&after[..2], &[1, 1]);
    }

    #[test]
    fn changes_are_allowed_only_inside_the_writable_ranges() {
        let before = vec![0u8; 64];
        let mut after = before.clone();
        after[10] = 1;
        after[40] = 1;
        assert_unchanged_outside(&before, &after, &mut [(40, 41), (8, 12)]);
        // Overlapping, unsorted and out-of-range ranges.
        assert_unchanged_outside(&before, &after, &mut [(39, 100), (0, 11), (5, 6)]);
        let outside = std::panic::catch_unwind(|| {
            assert_unchanged_outside(&before, &after, &mut [(40, 41), (11, 12)])
        });
        assert!(outside.is_err(), "byte 10 changed outside (11, 12)");
        let past_end = std::panic::catch_unwind(|| {
            let mut after = before.clone();
            after[63] = 1;
            assert_unchanged_outside(&before, &after, &mut [(u64::MAX - 1, u64::MAX)])
        });
        assert!(past_end.is_err(), "last byte changed");
    }

    /// The reused guest memory is fully rewritten: a run after another one
    /// ends in the same memory as the same run on a fresh thread.
    #[test]
    fn runs_are_independent_of_earlier_runs() {
        let seeds: std::collections::HashMap<String, Vec<u8>> = seeds().into_iter().collect();
        let read = Input::decode(&seeds["read"]);
        let fresh = std::thread::spawn(move || check_and_read_memory(&read))
            .join()
            .unwrap();
        // Fills all guest memory from 0x1000 ("read" sets only 0x3000 bytes).
        let junk = Input {
            data: vec![0xab; MEM_SIZE - DATA as usize],
            ..Input::decode(&seeds["write"])
        };
        check(&junk);
        for earlier in ["write", "get-id", "chain-loop", "length-4g"] {
            if earlier != "write" {
                check(&Input::decode(&seeds[earlier]));
            }
            assert_eq!(
                check_and_read_memory(&Input::decode(&seeds["read"])),
                fresh,
                "after {earlier}"
            );
        }
    }

    #[test]
    fn statuses_of_the_canonical_and_malformed_requests() {
        const STATUS: usize = 0x2f00;
        let seeds: std::collections::HashMap<String, Vec<u8>> = seeds().into_iter().collect();
        let run = |name: &str| check_and_read_memory(&Input::decode(&seeds[name]));
        let read = run("read");
        assert_eq!(read[STATUS], 0, "read OK");
        assert!(
            read[0x1200..0x1600].iter().all(|b| *b == 0),
            "read data from disk"
        );
        let id = run("get-id");
        assert_eq!((id[STATUS], &id[0x1200..0x1209]), (0, &b"fuzz-disk"[..]));
        for (name, status) in [
            ("write", 0),
            ("flush", 0),
            ("discard", 0),
            ("write-zeroes", 0),
            ("read-only-write", 1),
            ("addr-outside-memory", 1),
            ("addr-len-overflow", 1),
            ("wrong-direction", 1),
            ("past-capacity", 1),
            ("unknown-type", 2),
        ] {
            assert_eq!(run(name)[STATUS], status, "{name}");
        }
        // Chains virtio-queue cannot walk to the end (a loop, more than 4 GiB) have
        // no trustworthy status descriptor: completed with nothing written.
        for name in ["chain-loop", "length-4g"] {
            let before = Input::decode(&seeds[name]).data[STATUS - 0x1000];
            assert_eq!(run(name)[STATUS], before, "{name}");
        }
    }
}
