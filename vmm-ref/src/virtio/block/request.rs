//! virtio-blk request parsing (virtio 1.2 §5.2.6) as a pure function over
//! guest memory and a descriptor chain, and the mapping of every failure to
//! a status byte.
//!
//! A chain is read as two byte streams (any descriptor layout is accepted,
//! as VERSION_1 implies `VIRTIO_F_ANY_LAYOUT`): the device-readable stream
//! starts with the 16-byte header and, for `OUT`/`DISCARD`/`WRITE_ZEROES`,
//! continues with the data; the device-writable stream carries the data of
//! `IN`/`GET_ID` and ends with the one-byte status. All readable descriptors
//! must come before all writable ones, and the last descriptor must be
//! device-writable: its last byte is the status byte. Only when that status
//! byte exists (and lies in guest memory) is anything ever written back; a
//! chain without one is returned to the driver with length 0.
//!
//! Nothing here performs I/O: [`parse_request`] validates and produces a
//! [`Request`] whose buffers are checked to lie inside guest memory and
//! inside the request's own descriptors; [`crate::virtio::block::request`]'s
//! [`execute`] runs it against a [`DiskBackend`] synchronously (the queue
//! handlers use the same pieces asynchronously).

use std::ops::Deref;
use std::sync::Arc;

use smallvec::SmallVec;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::backend::{DiskBackend, DiskOp, DiskOpKind, GuestBuffers};

/// Bytes per sector (virtio-blk sectors are always 512 bytes).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the `GET_ID` answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Size of the request header (`type`, `reserved`, `sector`).
pub const HEADER_SIZE: u64 = 16;
/// Size of one discard / write-zeroes segment.
pub const DWZ_SEGMENT_SIZE: u64 = 16;

/// Request types (virtio 1.2 §5.2.6).
pub mod req_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the volatile write cache.
    pub const FLUSH: u32 = 4;
    /// Device id string.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// Device or driver error.
    pub const IOERR: u8 = 1;
    /// Request unsupported by the device.
    pub const UNSUPP: u8 = 2;
}

/// The `unmap` flag of a write-zeroes segment.
pub const DWZ_FLAG_UNMAP: u32 = 1;

/// What the device offers; requests are checked against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskLimits {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Read-only drive: writes, discards and write-zeroes fail with IOERR.
    pub read_only: bool,
    /// Maximum number of data segments per request (`seg_max`).
    pub seg_max: u32,
    /// Maximum size of one data segment in bytes (`size_max`).
    pub size_max: u32,
    /// `VIRTIO_BLK_F_DISCARD` negotiated.
    pub discard: bool,
    /// `VIRTIO_BLK_F_WRITE_ZEROES` negotiated.
    pub write_zeroes: bool,
    /// `max_discard_sectors`.
    pub max_discard_sectors: u32,
    /// `max_write_zeroes_sectors`.
    pub max_write_zeroes_sectors: u32,
}

/// A guest buffer: `len` bytes at guest-physical `addr`, known to lie in
/// guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A request's data buffers. Inline up to 4: parsing a request allocates
/// nothing in the usual case (one or two data descriptors).
pub type Segments = SmallVec<[Segment; 4]>;

/// A discard or write-zeroes range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// The driver allows deallocation (write-zeroes only).
    pub unmap: bool,
}

/// A validated request operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestOp {
    /// Read `data` (total a multiple of 512 bytes) from `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Device-writable destination buffers.
        data: Segments,
    },
    /// Write `data` (total a multiple of 512 bytes) at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Device-readable source buffers.
        data: Segments,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the (up to) 20-byte device id into `data`.
    GetId {
        /// Device-writable destination buffers (at least 20 bytes in total).
        data: Segments,
    },
    /// Discard a range.
    Discard(SectorRange),
    /// Write zeroes to a range.
    WriteZeroes(SectorRange),
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Head descriptor index (for the used ring).
    pub head_index: u16,
    /// The operation.
    pub op: RequestOp,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

