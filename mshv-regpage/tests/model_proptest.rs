// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Arbitrary op sequences against the plain model (dirty bits, lost non-dirty writes,
//! read-only registers, mixing guard, page validity). The future `regpage` fuzz target
//! drives the same `Harness` with `Op::decode`.
#![cfg(target_arch = "x86_64")]

use mshv_regpage::sim::{Harness, Op};
use mshv_regpage::{Gpr, ReadOnlyRegister, Segment, SegmentAttributes, SegmentRegister, Xmm};
use proptest::prelude::*;

fn gpr() -> impl Strategy<Value = Gpr> {
    (0usize..16).prop_map(|i| Gpr::ALL[i])
}

fn xmm() -> impl Strategy<Value = Xmm> {
    (0usize..6).prop_map(|i| Xmm::ALL[i])
}

fn seg() -> impl Strategy<Value = Segment> {
    (0usize..6).prop_map(|i| Segment::ALL[i])
}

fn ro() -> impl Strategy<Value = ReadOnlyRegister> {
    (0usize..8).prop_map(|i| ReadOnlyRegister::ALL[i])
}

/// Small values collide often (so reads distinguish stale from fresh data less by luck).
fn value() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..4, any::<u64>()]
}

fn segment_value() -> impl Strategy<Value = SegmentRegister> {
    (any::<u64>(), any::<u32>(), any::<u16>(), any::<u16>()).prop_map(
        |(base, limit, selector, a)| SegmentRegister {
            base,
            limit,
            selector,
            attributes: SegmentAttributes::from_bits(a),
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (gpr(), value()).prop_map(|(g, v)| Op::SetGpr(g, v)),
        1 => value().prop_map(Op::SetRip),
        1 => value().prop_map(Op::SetRflags),
        1 => (xmm(), any::<u128>()).prop_map(|(x, v)| Op::SetXmm(x, v)),
        1 => (seg(), segment_value()).prop_map(|(s, v)| Op::SetSegment(s, v)),
        1 => (ro(), value()).prop_map(|(r, v)| Op::SetReadOnly(r, v)),
        2 => (gpr(), value()).prop_map(|(g, v)| Op::HypercallSetGpr(g, v)),
        2 => (gpr(), value()).prop_map(|(g, v)| Op::PokeGprWithoutDirty(g, v)),
        3 => gpr().prop_map(Op::ReadGpr),
        1 => Just(Op::ReadRip),
        1 => Just(Op::ReadRflags),
        1 => xmm().prop_map(Op::ReadXmm),
        1 => seg().prop_map(Op::ReadSegment),
        2 => ro().prop_map(Op::ReadReadOnly),
        1 => (gpr(), value()).prop_map(|(g, v)| Op::GuestSetGpr(g, v)),
        1 => (ro(), value()).prop_map(|(r, v)| Op::GuestSetReadOnly(r, v)),
        1 => any::<bool>().prop_map(Op::SetPageValid),
        3 => Just(Op::Run),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn implementation_matches_model(ops in prop::collection::vec(op(), 0..64)) {
        let mut h = Harness::new();
        if let Err(d) = h.run(&ops) {
            return Err(TestCaseError::fail(d.to_string()));
        }
    }

    #[test]
    fn decoded_bytes_match_model(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let ops = Op::decode(&data);
        let mut h = Harness::new();
        if let Err(d) = h.run(&ops) {
            return Err(TestCaseError::fail(d.to_string()));
        }
    }
}

/// The model must be able to fail: a buggy "implementation" (a page write without the
/// dirty bit that we *pretend* arrived) is caught.
#[test]
fn model_detects_a_lost_write() {
    let mut h = Harness::new();
    h.run(&[Op::PokeGprWithoutDirty(Gpr::Rax, 1), Op::Run])
        .unwrap();
    // The write was lost: reading RAX gives 0, and the model agrees...
    h.run(&[Op::ReadGpr(Gpr::Rax)]).unwrap();
    // ...whereas a model that (wrongly) believes the poke arrived disagrees with reality.
    let mut wrong = h.model().clone();
    wrong.vcpu.set_gpr(Gpr::Rax, 1);
    assert_ne!(&wrong, h.model());
    assert_eq!(h.hypervisor().state().gpr(Gpr::Rax), 0);
}
