//! `regpage`: arbitrary operation sequences on the simulated register page
//! ([`mshv_regpage::sim::Harness`]), checked step by step against the crate's plain
//! model (dirty bits, lost non-dirty writes, read-only registers, mixing refusals).
//!
//! The byte language is the crate's own [`Op::decode`]; [`encode`] is its inverse,
//! used to turn the canonical scenarios into seeds.

use mshv_regpage::sim::{Harness, Op};
use mshv_regpage::{Gpr, ReadOnlyRegister, Segment, Xmm};

use crate::bytes::Writer;

fn index<T: PartialEq>(all: &[T], v: &T) -> u8 {
    all.iter()
        .position(|x| x == v)
        .and_then(|i| u8::try_from(i).ok())
        .unwrap_or(0)
}

/// Encodes ops in [`Op::decode`]'s language.
pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut w = Writer::new();
    let gpr = |g: &Gpr| index(&Gpr::ALL, g);
    let xmm = |x: &Xmm| index(&Xmm::ALL, x);
    let seg = |s: &Segment| index(&Segment::ALL, s);
    let ro = |r: &ReadOnlyRegister| index(&ReadOnlyRegister::ALL, r);
    for op in ops {
        match op {
            Op::SetGpr(g, v) => w.u8(0).u8(gpr(g)).u64(*v),
            Op::SetRip(v) => w.u8(1).u64(*v),
            Op::SetRflags(v) => w.u8(2).u64(*v),
            Op::SetXmm(x, v) => w.u8(3).u8(xmm(x)).u64(*v as u64).u64((*v >> 64) as u64),
            Op::SetSegment(s, r) => w
                .u8(4)
                .u8(seg(s))
                .u64(r.base)
                .u32(r.limit)
                .u16(r.selector)
                .u16(r.attributes.to_bits()),
            Op::SetReadOnly(r, v) => w.u8(5).u8(ro(r)).u64(*v),
            Op::HypercallSetGpr(g, v) => w.u8(6).u8(gpr(g)).u64(*v),
            Op::PokeGprWithoutDirty(g, v) => w.u8(7).u8(gpr(g)).u64(*v),
            Op::ReadGpr(g) => w.u8(8).u8(gpr(g)),
            Op::ReadRip => w.u8(9),
            Op::ReadRflags => w.u8(10),
            Op::ReadXmm(x) => w.u8(11).u8(xmm(x)),
            Op::ReadSegment(s) => w.u8(12).u8(seg(s)),
            Op::ReadReadOnly(r) => w.u8(13).u8(ro(r)),
            Op::GuestSetGpr(g, v) => w.u8(14).u8(gpr(g)).u64(*v),
            Op::GuestSetReadOnly(r, v) => w.u8(15).u8(ro(r)).u64(*v),
            Op::SetPageValid(b) => w.u8(16).u8(u8::from(*b)),
            Op::Run => w.u8(17),
        };
    }
    w.finish()
}

/// Runs an input; panics when the implementation and the model disagree.
pub fn check(data: &[u8]) {
    let ops = Op::decode(data);
    let mut h = Harness::new();
    if let Err(d) = h.run(&ops) {
        panic!("register page diverged from the model: {d:?}");
    }
}

/// Canonical scenarios: an exit handler's read-modify-write, the lost non-dirty write,
/// read-only registers, mixing page and hypercall writes, an invalidated page.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use mshv_regpage::{SegmentAttributes, SegmentRegister};
    let cs = SegmentRegister {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x33,
        attributes: SegmentAttributes::from_bits(0xa0fb),
    };
    let cases: Vec<(&str, Vec<Op>)> = vec![
        (
            "pio-exit",
            vec![
                Op::GuestSetGpr(Gpr::Rax, 0x1234),
                Op::Run,
                Op::ReadGpr(Gpr::Rax),
                Op::ReadRip,
                Op::ReadRflags,
                Op::SetGpr(Gpr::Rax, 0xab),
                Op::SetRip(0x1002),
                Op::Run,
                Op::ReadGpr(Gpr::Rax),
                Op::ReadRip,
            ],
        ),
        (
            "lost-write",
            vec![
                Op::PokeGprWithoutDirty(Gpr::Rcx, 5),
                Op::Run,
                Op::ReadGpr(Gpr::Rcx),
            ],
        ),
        (
            "read-only",
            vec![
                Op::GuestSetReadOnly(ReadOnlyRegister::Cr8, 3),
                Op::Run,
                Op::ReadReadOnly(ReadOnlyRegister::Cr8),
                Op::SetReadOnly(ReadOnlyRegister::Cr8, 7),
                Op::Run,
                Op::ReadReadOnly(ReadOnlyRegister::Cr8),
            ],
        ),
        (
            "mixing",
            vec![
                Op::SetGpr(Gpr::Rbx, 1),
                Op::HypercallSetGpr(Gpr::Rbx, 2),
                Op::Run,
                Op::HypercallSetGpr(Gpr::Rbx, 3),
                Op::SetGpr(Gpr::Rbx, 4),
                Op::Run,
                Op::ReadGpr(Gpr::Rbx),
            ],
        ),
        (
            "invalid-page",
            vec![
                Op::SetPageValid(false),
                Op::SetGpr(Gpr::R15, 9),
                Op::ReadGpr(Gpr::R15),
                Op::SetPageValid(true),
                Op::Run,
                Op::ReadGpr(Gpr::R15),
            ],
        ),
        (
            "segments-xmm",
            vec![
                Op::SetSegment(Segment::Cs, cs),
                Op::SetXmm(Xmm::Xmm5, u128::MAX - 1),
                Op::SetRflags(0x202),
                Op::Run,
                Op::ReadSegment(Segment::Cs),
                Op::ReadXmm(Xmm::Xmm5),
                Op::ReadRflags,
            ],
        ),
    ];
    cases
        .into_iter()
        .map(|(name, ops)| (name.to_string(), encode(&ops)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_round_trip_and_agree_with_the_model() {
        for (name, bytes) in seeds() {
            let ops = Op::decode(&bytes);
            assert_eq!(encode(&ops), bytes, "{name}");
            check(&bytes);
        }
    }
}