/// Why a request is rejected. [`RequestError::status`] gives the status
/// byte the driver sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The chain has no descriptors (unreadable head or invalid indirect table).
    #[error("empty or unreadable descriptor chain")]
    EmptyChain,
    /// The chain ended early: a loop, a chain longer than the queue, a
    /// `next` index out of range, an unreadable descriptor or more than
    /// 4 GiB in total.
    #[error("descriptor chain is truncated (loop, too long, bad next index or > 4 GiB)")]
    TruncatedChain,
    /// The last descriptor is not device-writable or has length 0.
    #[error("no device-writable status byte at the end of the chain")]
    MissingStatus,
    /// `addr + len` overflows.
    #[error("descriptor {addr:#x}+{len:#x} overflows the address space")]
    AddressOverflow {
        /// Buffer start.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A buffer is not entirely inside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Buffer start.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    DescriptorOrder,
    /// Fewer than 16 device-readable bytes for the header.
    #[error("request header shorter than 16 bytes")]
    HeaderTooShort,
    /// Data buffers of the wrong direction for the request type.
    #[error("request type {req_type} has data buffers of the wrong direction")]
    WrongDirection {
        /// Request type.
        req_type: u32,
    },
    /// More data segments than `seg_max`.
    #[error("{count} data segments exceed seg_max {max}")]
    TooManySegments {
        /// Segments in the request.
        count: usize,
        /// Limit.
        max: u32,
    },
    /// A data segment larger than `size_max`.
    #[error("data segment of {len} bytes exceeds size_max {max}")]
    SegmentTooLarge {
        /// Segment length.
        len: u32,
        /// Limit.
        max: u32,
    },
    /// The data length is not a multiple of 512 bytes.
    #[error("data length {len} is not a multiple of 512")]
    NotSectorMultiple {
        /// Data length in bytes.
        len: u64,
    },
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}+{count} are beyond the capacity of {capacity} sectors")]
    SectorOutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Capacity.
        capacity: u64,
    },
    /// A write-type request on a read-only drive.
    #[error("write-type request on a read-only drive")]
    ReadOnly,
    /// A `GET_ID` buffer shorter than 20 bytes.
    #[error("GET_ID buffer of {len} bytes is shorter than 20")]
    GetIdTooShort {
        /// Buffer length.
        len: u64,
    },
    /// A discard/write-zeroes payload shorter than one segment.
    #[error("discard/write-zeroes payload of {len} bytes is shorter than one segment")]
    DwzTooShort {
        /// Payload length.
        len: u64,
    },
    /// More than one discard/write-zeroes segment (`max_*_seg` is 1).
    #[error("discard/write-zeroes payload of {len} bytes holds more than one segment")]
    DwzTooManySegments {
        /// Payload length.
        len: u64,
    },
    /// Reserved flag bits, or `unmap` on a discard.
    #[error("invalid discard/write-zeroes flags {flags:#x}")]
    DwzFlags {
        /// The flags.
        flags: u32,
    },
    /// A discard/write-zeroes range longer than the advertised maximum.
    #[error("discard/write-zeroes of {num_sectors} sectors exceeds the maximum {max}")]
    DwzTooLarge {
        /// Requested sectors.
        num_sectors: u32,
        /// Limit.
        max: u32,
    },
    /// A request type the device does not implement (or not negotiated).
    #[error("unsupported request type {req_type}")]
    Unsupported {
        /// Request type.
        req_type: u32,
    },
    /// Guest memory access failed while reading the request.
    #[error("guest memory access failed at {addr:#x}")]
    GuestMemory {
        /// Address accessed.
        addr: u64,
    },
}

impl RequestError {
    /// The status byte the driver receives for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported { .. }
            | RequestError::DwzFlags { .. }
            | RequestError::DwzTooManySegments { .. } => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// A chain that was rejected; carries the status byte address when the
/// chain has a valid one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRequest {
    /// Head descriptor index.
    pub head_index: u16,
    /// Status byte address, if the chain ends in a valid one.
    pub status_addr: Option<GuestAddress>,
    /// Why.
    pub error: RequestError,
}

impl RejectedRequest {
    /// Writes the error status (if a status byte exists) and returns the
    /// used length to report (1 if written, else 0).
    pub fn complete<M: GuestMemory + ?Sized>(&self, mem: &M) -> u32 {
        match self.status_addr {
            Some(addr) => write_status(mem, addr, self.error.status()),
            None => 0,
        }
    }
}

/// Writes `status` at `addr`; returns the number of bytes written (0 or 1).
pub fn write_status<M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress, status: u8) -> u32 {
    match mem.write_obj(status, addr) {
        Ok(()) => 1,
        Err(e) => {
            crate::virtio::guest_warn!("virtio-blk: cannot write status at {:#x}: {e}", addr.0);
            0
        }
    }
}

/// Checks that `len` bytes at `addr` lie in guest memory.
fn check_segment<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: u32,
) -> Result<(), RequestError> {
    if len == 0 {
        return Ok(());
    }
    let err_args = (addr.0, len);
    addr.0
        .checked_add(u64::from(len))
        .ok_or(RequestError::AddressOverflow {
            addr: err_args.0,
            len: err_args.1,
        })?;
    let count = usize::try_from(len).map_err(|_| RequestError::OutOfMemory {
        addr: err_args.0,
        len: err_args.1,
    })?;
    if mem.check_range(addr, count, Permissions::ReadWrite) {
        Ok(())
    } else {
        Err(RequestError::OutOfMemory {
            addr: err_args.0,
            len: err_args.1,
        })
    }
}

/// Takes `count` bytes from the front of a segment stream.
fn split_front(segs: &[Segment], mut count: u64) -> (Segments, Segments) {
    let mut front = Segments::new();
    let mut rest = Segments::new();
    for s in segs {
        if count == 0 {
            rest.push(*s);
        } else if u64::from(s.len) <= count {
            count -= u64::from(s.len);
            front.push(*s);
        } else {
            // 0 < count < s.len, so both parts fit in u32 and addr + count
            // does not overflow (the whole segment was checked).
            let c = count as u32;
            front.push(Segment {
                addr: s.addr,
                len: c,
            });
            rest.push(Segment {
                addr: GuestAddress(s.addr.0 + u64::from(c)),
                len: s.len - c,
            });
            count = 0;
        }
    }
    (front, rest)
}

fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Reads exactly `buf.len()` bytes from the front of a segment stream.
fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(s.len as usize);
        let dst = buf
            .get_mut(done..done + n)
            .ok_or(RequestError::GuestMemory { addr: s.addr.0 })?;
        mem.read_slice(dst, s.addr)
            .map_err(|_| RequestError::GuestMemory { addr: s.addr.0 })?;
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(RequestError::HeaderTooShort)
    }
}

