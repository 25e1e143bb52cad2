//! `malformed`: requests a device must survive. Each case is sent alone on
//! one queue (rotating over the queues); the device must answer IOERR or
//! UNSUPP in a status byte it was allowed to write, or - for chains that
//! cannot carry a status - complete the chain without writing anything, or
//! flag NEEDS_RESET (then we reset and re-initialise). After every case a
//! quick write/read check must pass on that queue. Buffers the device may
//! not write are checked to be untouched.
//!
//! One tolerance: a buffer outside guest RAM may also complete with OK
//! (`ok_discarded`), because QEMU treats DMA to unassigned addresses like a
//! bus abort and drops it. A strict device answers `ioerr` there; callers
//! that require strictness check the case names in the RESULT detail.

use core::fmt::Write;

use super::{verify, Ctx, Detail, Outcome};
use crate::blk::request::{req_type, ReqMem, HDR_LEN, S_IOERR, S_OK, S_PENDING, S_UNSUPP};
use crate::blk::BlkError;
use crate::println;
use crate::virtio::queue::{RawDesc, RawNext, DESC_F_NEXT, DESC_F_WRITE};

const TIMEOUT_US: u64 = 3_000_000;
const DATA_LEN: u32 = 4096;
/// A guest-physical address far outside any RAM we will be given (1 TiB).
const OUTSIDE_RAM: u64 = 1 << 40;
/// Fill of buffers the device must not write.
const GUARD: u8 = 0x5a;

/// What a case accepts as a correct answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// IOERR or UNSUPP in the status byte (or NEEDS_RESET).
    Error,
    /// As `Error`, but the buffer lies outside guest RAM, and a device may
    /// also complete the request with OK after discarding the transfer, as a
    /// bus would abort it (QEMU does this); reported as `ok_discarded`.
    ErrorOrDiscarded,
    /// Exactly IOERR (or NEEDS_RESET).
    IoErr,
    /// Exactly UNSUPP (or NEEDS_RESET).
    Unsupp,
    /// The chain has no usable status byte: completing it without writing
    /// anything is fine, as is an error status in a writable byte.
    NoStatus,
}

/// Which buffer the status may legitimately land in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StatusAt {
    /// Our status byte (the last writable descriptor).
    Status,
    /// The last byte of the data buffer (last writable descriptor).
    DataEnd,
    /// Nowhere: nothing in the chain is writable.
    Nowhere,
}

struct Case {
    name: &'static str,
    kind: u32,
    sector: u64,
    expect: Expect,
    status_at: StatusAt,
    /// Builds the chain given the request's buffers.
    descs: fn(&ReqMem, u64) -> ([RawDesc; 3], usize),
}

fn d(addr: u64, len: u32, flags: u16, next: RawNext) -> RawDesc {
    RawDesc {
        addr,
        len,
        flags,
        next,
    }
}

const NONE: RawNext = RawNext::Zero;
const W: u16 = DESC_F_WRITE;
const N: u16 = DESC_F_NEXT;

