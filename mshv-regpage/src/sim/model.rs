// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A plain reference model of the page protocol, and an operation language to drive the
//! real implementation and the model side by side (property tests, fuzzing).
//!
//! [`Harness::apply`] runs one [`Op`] against a [`VcpuRegisters`] facade over a
//! [`SimHypervisor`] page *and* against [`Model`], then checks that both agree: the value
//! or refusal of the operation, the hypervisor's vCPU state, the page contents, its dirty
//! bits and its `isvalid` flag. A fuzz target only needs to turn bytes into ops
//! ([`Op::decode`]) and call [`Harness::run`].
//!
//! ```
//! use mshv_regpage::sim::{Harness, Op};
//! use mshv_regpage::Gpr;
//!
//! let mut h = Harness::new();
//! h.run(&[
//!     Op::SetGpr(Gpr::Rax, 7),               // page write, GENERAL dirty
//!     Op::PokeGprWithoutDirty(Gpr::Rbx, 9),  // forgot the dirty bit... but GENERAL is dirty
//!     Op::Run,                               // so both reach the vCPU
//!     Op::PokeGprWithoutDirty(Gpr::Rcx, 5),  // no dirty bit this time:
//!     Op::Run,                               // lost
//!     Op::ReadGpr(Gpr::Rcx),                 // reads 0, the model agrees
//! ])?;
//! assert_eq!(h.hypervisor().state().gpr(Gpr::Rbx), 9);
//! assert_eq!(h.hypervisor().state().gpr(Gpr::Rcx), 0);
//! # Ok::<(), mshv_regpage::sim::Divergence>(())
//! ```

use mshv_bindings as hv;

use super::{SimHypercalls, SimHypervisor};
use crate::access::{ExitRegisters, VcpuRegisters};
use crate::dirty::{DirtyClasses, RegisterClass};
use crate::error::{Error, WritePath};
use crate::regs::{
    Gpr, PageRegisters, ReadOnlyRegister, Segment, SegmentAttributes, SegmentRegister, Xmm,
};

/// Upper bound on the ops [`Op::decode`] produces from one input.
pub const MAX_DECODED_OPS: usize = 4096;

/// One step of a test sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `ExitRegisters::set_gpr` through the facade.
    SetGpr(Gpr, u64),
    /// `ExitRegisters::set_rip` through the facade.
    SetRip(u64),
    /// `ExitRegisters::set_rflags` through the facade.
    SetRflags(u64),
    /// `ExitRegisters::set_xmm` through the facade.
    SetXmm(Xmm, u128),
    /// `ExitRegisters::set_segment` through the facade.
    SetSegment(Segment, SegmentRegister),
    /// `VcpuRegisters::set_read_only` (always a hypercall).
    SetReadOnly(ReadOnlyRegister, u64),
    /// `VcpuRegisters::set_hv_registers` for one GPR: the explicit hypercall path, refused
    /// if GENERAL was written on the page since the last run.
    HypercallSetGpr(Gpr, u64),
    /// A buggy raw page write of a GPR without the dirty bit (lost unless GENERAL is dirty
    /// anyway at the next dispatch).
    PokeGprWithoutDirty(Gpr, u64),
    /// Read a GPR through the facade.
    ReadGpr(Gpr),
    /// Read RIP through the facade.
    ReadRip,
    /// Read RFLAGS through the facade.
    ReadRflags,
    /// Read an XMM register through the facade.
    ReadXmm(Xmm),
    /// Read a segment register through the facade.
    ReadSegment(Segment),
    /// Read a read-only register through the facade.
    ReadReadOnly(ReadOnlyRegister),
    /// The guest changes a GPR in the hypervisor's state (visible on the page after the next
    /// [`Op::Run`]).
    GuestSetGpr(Gpr, u64),
    /// The guest changes a read-only register (e.g. CR8) in the hypervisor's state.
    GuestSetReadOnly(ReadOnlyRegister, u64),
    /// The hypervisor sets `isvalid` to the given value.
    SetPageValid(bool),
    /// One run: dispatch (dirty classes applied), exit (page refilled), `run_done`.
    Run,
}