/// Validates data segments against `seg_max` and `size_max`.
fn check_data(segs: &[Segment], limits: &DiskLimits) -> Result<u64, RequestError> {
    let segs_nonempty = segs.iter().filter(|s| s.len != 0).count();
    if segs_nonempty > limits.seg_max as usize {
        return Err(RequestError::TooManySegments {
            count: segs_nonempty,
            max: limits.seg_max,
        });
    }
    if let Some(s) = segs.iter().find(|s| s.len > limits.size_max) {
        return Err(RequestError::SegmentTooLarge {
            len: s.len,
            max: limits.size_max,
        });
    }
    Ok(total_len(segs))
}

fn check_range(limits: &DiskLimits, sector: u64, count: u64) -> Result<(), RequestError> {
    match sector.checked_add(count) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(RequestError::SectorOutOfRange {
            sector,
            count,
            capacity: limits.capacity_sectors,
        }),
    }
}

/// Parses and validates one descriptor chain.
///
/// Pure: reads guest memory (descriptors, header, discard segments) and
/// writes nothing. Every descriptor of the chain is checked to lie in guest
/// memory (with `addr + len` overflow checks); chain length is bounded by
/// virtio-queue (queue size / indirect table size, and 4 GiB in total) and
/// a truncated chain is rejected.
pub fn parse_request<M>(
    mut chain: DescriptorChain<M>,
    limits: &DiskLimits,
) -> Result<Request, RejectedRequest>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head_index = chain.head_index();
    let reject = |status_addr, error| RejectedRequest {
        head_index,
        status_addr,
        error,
    };

    // Walk the chain once. virtio-queue bounds the walk (ttl = queue or
    // indirect table size) and stops on any error; we detect such early
    // stops because the last yielded descriptor still has NEXT set.
    let max_keep = (limits.seg_max as usize).saturating_add(2);
    let mut descs: SmallVec<[Descriptor; 8]> = SmallVec::new();
    let mut count = 0usize;
    let mut last: Option<Descriptor> = None;
    for d in chain.by_ref() {
        if descs.len() < max_keep {
            descs.push(d);
        }
        count += 1;
        last = Some(d);
    }
    let Some(last) = last else {
        return Err(reject(None, RequestError::EmptyChain));
    };
    if last.has_next() {
        return Err(reject(None, RequestError::TruncatedChain));
    }
    let mem = chain.memory();

    // The status byte: last byte of the last descriptor, device-writable.
    if !last.is_write_only() || last.len() == 0 {
        return Err(reject(None, RequestError::MissingStatus));
    }
    if let Err(e) = check_segment(mem, last.addr(), last.len()) {
        return Err(reject(None, e));
    }
    let status_addr = GuestAddress(last.addr().0 + u64::from(last.len()) - 1);
    let reject = |error| reject(Some(status_addr), error);

    if count > max_keep {
        return Err(reject(RequestError::TooManySegments {
            count: count.saturating_sub(2),
            max: limits.seg_max,
        }));
    }

    // Split into the readable and writable streams.
    let mut readable = Segments::new();
    let mut writable = Segments::new();
    let n = descs.len();
    let mut seen_writable = false;
    for (i, d) in descs.iter().enumerate() {
        check_segment(mem, d.addr(), d.len()).map_err(reject)?;
        let mut seg = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            seen_writable = true;
            if i + 1 == n {
                seg.len -= 1; // the status byte
            }
            if seg.len != 0 {
                writable.push(seg);
            }
        } else {
            if seen_writable {
                return Err(reject(RequestError::DescriptorOrder));
            }
            if seg.len != 0 {
                readable.push(seg);
            }
        }
    }

    // Header.
    if total_len(&readable) < HEADER_SIZE {
        return Err(reject(RequestError::HeaderTooShort));
    }
    let (hdr_segs, out_data) = split_front(&readable, HEADER_SIZE);
    let mut hdr = [0u8; HEADER_SIZE as usize];
    read_stream(mem, &hdr_segs, &mut hdr).map_err(reject)?;
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let in_data = writable;

    let op = match req_type {
        req_type::IN | req_type::OUT => {
            let is_read = req_type == req_type::IN;
            let (data, wrong) = if is_read {
                (in_data, &out_data)
            } else {
                (out_data, &in_data)
            };
            if !wrong.is_empty() {
                return Err(reject(RequestError::WrongDirection { req_type }));
            }
            if !is_read && limits.read_only {
                return Err(reject(RequestError::ReadOnly));
            }
            let len = check_data(&data, limits).map_err(reject)?;
            if len % SECTOR_SIZE != 0 {
                return Err(reject(RequestError::NotSectorMultiple { len }));
            }
            check_range(limits, sector, len >> SECTOR_SHIFT).map_err(reject)?;
            if is_read {
                RequestOp::Read { sector, data }
            } else {
                RequestOp::Write { sector, data }
            }
        }
        req_type::FLUSH => RequestOp::Flush,
        req_type::GET_ID => {
            if !out_data.is_empty() {
                return Err(reject(RequestError::WrongDirection { req_type }));
            }
            let len = total_len(&in_data);
            if len < VIRTIO_BLK_ID_BYTES as u64 {
                return Err(reject(RequestError::GetIdTooShort { len }));
            }
            let (data, _) = split_front(&in_data, VIRTIO_BLK_ID_BYTES as u64);
            RequestOp::GetId { data }
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            let discard = req_type == req_type::DISCARD;
            let (negotiated, max) = if discard {
                (limits.discard, limits.max_discard_sectors)
            } else {
                (limits.write_zeroes, limits.max_write_zeroes_sectors)
            };
            if !negotiated {
                return Err(reject(RequestError::Unsupported { req_type }));
            }
            if !in_data.is_empty() {
                return Err(reject(RequestError::WrongDirection { req_type }));
            }
            if limits.read_only {
                return Err(reject(RequestError::ReadOnly));
            }
            let len = total_len(&out_data);
            if len < DWZ_SEGMENT_SIZE {
                return Err(reject(RequestError::DwzTooShort { len }));
            }
            if len > DWZ_SEGMENT_SIZE {
                return Err(reject(RequestError::DwzTooManySegments { len }));
            }
            let mut seg = [0u8; DWZ_SEGMENT_SIZE as usize];
            read_stream(mem, &out_data, &mut seg).map_err(reject)?;
            let sector = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let allowed = if discard { 0 } else { DWZ_FLAG_UNMAP };
            if flags & !allowed != 0 {
                return Err(reject(RequestError::DwzFlags { flags }));
            }
            if num_sectors > max {
                return Err(reject(RequestError::DwzTooLarge { num_sectors, max }));
            }
            check_range(limits, sector, u64::from(num_sectors)).map_err(reject)?;
            let range = SectorRange {
                sector,
                num_sectors,
                unmap: flags & DWZ_FLAG_UNMAP != 0,
            };
            if discard {
                RequestOp::Discard(range)
            } else {
                RequestOp::WriteZeroes(range)
            }
        }
        other => return Err(reject(RequestError::Unsupported { req_type: other })),
    };
    Ok(Request {
        head_index,
        op,
        status_addr,
    })
}