fn cases(capacity: u64) -> [Case; 11] {
    [
        Case {
            name: "data_outside_ram",
            kind: req_type::IN,
            sector: 0,
            expect: Expect::ErrorOrDiscarded,
            status_at: StatusAt::Status,
            descs: |m, _| {
                (
                    [
                        d(m.hdr, HDR_LEN, N, RawNext::Pos(1)),
                        d(OUTSIDE_RAM, DATA_LEN, W | N, RawNext::Pos(2)),
                        d(m.status_addr(), 1, W, NONE),
                    ],
                    3,
                )
            },
        },
        Case {
            name: "addr_len_overflow",
            kind: req_type::IN,
            sector: 0,
            expect: Expect::ErrorOrDiscarded,
            status_at: StatusAt::Status,
            descs: |m, _| {
                (
                    [
                        d(m.hdr, HDR_LEN, N, RawNext::Pos(1)),
                        d(u64::MAX - 0xfff, 0x2000, W | N, RawNext::Pos(2)),
                        d(m.status_addr(), 1, W, NONE),
                    ],
                    3,
                )
            },
        },
        // Header + 4 GiB - 1 + status is more than the 2^32 bytes a chain may
        // carry (virtio 1.2, 2.7.5.2): a device that stops walking the chain
        // there (rust-vmm virtio-queue does) never reaches the status byte, so
        // consuming the request without a status is as correct as IOERR.
        Case {
            name: "length_4g",
            kind: req_type::OUT,
            sector: 0,
            expect: Expect::NoStatus,
            status_at: StatusAt::Status,
            descs: |m, _| {
                (
                    [
                        d(m.hdr, HDR_LEN, N, RawNext::Pos(1)),
                        d(m.data, u32::MAX, N, RawNext::Pos(2)),
                        d(m.status_addr(), 1, W, NONE),
                    ],
                    3,
                )
            },
        },
        Case {
            name: "missing_status",
            kind: req_type::OUT,
            sector: 0,
            expect: Expect::NoStatus,
            status_at: StatusAt::Nowhere,
            descs: |m, _| {
                (
                    [
                        d(m.hdr, HDR_LEN, N, RawNext::Pos(1)),
                        d(m.data, DATA_LEN, 0, NONE),
                        d(0, 0, 0, NONE),
                    ],
                    2,
                )
            },
        },
        Case {
            name: "status_read_only",
            kind: req_type::IN,
            sector: 0,
            expect: Expect::NoStatus,
            status_at: StatusAt::Nowhere,
            descs: |m, _| {
                (
                    [
                        d(m.hdr, HDR_LEN, N, RawNext::Pos(1)),
                        d(m.status_addr(), 1, 0, NONE),
                        d(0, 0, 0, NONE),
                    ],
                    2,
                )
            },
        },
        Case {
            name: "status_too_short",
            kind: req_type::IN,
            sector: 0,
            expect: Expect::NoStatus,
            status_at: StatusAt::DataEnd,
            descs: |m, _| {
                (
                    [
                        d(m.hdr, HDR_LEN, N, RawNext::Pos(1)),
                        d(m.data, DATA_LEN, W | N, RawNext::Pos(2)),
                        d(m.status_addr(), 0, W, NONE),
                    ],
                    3,
                )
            },
        },
        Case {
            name: "header_too_short",
            kind: req_type::IN,
            sector: 0,
            expect: Expect::Error,
            status_at: StatusAt::Status,
            descs: |m, _| {
                (
                    [
                        d(m.hdr, 8, N, RawNext::Pos(1)),
                        d(m.data, DATA_LEN, W | N, RawNext::Pos(2)),
                        d(m.status_addr(), 1, W, NONE),
                    ],
                    3,
                )
            },
        },
        Case {
            name: "unknown_type",
            kind: 0x7f,
            sector: 0,
            expect: Expect::Unsupp,
            status_at: StatusAt::Status,
            descs: |m, _| {
                (
                    [
                        d(m.hdr, HDR_LEN, N, RawNext::Pos(1)),
                        d(m.data, DATA_LEN, W | N, RawNext::Pos(2)),
                        d(m.status_addr(), 1, W, NONE),
                    ],
                    3,
                )
            },
        },
        Case {
            name: "sector_past_capacity",
            kind: req_type::IN,
            sector: capacity + 8,
            expect: Expect::IoErr,
            status_at: StatusAt::Status,
            descs: |m, _| {
                (
                    [
                        d(m.hdr, HDR_LEN, N, RawNext::Pos(1)),
                        d(m.data, DATA_LEN, W | N, RawNext::Pos(2)),
                        d(m.status_addr(), 1, W, NONE),
                    ],
                    3,
                )
            },
        },
        Case {
            name: "descriptor_loop",
            kind: req_type::IN,
            sector: 0,
            expect: Expect::NoStatus,
            status_at: StatusAt::DataEnd,
            descs: |m, _| {
                (
                    [
                        d(m.hdr, HDR_LEN, N, RawNext::Pos(1)),
                        d(m.data, DATA_LEN, W | N, RawNext::Pos(0)),
                        d(0, 0, 0, NONE),
                    ],
                    2,
                )
            },
        },
        Case {
            name: "next_out_of_range",
            kind: req_type::IN,
            sector: 0,
            expect: Expect::NoStatus,
            status_at: StatusAt::Nowhere,
            descs: |m, qsize| {
                (
                    [
                        d(m.hdr, HDR_LEN, N, RawNext::Index(qsize as u16 + 7)),
                        d(m.status_addr(), 1, W, NONE),
                        d(0, 0, 0, NONE),
                    ],
                    2,
                )
            },
        },
    ]
}

/// How the device answered one case.
enum Answer {
    /// Completed with this used length; the status byte where it could
    /// legitimately be written.
    Completed(u32, Option<u8>),
    /// The device set NEEDS_RESET.
    NeedsReset,
}