/// The outcome of one op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A write or control op succeeded.
    Done,
    /// A read returned this value (GPRs, RIP, RFLAGS and read-only registers widened).
    Value(u128),
    /// A segment read returned this value.
    Segment(SegmentRegister),
    /// A write was refused as mixing page and hypercall writes of one class.
    Refused(RegisterClass),
}

/// A disagreement between the implementation and the model.
#[derive(Debug, thiserror::Error)]
#[error("op #{index} {op:?}: {detail}")]
pub struct Divergence {
    /// Position of the op in the sequence.
    pub index: usize,
    /// The op.
    pub op: Op,
    /// What differed.
    pub detail: String,
}

/// The reference model: plain values, no pointers, no volatile, no facade.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// The hypervisor's vCPU state.
    pub vcpu: PageRegisters,
    /// The page contents.
    pub page: PageRegisters,
    /// The page's dirty classes.
    pub dirty: DirtyClasses,
    /// The page's `isvalid`.
    pub page_valid: bool,
    /// How each class was written since the last run (index = class bit).
    pub written: [Option<WritePath>; 5],
    /// Read-only registers written by hypercall since the last run (bit = index).
    pub stale_read_only: u8,
}

impl Model {
    /// The state right after [`SimHypervisor::new`]: all zero, valid page.
    pub fn new() -> Self {
        Model {
            page_valid: true,
            ..Model::default()
        }
    }

    fn write_path(&mut self, class: RegisterClass) -> Result<WritePath, Outcome> {
        let slot = &mut self.written[class.bit() as usize];
        let path = match *slot {
            Some(WritePath::Hypercall) => WritePath::Hypercall,
            _ if self.page_valid => WritePath::Page,
            Some(WritePath::Page) => return Err(Outcome::Refused(class)),
            None => WritePath::Hypercall,
        };
        *slot = Some(path);
        Ok(path)
    }

    fn write(&mut self, class: RegisterClass, set: impl Fn(&mut PageRegisters)) -> Outcome {
        match self.write_path(class) {
            Ok(WritePath::Page) => {
                set(&mut self.page);
                self.dirty.insert(class);
                Outcome::Done
            }
            Ok(WritePath::Hypercall) => {
                set(&mut self.vcpu);
                Outcome::Done
            }
            Err(refused) => refused,
        }
    }

    /// The register set a read of `class` is served from.
    fn source(&self, class: RegisterClass) -> &PageRegisters {
        let by_hypercall = self.written[class.bit() as usize] == Some(WritePath::Hypercall);
        if by_hypercall || !self.page_valid {
            &self.vcpu
        } else {
            &self.page
        }
    }

    /// Applies `op` and returns the outcome the implementation must produce.
    pub fn apply(&mut self, op: &Op) -> Outcome {
        match *op {
            Op::SetGpr(g, v) => self.write(RegisterClass::General, |r| r.set_gpr(g, v)),
            Op::SetRip(v) => self.write(RegisterClass::Ip, |r| r.rip = v),
            Op::SetRflags(v) => self.write(RegisterClass::Flags, |r| r.rflags = v),
            Op::SetXmm(x, v) => self.write(RegisterClass::Xmm, |r| r.xmm[x.index()] = v),
            Op::SetSegment(s, v) => {
                self.write(RegisterClass::Segment, |r| r.segments[s.index()] = v)
            }
            Op::SetReadOnly(r, v) => {
                self.vcpu.read_only[r.index()] = v;
                self.stale_read_only |= 1 << r.index();
                Outcome::Done
            }
            Op::HypercallSetGpr(g, v) => {
                let slot = &mut self.written[RegisterClass::General.bit() as usize];
                if *slot == Some(WritePath::Page) {
                    return Outcome::Refused(RegisterClass::General);
                }
                *slot = Some(WritePath::Hypercall);
                self.vcpu.set_gpr(g, v);
                Outcome::Done
            }
            Op::PokeGprWithoutDirty(g, v) => {
                self.page.set_gpr(g, v);
                Outcome::Done
            }
            Op::ReadGpr(g) => Outcome::Value(self.source(RegisterClass::General).gpr(g).into()),
            Op::ReadRip => Outcome::Value(self.source(RegisterClass::Ip).rip.into()),
            Op::ReadRflags => Outcome::Value(self.source(RegisterClass::Flags).rflags.into()),
            Op::ReadXmm(x) => Outcome::Value(self.source(RegisterClass::Xmm).xmm(x)),
            Op::ReadSegment(s) => Outcome::Segment(self.source(RegisterClass::Segment).segment(s)),
            Op::ReadReadOnly(r) => {
                let stale = self.stale_read_only & (1 << r.index()) != 0;
                let src = if stale || !self.page_valid {
                    &self.vcpu
                } else {
                    &self.page
                };
                Outcome::Value(src.read_only(r).into())
            }
            Op::GuestSetGpr(g, v) => {
                self.vcpu.set_gpr(g, v);
                Outcome::Done
            }
            Op::GuestSetReadOnly(r, v) => {
                self.vcpu.read_only[r.index()] = v;
                Outcome::Done
            }
            Op::SetPageValid(valid) => {
                self.page_valid = valid;
                Outcome::Done
            }
            Op::Run => {
                if self.page_valid {
                    for class in self.dirty.iter() {
                        let page = self.page;
                        self.vcpu.copy_class_from(&page, class);
                    }
                }
                self.dirty = DirtyClasses::empty();
                self.page = self.vcpu;
                self.written = [None; 5];
                self.stale_read_only = 0;
                Outcome::Done
            }
        }
    }
}