/// What a request turns into before I/O.
#[derive(Debug)]
pub enum Prepared {
    /// Completed without the backend (GET_ID, or a buffer error): the status
    /// was written; report `used_len`.
    Done {
        /// Used length for the used ring.
        used_len: u32,
    },
    /// Submit `op` to the backend, then call [`Request::finish`] with its result.
    Io(DiskOp),
}

impl Request {
    /// Turns the request into a backend operation, or completes it right
    /// away (GET_ID writes `id`).
    pub fn prepare(&self, mem: &Arc<GuestMemoryMmap>, id: &[u8; VIRTIO_BLK_ID_BYTES]) -> Prepared {
        let kind_and_bufs = match &self.op {
            RequestOp::Read { sector, data } => (
                DiskOpKind::Read {
                    offset: sector << SECTOR_SHIFT,
                },
                Some(data),
            ),
            RequestOp::Write { sector, data } => (
                DiskOpKind::Write {
                    offset: sector << SECTOR_SHIFT,
                },
                Some(data),
            ),
            RequestOp::Flush => (DiskOpKind::Flush, None),
            RequestOp::Discard(r) => (
                DiskOpKind::Discard {
                    offset: r.sector << SECTOR_SHIFT,
                    len: u64::from(r.num_sectors) << SECTOR_SHIFT,
                },
                None,
            ),
            RequestOp::WriteZeroes(r) => (
                DiskOpKind::WriteZeroes {
                    offset: r.sector << SECTOR_SHIFT,
                    len: u64::from(r.num_sectors) << SECTOR_SHIFT,
                    unmap: r.unmap,
                },
                None,
            ),
            RequestOp::GetId { data } => {
                let mut done = 0usize;
                for s in data {
                    let part = id.get(done..done + s.len as usize).unwrap_or(&[]);
                    if mem.write_slice(part, s.addr).is_err() {
                        return Prepared::Done {
                            used_len: write_status(&**mem, self.status_addr, status::IOERR),
                        };
                    }
                    done += part.len();
                }
                let n = write_status(&**mem, self.status_addr, status::OK);
                return Prepared::Done {
                    used_len: if n == 1 { done as u32 + 1 } else { 0 },
                };
            }
        };
        let (kind, data) = kind_and_bufs;
        let bufs = match data {
            Some(segs) => match GuestBuffers::new(mem.clone(), segs) {
                Ok(b) => Some(b),
                Err(e) => {
                    crate::virtio::guest_warn!("virtio-blk: request buffers: {e}");
                    return Prepared::Done {
                        used_len: write_status(&**mem, self.status_addr, status::IOERR),
                    };
                }
            },
            None => None,
        };
        Prepared::Io(DiskOp { kind, bufs })
    }

    /// Completes the request after the backend finished: writes the status
    /// byte and returns the used length (bytes written to the guest,
    /// including the status byte).
    pub fn finish<M: GuestMemory + ?Sized>(&self, mem: &M, result: &std::io::Result<usize>) -> u32 {
        match result {
            Ok(n) => {
                let data = match &self.op {
                    RequestOp::Read { .. } => u32::try_from(*n).unwrap_or(u32::MAX - 1),
                    _ => 0,
                };
                match write_status(mem, self.status_addr, status::OK) {
                    1 => data + 1,
                    _ => 0,
                }
            }
            Err(e) => {
                crate::virtio::guest_warn!("virtio-blk: I/O error on {:?}: {e}", self.op_name());
                write_status(mem, self.status_addr, status::IOERR)
            }
        }
    }

    fn op_name(&self) -> &'static str {
        match self.op {
            RequestOp::Read { .. } => "read",
            RequestOp::Write { .. } => "write",
            RequestOp::Flush => "flush",
            RequestOp::GetId { .. } => "get-id",
            RequestOp::Discard(_) => "discard",
            RequestOp::WriteZeroes(_) => "write-zeroes",
        }
    }
}