/// Runs `malformed`.
pub fn run(ctx: &mut Ctx<'_>) -> Outcome {
    let mut detail = Detail::new();
    let mut failed = 0;
    let capacity = ctx.dev.config().capacity;
    for (i, case) in cases(capacity).iter().enumerate() {
        let q = i % ctx.dev.nr_queues().max(1);
        let (ok, what) = match run_case(ctx, q, case) {
            Ok(result) => result,
            Err(e) => {
                println!("malformed {}: driver error: {}", case.name, e);
                (false, "driver_error")
            }
        };
        let verdict = if ok { "ok" } else { "BAD" };
        println!("malformed {} q={}: {} ({})", case.name, q, what, verdict);
        let _ = write!(detail, " {}={}", case.name, what);
        if !ok {
            failed += 1;
            let _ = write!(detail, "!");
        }
    }
    if failed == 0 {
        Outcome::pass(format_args!(
            "cases={}{}",
            cases(capacity).len(),
            detail.as_str()
        ))
    } else {
        Outcome::fail(format_args!("failed={}{}", failed, detail.as_str()))
    }
}

/// Re-initialises the device after NEEDS_RESET or a stuck chain.
fn recover(ctx: &mut Ctx<'_>) -> Result<(), BlkError> {
    ctx.dev.init(ctx.arena)
}

fn run_case(ctx: &mut Ctx<'_>, q: usize, case: &Case) -> Result<(bool, &'static str), BlkError> {
    let mem = ReqMem::alloc(ctx.arena, DATA_LEN)?;
    mem.write_header(case.kind, case.sector);
    mem.set_status(S_PENDING);
    mem.data().fill(GUARD);
    let qsize = u64::from(ctx.dev.queue_size());
    let (descs, n) = (case.descs)(&mem, qsize);
    ctx.dev.queue(q)?.add_raw(&descs[..n], 0)?;
    ctx.dev.kick(q)?;
    let mut used_len = 0;
    let answer = match ctx.dev.wait(1, TIMEOUT_US, |_, used| used_len = used.len) {
        Ok(()) => Answer::Completed(
            used_len,
            match case.status_at {
                StatusAt::Status => Some(mem.status()),
                // An untouched guard byte means nothing was written there.
                StatusAt::DataEnd => mem.data().last().copied().filter(|&b| b != GUARD),
                StatusAt::Nowhere => None,
            },
        ),
        Err(BlkError::NeedsReset) => Answer::NeedsReset,
        Err(BlkError::Timeout) => {
            recover(ctx)?;
            return Ok((false, "no_completion"));
        }
        Err(e) => return Err(e),
    };

    // Buffers the device was not allowed to write must be untouched.
    let status_writable = case.status_at == StatusAt::Status;
    let data_writable = matches!(case.status_at, StatusAt::Status | StatusAt::DataEnd)
        && case.kind != req_type::OUT;
    let mut result = match answer {
        Answer::NeedsReset => {
            recover(ctx)?;
            (true, "needs_reset")
        }
        Answer::Completed(len, status) => {
            println!("malformed {}: completed, used len {}", case.name, len);
            classify(case.expect, status)
        }
    };
    if !status_writable && mem.status() != S_PENDING {
        result = (false, "wrote_read_only_status");
    }
    if !data_writable && mem.data().iter().any(|&b| b != GUARD) {
        result = (false, "wrote_read_only_data");
    }

    // The queue must still work.
    match verify::quick(ctx, q) {
        Ok(Ok(())) => Ok(result),
        Ok(Err(_)) => Ok((false, "queue_broken_after")),
        Err(BlkError::NeedsReset) => {
            recover(ctx)?;
            Ok((false, "needs_reset_after"))
        }
        Err(e) => Err(e),
    }
}

fn classify(expect: Expect, status: Option<u8>) -> (bool, &'static str) {
    let name = match status {
        Some(S_OK) if expect == Expect::ErrorOrDiscarded => "ok_discarded",
        Some(S_OK) => "ok_status",
        Some(S_IOERR) => "ioerr",
        Some(S_UNSUPP) => "unsupp",
        Some(S_PENDING) | None => "consumed",
        Some(_) => "bad_status",
    };
    let pass = match expect {
        Expect::Error => matches!(status, Some(S_IOERR) | Some(S_UNSUPP)),
        Expect::ErrorOrDiscarded => matches!(status, Some(S_OK) | Some(S_IOERR) | Some(S_UNSUPP)),
        Expect::IoErr => status == Some(S_IOERR),
        Expect::Unsupp => status == Some(S_UNSUPP),
        Expect::NoStatus => matches!(
            status,
            Some(S_IOERR) | Some(S_UNSUPP) | Some(S_PENDING) | None
        ),
    };
    (pass, name)
}
