#![no_main]
//! See [`vmm_ref_fuzz::regpage`] for the input format and the invariants.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vmm_ref_fuzz::regpage::check(data));
