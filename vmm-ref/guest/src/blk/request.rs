//! virtio-blk requests: buffers, chain layout, submission and completion.

use core::ptr;

use super::{BlkDevice, BlkError};
use crate::mem::Arena;
use crate::tsc::Deadline;
use crate::virtio::queue::{Seg, Used};

/// Request types.
pub mod req_type {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush the write cache.
    pub const FLUSH: u32 = 4;
    /// Device ID string (20 bytes).
    pub const GET_ID: u32 = 8;
    /// Discard sectors.
    pub const DISCARD: u32 = 11;
    /// Zero sectors.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status: success.
pub const S_OK: u8 = 0;
/// Request status: I/O error.
pub const S_IOERR: u8 = 1;
/// Request status: unsupported request.
pub const S_UNSUPP: u8 = 2;
/// What we put in the status byte before submitting; the device overwrites it.
pub const S_PENDING: u8 = 0xff;
/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_LEN: u32 = 20;
/// Size of the request header.
pub const HDR_LEN: u32 = 16;
/// Size of one DISCARD / WRITE_ZEROES segment.
pub const SEGMENT_LEN: u32 = 16;
/// How long synchronous requests may take.
const SYNC_TIMEOUT_US: u64 = 10_000_000;
/// How often a waiting driver checks for NEEDS_RESET (a register read is a VM exit).
const STATUS_CHECK_US: u64 = 10_000;

/// Memory for one request: header + status in one cache line, and a data
/// buffer of `cap` bytes (page aligned, physically contiguous).
#[derive(Clone, Copy, Debug)]
pub struct ReqMem {
    /// Header address (16 bytes; the status byte follows at +16).
    pub hdr: u64,
    /// Data buffer address.
    pub data: u64,
    /// Data buffer capacity.
    pub cap: u32,
}

impl ReqMem {
    /// Allocates a request with a data buffer of `cap` bytes.
    pub fn alloc(arena: &mut Arena, cap: u32) -> Result<Self, BlkError> {
        let hdr = arena.alloc(64, 64)?;
        let data = arena.alloc(u64::from(cap).max(1), 4096)?;
        Ok(Self { hdr, data, cap })
    }

    /// Address of the status byte.
    pub fn status_addr(&self) -> u64 {
        self.hdr + u64::from(HDR_LEN)
    }

    /// The status byte as the device left it.
    pub fn status(&self) -> u8 {
        // SAFETY: the status byte is part of this request's allocation; the
        // device may write it concurrently, hence the volatile read.
        unsafe { ptr::read_volatile(self.status_addr() as *const u8) }
    }

    /// Sets the status byte (to [`S_PENDING`] before submission).
    pub fn set_status(&self, value: u8) {
        // SAFETY: as for `status`.
        unsafe { ptr::write_volatile(self.status_addr() as *mut u8, value) }
    }

    /// Writes the 16-byte request header.
    pub fn write_header(&self, kind: u32, sector: u64) {
        // SAFETY: the header is the first 16 bytes of this request's
        // allocation and is not in flight while we write it.
        unsafe {
            ptr::write_volatile(self.hdr as *mut u32, kind);
            ptr::write_volatile((self.hdr + 4) as *mut u32, 0);
            ptr::write_volatile((self.hdr + 8) as *mut u64, sector);
        }
    }

    /// The data buffer.
    ///
    /// Only call while the request is not in flight: the device writes the
    /// buffer of IN requests.
    pub fn data(&self) -> &'static mut [u8] {
        // SAFETY: the buffer was allocated for this request (`cap` bytes) and
        // callers only touch it while no request using it is in flight.
        unsafe { core::slice::from_raw_parts_mut(self.data as *mut u8, self.cap as usize) }
    }

    /// Writes one DISCARD / WRITE_ZEROES segment at the start of the data buffer.
    fn write_segment(&self, sector: u64, sectors: u32, flags: u32) {
        let data = self.data();
        data[..8].copy_from_slice(&sector.to_le_bytes());
        data[8..12].copy_from_slice(&sectors.to_le_bytes());
        data[12..16].copy_from_slice(&flags.to_le_bytes());
    }
}

/// A block operation.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Read `len` bytes at `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Bytes (multiple of 512).
        len: u32,
    },
    /// Write `len` bytes at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// Bytes (multiple of 512).
        len: u32,
    },
    /// Flush.
    Flush,
    /// Read the 20-byte device ID.
    GetId,
    /// Discard `sectors` sectors at `sector`.
    Discard {
        /// First sector.
        sector: u64,
        /// Sector count.
        sectors: u32,
    },
    /// Zero `sectors` sectors at `sector` (without unmapping).
    WriteZeroes {
        /// First sector.
        sector: u64,
        /// Sector count.
        sectors: u32,
    },
}