/// Parses, executes (synchronously, waiting for the backend) and completes
/// one chain; returns `(head_index, used_len)` for the used ring.
///
/// This is the whole request path minus the queue: the fuzz target and the
/// tests drive it directly.
pub fn execute<M, B>(
    chain: DescriptorChain<M>,
    limits: &DiskLimits,
    backend: &mut B,
    mem: &Arc<GuestMemoryMmap>,
    id: &[u8; VIRTIO_BLK_ID_BYTES],
) -> (u16, u32)
where
    M: Deref,
    M::Target: GuestMemory,
    B: DiskBackend + ?Sized,
{
    let req = match parse_request(chain, limits) {
        Ok(r) => r,
        Err(rej) => {
            crate::virtio::guest_warn!("virtio-blk: rejected request: {}", rej.error);
            return (rej.head_index, rej.complete(&**mem));
        }
    };
    let used = match req.prepare(mem, id) {
        Prepared::Done { used_len } => used_len,
        Prepared::Io(op) => {
            let result = backend.execute_blocking(op);
            req.finish(&**mem, &result)
        }
    };
    (req.head_index, used)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::backend::DiskBackend;
    use crate::virtio::block::mem_disk::MemDisk;
    use crate::virtio::block::sync_engine::SyncEngine;
    use crate::virtio::block::testing::{
        desc, guest_mem, limits, open_raw, temp_disk, FaultyBackend, MEM_SIZE,
    };

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const ID: [u8; 20] = *b"vmm-ref-test-disk-id";
    const DISK_SECTORS: u64 = 128;

    fn write_hdr(mem: &GuestMemoryMmap, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Runs `descs` as one chain through parse + execute with `backend`;
    /// returns (used_len, status byte at STATUS).
    fn run_with(
        mem: &Arc<GuestMemoryMmap>,
        descs: &[RawDescriptor],
        lim: &DiskLimits,
        backend: &mut dyn DiskBackend,
    ) -> (u32, u8) {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let q = MockSplitQueue::new(&**mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let (head, used) = execute(chain, lim, backend, mem, &ID);
        assert_eq!(head, 0);
        (used, mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    struct Env {
        mem: Arc<GuestMemoryMmap>,
        _file: vmm_sys_util::tempfile::TempFile,
        path: std::path::PathBuf,
        backend: SyncEngine,
    }

    fn env() -> Env {
        let file = temp_disk((DISK_SECTORS * 512) as usize, 0x5a);
        let raw = open_raw(&file, false, false);
        Env {
            mem: guest_mem(),
            path: file.as_path().to_path_buf(),
            _file: file,
            backend: SyncEngine::new(raw),
        }
    }

    impl Env {
        fn run(&mut self, descs: &[RawDescriptor]) -> (u32, u8) {
            run_with(&self.mem, descs, &limits(DISK_SECTORS), &mut self.backend)
        }
        fn disk(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    fn rw(data_len: u32, write: bool) -> Vec<RawDescriptor> {
        vec![
            desc(HDR, 16, false),
            desc(DATA, data_len, write),
            desc(STATUS, 1, true),
        ]
    }

    #[test]
    fn read_write_round_trip() {
        let mut e = env();
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        e.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        write_hdr(&e.mem, req_type::OUT, 4);
        assert_eq!(e.run(&rw(1024, false)), (1, status::OK));
        let disk = e.disk();
        assert_eq!(&disk[2048..3072], &pattern[..]);
        assert!(disk[..2048].iter().all(|&b| b == 0x5a));
        assert!(disk[3072..].iter().all(|&b| b == 0x5a));

        e.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        write_hdr(&e.mem, req_type::IN, 4);
        assert_eq!(e.run(&rw(1024, true)), (1025, status::OK));
        let mut back = vec![0u8; 1024];
        e.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn any_layout_header_data_and_status_combined() {
        let mut e = env();
        // Header and data in one readable descriptor; data + status in one
        // writable descriptor for the read.
        let mut buf = vec![0u8; 16 + 512];
        buf[..4].copy_from_slice(&req_type::OUT.to_le_bytes());
        buf[8..16].copy_from_slice(&1u64.to_le_bytes());
        buf[16..].fill(0xc3);
        e.mem.write_slice(&buf, GuestAddress(HDR)).unwrap();
        let descs = [desc(HDR, 16 + 512, false), desc(STATUS, 1, true)];
        assert_eq!(e.run(&descs), (1, status::OK));
        assert!(e.disk()[512..1024].iter().all(|&b| b == 0xc3));

        write_hdr(&e.mem, req_type::IN, 1);
        let descs = [desc(HDR, 16, false), desc(STATUS - 512, 513, true)];
        assert_eq!(e.run(&descs), (513, status::OK));
        let mut back = vec![0u8; 512];
        e.mem
            .read_slice(&mut back, GuestAddress(STATUS - 512))
            .unwrap();
        assert!(back.iter().all(|&b| b == 0xc3));
    }

    #[test]
    fn flush_get_id_discard_write_zeroes() {
        let mut e = env();
        write_hdr(&e.mem, req_type::FLUSH, 0);
        assert_eq!(
            e.run(&[desc(HDR, 16, false), desc(STATUS, 1, true)]),
            (1, status::OK)
        );

        write_hdr(&e.mem, req_type::GET_ID, 0);
        assert_eq!(e.run(&rw(20, true)), (21, status::OK));
        let mut id = [0u8; 20];
        e.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(id, ID);

        for (t, sector, flags) in [
            (req_type::DISCARD, 8u64, 0u32),
            (req_type::WRITE_ZEROES, 16, 0),
            (req_type::WRITE_ZEROES, 24, 1),
        ] {
            write_hdr(&e.mem, t, 0);
            let mut seg = [0u8; 16];
            seg[..8].copy_from_slice(&sector.to_le_bytes());
            seg[8..12].copy_from_slice(&4u32.to_le_bytes());
            seg[12..].copy_from_slice(&flags.to_le_bytes());
            e.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
            assert_eq!(e.run(&rw(16, false)), (1, status::OK), "type {t}");
        }
        let disk = e.disk();
        // Write-zeroes ranges read back as zeroes; discard may or may not
        // (a hole reads as zeroes on file systems that punch).
        assert!(disk[16 * 512..20 * 512].iter().all(|&b| b == 0));
        assert!(disk[24 * 512..28 * 512].iter().all(|&b| b == 0));
        assert!(disk[20 * 512..24 * 512].iter().all(|&b| b == 0x5a));
        assert!(disk[28 * 512..].iter().all(|&b| b == 0x5a));
    }

    fn expect_err(
        descs: &[RawDescriptor],
        mem: &GuestMemoryMmap,
        lim: &DiskLimits,
    ) -> RejectedRequest {
        let q = MockSplitQueue::new(mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        parse_request(chain, lim).unwrap_err()
    }

    #[test]
    fn malformed_out_of_memory_and_overflow() {
        let mut e = env();
        write_hdr(&e.mem, req_type::IN, 0);
        // Data beyond guest memory.
        let d = [
            desc(HDR, 16, false),
            desc(MEM_SIZE as u64 - 256, 512, true),
            desc(STATUS, 1, true),
        ];
        assert_eq!(e.run(&d), (1, status::IOERR));
        let r = expect_err(&d, &e.mem, &limits(DISK_SECTORS));
        assert!(matches!(r.error, RequestError::OutOfMemory { .. }));
        // addr + len overflows.
        let d = [
            desc(HDR, 16, false),
            desc(u64::MAX - 100, 512, true),
            desc(STATUS, 1, true),
        ];
        assert_eq!(e.run(&d), (1, status::IOERR));
        let r = expect_err(&d, &e.mem, &limits(DISK_SECTORS));
        assert!(matches!(r.error, RequestError::AddressOverflow { .. }));
        // Header outside memory.
        let d = [desc(1 << 40, 16, false), desc(STATUS, 1, true)];
        assert_eq!(e.run(&d), (1, status::IOERR));
    }

    #[test]
    fn malformed_status_missing_short_or_outside() {
        let mut e = env();
        write_hdr(&e.mem, req_type::IN, 0);
        // Last descriptor device-readable: no status is written.
        let d = [
            desc(HDR, 16, false),
            desc(DATA, 512, true),
            desc(STATUS, 1, false),
        ];
        assert_eq!(e.run(&d), (0, 0xff));
        assert_eq!(
            expect_err(&d, &e.mem, &limits(DISK_SECTORS)).status_addr,
            None
        );
        // Zero-length status descriptor.
        let d = [
            desc(HDR, 16, false),
            desc(DATA, 512, true),
            desc(STATUS, 0, true),
        ];
        assert_eq!(e.run(&d), (0, 0xff));
        // Status outside guest memory.
        let d = [
            desc(HDR, 16, false),
            desc(DATA, 512, true),
            desc(MEM_SIZE as u64, 1, true),
        ];
        assert_eq!(e.run(&d), (0, 0xff));
        // Only a header.
        let d = [desc(HDR, 16, false)];
        assert_eq!(e.run(&d), (0, 0xff));
        // Short header.
        let d = [desc(HDR, 8, false), desc(STATUS, 1, true)];
        assert_eq!(e.run(&d), (1, status::IOERR));
        assert_eq!(
            expect_err(&d, &e.mem, &limits(DISK_SECTORS)).error,
            RequestError::HeaderTooShort
        );
    }

    #[test]
    fn malformed_chain_loop_is_bounded() {
        let e = env();
        write_hdr(&e.mem, req_type::IN, 0);
        let q = MockSplitQueue::new(&*e.mem, 16);
        let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        let w = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        // 0 -> 1 -> 2 -> 1 -> 2 ...
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, next | w, 2)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, next | w, 1)),
        ];
        let chain = q.build_multiple_desc_chains(&descs).unwrap();
        let r = parse_request(chain, &limits(DISK_SECTORS)).unwrap_err();
        assert_eq!(r.error, RequestError::TruncatedChain);
        assert_eq!(r.status_addr, None);
        // A next index beyond the queue.
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, next | w, 200)),
        ];
        let chain = q.build_multiple_desc_chains(&descs).unwrap();
        let r = parse_request(chain, &limits(DISK_SECTORS)).unwrap_err();
        assert_eq!(r.error, RequestError::TruncatedChain);
    }

    #[test]
    fn malformed_wrong_direction_and_order() {
        let mut e = env();
        write_hdr(&e.mem, req_type::IN, 0);
        assert_eq!(e.run(&rw(512, false)), (1, status::IOERR));
        write_hdr(&e.mem, req_type::OUT, 0);
        let before = e.disk();
        assert_eq!(e.run(&rw(512, true)), (1, status::IOERR));
        assert_eq!(e.disk(), before);
        // Readable after writable.
        write_hdr(&e.mem, req_type::IN, 0);
        let d = [
            desc(HDR, 16, false),
            desc(DATA, 512, true),
            desc(DATA + 512, 512, false),
            desc(STATUS, 1, true),
        ];
        assert_eq!(e.run(&d), (1, status::IOERR));
        assert_eq!(
            expect_err(&d, &e.mem, &limits(DISK_SECTORS)).error,
            RequestError::DescriptorOrder
        );
    }

    #[test]
    fn malformed_lengths() {
        let mut e = env();
        write_hdr(&e.mem, req_type::IN, 0);
        // Almost 4 GiB in one descriptor: outside memory and above size_max.
        assert_eq!(e.run(&rw(0xffff_ff00, true)), (1, status::IOERR));
        // 4 GiB - 1 plus header and status exceeds 4 GiB in total: the
        // chain is cut short and no status byte is written.
        assert_eq!(e.run(&rw(u32::MAX, true)), (0, 0xff));
        // Above size_max but inside memory.
        let mut lim = limits(DISK_SECTORS);
        lim.size_max = 512;
        let r = expect_err(&rw(1024, true), &e.mem, &lim);
        assert!(matches!(
            r.error,
            RequestError::SegmentTooLarge {
                len: 1024,
                max: 512
            }
        ));
        // More segments than seg_max.
        lim = limits(DISK_SECTORS);
        lim.seg_max = 2;
        let mut d = vec![desc(HDR, 16, false)];
        d.extend((0..3).map(|i| desc(DATA + i * 512, 512, true)));
        d.push(desc(STATUS, 1, true));
        let r = expect_err(&d, &e.mem, &lim);
        assert!(matches!(
            r.error,
            RequestError::TooManySegments { count: 3, max: 2 }
        ));
        // Chain longer than seg_max + 2 descriptors.
        lim.seg_max = 1;
        let r = expect_err(&d, &e.mem, &lim);
        assert!(matches!(r.error, RequestError::TooManySegments { .. }));
        assert_eq!(r.status_addr, Some(GuestAddress(STATUS)));
        // Not a multiple of 512.
        assert_eq!(e.run(&rw(100, true)), (1, status::IOERR));
        // More than 4 GiB in total: virtio-queue stops the chain.
        let d = [
            desc(HDR, 16, false),
            desc(DATA, 0x8000_0000, true),
            desc(DATA, 0x8000_0000, true),
            desc(STATUS, 1, true),
        ];
        let r = expect_err(&d, &e.mem, &limits(DISK_SECTORS));
        assert_eq!(r.error, RequestError::TruncatedChain);
    }

    #[test]
    fn malformed_sector_range() {
        let mut e = env();
        write_hdr(&e.mem, req_type::IN, DISK_SECTORS);
        assert_eq!(e.run(&rw(512, true)), (1, status::IOERR));
        write_hdr(&e.mem, req_type::IN, DISK_SECTORS - 1);
        assert_eq!(e.run(&rw(1024, true)), (1, status::IOERR));
        write_hdr(&e.mem, req_type::IN, DISK_SECTORS - 1);
        assert_eq!(e.run(&rw(512, true)), (513, status::OK));
        write_hdr(&e.mem, req_type::OUT, u64::MAX);
        assert_eq!(e.run(&rw(512, false)), (1, status::IOERR));
        let r = expect_err(&rw(512, false), &e.mem, &limits(DISK_SECTORS));
        assert!(matches!(r.error, RequestError::SectorOutOfRange { .. }));
    }

    #[test]
    fn read_only_drive_rejects_writes() {
        let file = temp_disk((DISK_SECTORS * 512) as usize, 0x11);
        let mut backend = SyncEngine::new(open_raw(&file, true, false));
        let mem = guest_mem();
        let mut lim = limits(DISK_SECTORS);
        lim.read_only = true;
        for t in [req_type::OUT, req_type::DISCARD, req_type::WRITE_ZEROES] {
            write_hdr(&mem, t, 0);
            mem.write_slice(&[0u8; 16], GuestAddress(DATA)).unwrap();
            let len = if t == req_type::OUT { 512 } else { 16 };
            assert_eq!(
                run_with(&mem, &rw(len, false), &lim, &mut backend),
                (1, status::IOERR)
            );
        }
        assert!(std::fs::read(file.as_path())
            .unwrap()
            .iter()
            .all(|&b| b == 0x11));
        write_hdr(&mem, req_type::IN, 0);
        assert_eq!(
            run_with(&mem, &rw(512, true), &lim, &mut backend),
            (513, status::OK)
        );
    }

    #[test]
    fn unsupported_and_discard_validation() {
        let mut e = env();
        write_hdr(&e.mem, 99, 0);
        assert_eq!(e.run(&rw(512, true)), (1, status::UNSUPP));
        let seg = |sector: u64, n: u32, flags: u32| {
            let mut s = [0u8; 16];
            s[..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&n.to_le_bytes());
            s[12..].copy_from_slice(&flags.to_le_bytes());
            s
        };
        write_hdr(&e.mem, req_type::DISCARD, 0);
        e.mem
            .write_slice(&seg(0, 1, 1), GuestAddress(DATA))
            .unwrap();
        assert_eq!(e.run(&rw(16, false)), (1, status::UNSUPP)); // unmap on discard
        write_hdr(&e.mem, req_type::WRITE_ZEROES, 0);
        e.mem
            .write_slice(&seg(0, 1, 4), GuestAddress(DATA))
            .unwrap();
        assert_eq!(e.run(&rw(16, false)), (1, status::UNSUPP)); // reserved flag
        e.mem
            .write_slice(&seg(0, 1, 0), GuestAddress(DATA))
            .unwrap();
        assert_eq!(e.run(&rw(32, false)), (1, status::UNSUPP)); // two segments
        assert_eq!(e.run(&rw(8, false)), (1, status::IOERR)); // short
        e.mem
            .write_slice(&seg(DISK_SECTORS - 1, 2, 0), GuestAddress(DATA))
            .unwrap();
        assert_eq!(e.run(&rw(16, false)), (1, status::IOERR)); // past the end
        let mut lim = limits(DISK_SECTORS);
        lim.max_write_zeroes_sectors = 1;
        e.mem
            .write_slice(&seg(0, 2, 0), GuestAddress(DATA))
            .unwrap();
        let r = expect_err(&rw(16, false), &e.mem, &lim);
        assert!(matches!(r.error, RequestError::DwzTooLarge { .. }));
        lim.write_zeroes = false;
        let r = expect_err(&rw(16, false), &e.mem, &lim);
        assert_eq!(r.error.status(), status::UNSUPP);
        // GET_ID with a short buffer.
        write_hdr(&e.mem, req_type::GET_ID, 0);
        assert_eq!(e.run(&rw(10, true)), (1, status::IOERR));
    }

    #[test]
    fn backend_eio_gives_ioerr_and_device_keeps_working() {
        let file = temp_disk((DISK_SECTORS * 512) as usize, 0);
        let inner = Box::new(SyncEngine::new(open_raw(&file, false, false)));
        let mut backend = FaultyBackend::new(inner, |k| matches!(k, DiskOpKind::Write { .. }));
        let mem = guest_mem();
        let lim = limits(DISK_SECTORS);
        write_hdr(&mem, req_type::OUT, 0);
        assert_eq!(
            run_with(&mem, &rw(512, false), &lim, &mut backend),
            (1, status::IOERR)
        );
        write_hdr(&mem, req_type::IN, 0);
        assert_eq!(
            run_with(&mem, &rw(512, true), &lim, &mut backend),
            (513, status::OK)
        );
        assert_eq!(
            backend.injected.load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    }

    #[test]
    fn status_mapping() {
        assert_eq!(
            RequestError::Unsupported { req_type: 5 }.status(),
            status::UNSUPP
        );
        assert_eq!(RequestError::DwzFlags { flags: 2 }.status(), status::UNSUPP);
        assert_eq!(RequestError::ReadOnly.status(), status::IOERR);
        assert_eq!(RequestError::TruncatedChain.status(), status::IOERR);
    }

    fn arb_desc() -> impl Strategy<Value = (u64, u32, bool)> {
        let addr = prop_oneof![
            8 => 0x1_0000u64..0x4_0000,
            1 => Just(MEM_SIZE as u64 - 8),
            1 => any::<u64>(),
        ];
        let len = prop_oneof![
            4 => 0u32..2048,
            2 => Just(512u32),
            1 => Just(16u32),
            1 => any::<u32>(),
        ];
        (addr, len, any::<bool>())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Arbitrary chains: never a panic, and the only guest bytes that
        /// change lie inside the chain's own device-writable descriptors.
        #[test]
        fn arbitrary_chains_write_only_inside_writable_buffers(
            descs in proptest::collection::vec(arb_desc(), 1..8),
            t in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            sector in prop_oneof![0u64..140, any::<u64>()],
            fill in any::<u8>(),
        ) {
            let mut backend = SyncEngine::new(MemDisk::new((DISK_SECTORS * 512) as usize, false));
            let mem = guest_mem();
            // Fill the data area, then put a header where the first
            // descriptor points (if that is in memory).
            mem.write_slice(&vec![fill; 0x4_0000], GuestAddress(0x1_0000)).unwrap();
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&t.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            let _ = mem.write_slice(&h, GuestAddress(descs[0].0));
            let raw: Vec<RawDescriptor> = descs.iter().map(|&(a, l, w)| desc(a, l, w)).collect();
            let q = MockSplitQueue::new(&*mem, 16);
            let chain = q.build_desc_chain(&raw).unwrap();
            let mut before = vec![0u8; MEM_SIZE];
            mem.read_slice(&mut before, GuestAddress(0)).unwrap();
            let (_, used) = execute(chain, &limits(DISK_SECTORS), &mut backend, &mem, &ID);
            let mut after = vec![0u8; MEM_SIZE];
            mem.read_slice(&mut after, GuestAddress(0)).unwrap();
            for (i, (b, a)) in before.iter().zip(after.iter()).enumerate() {
                if b != a {
                    let addr = i as u64;
                    let inside = descs.iter().any(|&(d, l, w)| {
                        w && addr >= d && d.checked_add(u64::from(l)).is_some_and(|end| addr < end)
                    });
                    prop_assert!(inside, "byte {addr:#x} changed outside writable buffers");
                }
            }
            let writable: u64 = descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
            prop_assert!(u64::from(used) <= writable);
        }
    }
}