/// The implementation under test (facade over a simulated page) plus the model.
#[derive(Debug)]
pub struct Harness {
    hv: SimHypervisor,
    regs: VcpuRegisters<SimHypercalls>,
    model: Model,
    index: usize,
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

impl Harness {
    /// A fresh vCPU (all registers zero, valid page) and a matching model.
    pub fn new() -> Self {
        let (hv, page) = SimHypervisor::new();
        let regs = VcpuRegisters::new(Some(page), hv.hypercalls());
        Harness {
            hv,
            regs,
            model: Model::new(),
            index: 0,
        }
    }

    /// The simulated hypervisor.
    pub fn hypervisor(&self) -> &SimHypervisor {
        &self.hv
    }

    /// The facade under test.
    pub fn registers(&self) -> &VcpuRegisters<SimHypercalls> {
        &self.regs
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Applies every op in order, stopping at the first divergence.
    pub fn run(&mut self, ops: &[Op]) -> Result<(), Divergence> {
        ops.iter().try_for_each(|op| self.apply(op))
    }

    fn actual(&mut self, op: &Op) -> Result<Outcome, String> {
        let value = |r: Result<u64, Error>| r.map(|v| Outcome::Value(v.into()));
        let result: Result<Outcome, Error> = match *op {
            Op::SetGpr(g, v) => self.regs.set_gpr(g, v).map(|()| Outcome::Done),
            Op::SetRip(v) => self.regs.set_rip(v).map(|()| Outcome::Done),
            Op::SetRflags(v) => self.regs.set_rflags(v).map(|()| Outcome::Done),
            Op::SetXmm(x, v) => self.regs.set_xmm(x, v).map(|()| Outcome::Done),
            Op::SetSegment(s, v) => self.regs.set_segment(s, v).map(|()| Outcome::Done),
            Op::SetReadOnly(r, v) => self.regs.set_read_only(r, v).map(|()| Outcome::Done),
            Op::HypercallSetGpr(g, v) => {
                let a = [hv::hv_register_assoc {
                    name: g.hv_name(),
                    value: hv::hv_register_value { reg64: v },
                    ..Default::default()
                }];
                self.regs.set_hv_registers(&a).map(|()| Outcome::Done)
            }
            Op::PokeGprWithoutDirty(g, v) => match self.regs.page_mut() {
                Some(page) => {
                    page.poke_gpr_without_dirty(g, v);
                    Ok(Outcome::Done)
                }
                None => return Err("harness facade lost its page".into()),
            },
            Op::ReadGpr(g) => value(self.regs.gpr(g)),
            Op::ReadRip => value(self.regs.rip()),
            Op::ReadRflags => value(self.regs.rflags()),
            Op::ReadXmm(x) => self.regs.xmm(x).map(Outcome::Value),
            Op::ReadSegment(s) => self.regs.segment(s).map(Outcome::Segment),
            Op::ReadReadOnly(r) => value(self.regs.read_only(r)),
            Op::GuestSetGpr(g, v) => {
                self.hv.state_mut().set_gpr(g, v);
                Ok(Outcome::Done)
            }
            Op::GuestSetReadOnly(r, v) => {
                self.hv.state_mut().read_only[r.index()] = v;
                Ok(Outcome::Done)
            }
            Op::SetPageValid(valid) => {
                return self
                    .hv
                    .set_page_valid(&mut self.regs, valid)
                    .map(|()| Outcome::Done)
                    .map_err(|e| format!("set_page_valid: {e}"));
            }
            Op::Run => {
                return self
                    .hv
                    .run(&mut self.regs, |_| {})
                    .map(|_| Outcome::Done)
                    .map_err(|e| format!("run: {e}"));
            }
        };
        match result {
            Ok(outcome) => Ok(outcome),
            Err(Error::MixedWrite { class, .. }) => Ok(Outcome::Refused(class)),
            Err(e) => Err(format!("unexpected error: {e}")),
        }
    }

    /// Applies one op to the implementation and the model and compares them.
    pub fn apply(&mut self, op: &Op) -> Result<(), Divergence> {
        let index = self.index;
        self.index += 1;
        let fail = |detail: String| Divergence {
            index,
            op: *op,
            detail,
        };
        let expected = self.model.apply(op);
        let actual = self.actual(op).map_err(fail)?;
        if actual != expected {
            return Err(fail(format!(
                "outcome {actual:?}, model expects {expected:?}"
            )));
        }
        let state = self.hv.state();
        if state != self.model.vcpu {
            return Err(fail(format!(
                "vCPU state {state:?}, model expects {:?}",
                self.model.vcpu
            )));
        }
        let Some(page) = self.regs.page() else {
            return Err(fail("harness facade lost its page".into()));
        };
        let on_page = page.registers();
        if on_page != self.model.page {
            return Err(fail(format!(
                "page {on_page:?}, model expects {:?}",
                self.model.page
            )));
        }
        if page.dirty() != self.model.dirty {
            return Err(fail(format!(
                "dirty {:?}, model expects {:?}",
                page.dirty(),
                self.model.dirty
            )));
        }
        if page.is_valid() != self.model.page_valid {
            return Err(fail(format!(
                "isvalid {}, model expects {}",
                page.is_valid(),
                self.model.page_valid
            )));
        }
        for class in RegisterClass::ALL {
            let (ours, theirs) = (
                self.regs.written_by(class),
                self.model.written[class.bit() as usize],
            );
            if ours != theirs {
                return Err(fail(format!(
                    "{class} written by {ours:?}, model expects {theirs:?}"
                )));
            }
        }
        Ok(())
    }
}

/// A byte cursor for [`Op::decode`]; missing bytes read as zero.
struct Bytes<'a> {
    data: &'a [u8],
}

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    fn u128(&mut self) -> u128 {
        u128::from(self.u64()) | (u128::from(self.u64()) << 64)
    }