impl BlkDevice {
    /// Queues `op` on queue `q` using `mem`; the device sees it after
    /// [`BlkDevice::kick`]. `token` comes back with the completion.
    pub fn submit(&mut self, q: usize, mem: &ReqMem, op: Op, token: u32) -> Result<(), BlkError> {
        let hdr = Seg {
            addr: mem.hdr,
            len: HDR_LEN,
            write: false,
        };
        let status = Seg {
            addr: mem.status_addr(),
            len: 1,
            write: true,
        };
        let data = |len: u32, write: bool| -> Result<Seg, BlkError> {
            if len > mem.cap {
                return Err(BlkError::BufferTooSmall);
            }
            Ok(Seg {
                addr: mem.data,
                len,
                write,
            })
        };
        let (kind, sector, segs): (u32, u64, [Option<Seg>; 3]) = match op {
            Op::Read { sector, len } => (
                req_type::IN,
                sector,
                [Some(hdr), Some(data(len, true)?), Some(status)],
            ),
            Op::Write { sector, len } => (
                req_type::OUT,
                sector,
                [Some(hdr), Some(data(len, false)?), Some(status)],
            ),
            Op::Flush => (req_type::FLUSH, 0, [Some(hdr), Some(status), None]),
            Op::GetId => (
                req_type::GET_ID,
                0,
                [Some(hdr), Some(data(ID_LEN, true)?), Some(status)],
            ),
            Op::Discard { sector, sectors } => {
                let seg = data(SEGMENT_LEN, false)?;
                mem.write_segment(sector, sectors, 0);
                (req_type::DISCARD, 0, [Some(hdr), Some(seg), Some(status)])
            }
            Op::WriteZeroes { sector, sectors } => {
                let seg = data(SEGMENT_LEN, false)?;
                mem.write_segment(sector, sectors, 0);
                (
                    req_type::WRITE_ZEROES,
                    0,
                    [Some(hdr), Some(seg), Some(status)],
                )
            }
        };
        mem.write_header(kind, sector);
        mem.set_status(S_PENDING);
        let mut chain = [hdr; 3];
        let mut n = 0;
        for seg in segs.into_iter().flatten() {
            chain[n] = seg;
            n += 1;
        }
        self.queue(q)?.add(&chain[..n], token)?;
        Ok(())
    }

    /// Publishes queue `q`'s new requests and notifies the device if it
    /// asks for notifications.
    pub fn kick(&mut self, q: usize) -> Result<bool, BlkError> {
        let transport = *self.transport();
        Ok(self.queue(q)?.kick(&transport))
    }

    /// Next completion on queue `q`, if any.
    pub fn pop(&mut self, q: usize) -> Result<Option<Used>, BlkError> {
        Ok(self.queue(q)?.pop_used())
    }

    /// Polls all queues until `count` completions were handed to `done`
    /// (called with the queue index and the completion). Fails with
    /// [`BlkError::NeedsReset`] or [`BlkError::Timeout`] after `timeout_us`.
    pub fn wait(
        &mut self,
        mut count: usize,
        timeout_us: u64,
        mut done: impl FnMut(usize, Used),
    ) -> Result<(), BlkError> {
        let deadline = Deadline::after_us(timeout_us);
        let mut next_check = Deadline::after_us(STATUS_CHECK_US);
        while count > 0 {
            let mut progress = false;
            for q in 0..self.nr_queues() {
                while let Some(used) = self.pop(q)? {
                    done(q, used);
                    progress = true;
                    count = count.saturating_sub(1);
                }
            }
            if !progress && next_check.passed() {
                if self.needs_reset() {
                    return Err(BlkError::NeedsReset);
                }
                if deadline.passed() {
                    return Err(BlkError::Timeout);
                }
                next_check = Deadline::after_us(STATUS_CHECK_US);
            }
        }
        Ok(())
    }

    /// Runs one request synchronously on queue `q` and returns its status byte.
    pub fn run(&mut self, q: usize, mem: &ReqMem, op: Op) -> Result<u8, BlkError> {
        self.submit(q, mem, op, 0)?;
        self.kick(q)?;
        self.wait(1, SYNC_TIMEOUT_US, |_, _| {})?;
        Ok(mem.status())
    }
}