    fn gpr(&mut self) -> Gpr {
        let i = usize::from(self.u8()) % Gpr::ALL.len();
        Gpr::ALL.get(i).copied().unwrap_or(Gpr::Rax)
    }

    fn xmm(&mut self) -> Xmm {
        let i = usize::from(self.u8()) % Xmm::ALL.len();
        Xmm::ALL.get(i).copied().unwrap_or(Xmm::Xmm0)
    }

    fn segment(&mut self) -> Segment {
        let i = usize::from(self.u8()) % Segment::ALL.len();
        Segment::ALL.get(i).copied().unwrap_or(Segment::Es)
    }

    fn read_only(&mut self) -> ReadOnlyRegister {
        let i = usize::from(self.u8()) % ReadOnlyRegister::ALL.len();
        ReadOnlyRegister::ALL
            .get(i)
            .copied()
            .unwrap_or(ReadOnlyRegister::Cr0)
    }
}

impl Op {
    /// Number of distinct op kinds (the tag byte is taken modulo this).
    pub const KINDS: u8 = 18;

    /// Decodes a byte string into ops, for fuzzers: one tag byte (modulo [`Op::KINDS`])
    /// followed by the op's operands (register index bytes, little-endian values); missing
    /// trailing bytes read as zero. At most [`MAX_DECODED_OPS`] ops are produced. Every
    /// input decodes.
    pub fn decode(data: &[u8]) -> Vec<Op> {
        let mut b = Bytes { data };
        let mut ops = Vec::new();
        while !b.data.is_empty() && ops.len() < MAX_DECODED_OPS {
            let op = match b.u8() % Op::KINDS {
                0 => Op::SetGpr(b.gpr(), b.u64()),
                1 => Op::SetRip(b.u64()),
                2 => Op::SetRflags(b.u64()),
                3 => Op::SetXmm(b.xmm(), b.u128()),
                4 => Op::SetSegment(
                    b.segment(),
                    SegmentRegister {
                        base: b.u64(),
                        limit: b.u32(),
                        selector: b.u16(),
                        attributes: SegmentAttributes::from_bits(b.u16()),
                    },
                ),
                5 => Op::SetReadOnly(b.read_only(), b.u64()),
                6 => Op::HypercallSetGpr(b.gpr(), b.u64()),
                7 => Op::PokeGprWithoutDirty(b.gpr(), b.u64()),
                8 => Op::ReadGpr(b.gpr()),
                9 => Op::ReadRip,
                10 => Op::ReadRflags,
                11 => Op::ReadXmm(b.xmm()),
                12 => Op::ReadSegment(b.segment()),
                13 => Op::ReadReadOnly(b.read_only()),
                14 => Op::GuestSetGpr(b.gpr(), b.u64()),
                15 => Op::GuestSetReadOnly(b.read_only(), b.u64()),
                16 => Op::SetPageValid(b.u8() & 1 == 1),
                _ => Op::Run,
            };
            ops.push(op);
        }
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_without_dirty_bit_is_lost() {
        let mut h = Harness::new();
        h.run(&[Op::PokeGprWithoutDirty(Gpr::Rax, 0xdead), Op::Run])
            .unwrap();
        assert_eq!(h.hypervisor().state().gpr(Gpr::Rax), 0);
        // ...while the typed setter's write arrives.
        h.run(&[Op::SetGpr(Gpr::Rax, 0xbeef), Op::Run]).unwrap();
        assert_eq!(h.hypervisor().state().gpr(Gpr::Rax), 0xbeef);
    }

    #[test]
    fn mixing_is_refused_both_ways() {
        let mut h = Harness::new();
        h.run(&[Op::SetGpr(Gpr::Rax, 1)]).unwrap();
        assert_eq!(
            h.model.clone().apply(&Op::HypercallSetGpr(Gpr::Rbx, 2)),
            Outcome::Refused(RegisterClass::General)
        );
        h.run(&[
            Op::HypercallSetGpr(Gpr::Rbx, 2),
            Op::Run,
            Op::HypercallSetGpr(Gpr::Rbx, 2),
        ])
        .unwrap();
        // GENERAL went by hypercall: a facade write now sticks to the hypercall path.
        h.run(&[Op::SetGpr(Gpr::Rcx, 3), Op::ReadGpr(Gpr::Rcx)])
            .unwrap();
        assert_eq!(
            h.registers().written_by(RegisterClass::General),
            Some(WritePath::Hypercall)
        );
        // A page write, then the page goes invalid: a second write would need the hypercall.
        h.run(&[Op::Run, Op::SetRip(5), Op::SetPageValid(false)])
            .unwrap();
        assert_eq!(
            h.model.clone().apply(&Op::SetRip(6)),
            Outcome::Refused(RegisterClass::Ip)
        );
        h.run(&[Op::SetRip(6)]).unwrap();
    }

    #[test]
    fn decode_is_total_and_bounded() {
        assert!(Op::decode(&[]).is_empty());
        assert_eq!(Op::decode(&[17]), vec![Op::Run]);
        assert_eq!(Op::decode(&[0, 1, 2]), vec![Op::SetGpr(Gpr::Rcx, 2)]);
        let big = vec![9u8; MAX_DECODED_OPS * 2];
        assert_eq!(Op::decode(&big).len(), MAX_DECODED_OPS);
        for seed in 0..=255u8 {
            let data: Vec<u8> = (0..64u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let ops = Op::decode(&data);
            Harness::new().run(&ops).unwrap();
        }
    }
}
