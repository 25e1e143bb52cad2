#![no_main]
//! See [`vmm_ref_fuzz::qmp_parse`] for the input format and the invariants.

use libfuzzer_sys::fuzz_target;
use vmm_ref_fuzz::qmp::Input;
use vmm_ref_fuzz::qmp_parse::check;

fuzz_target!(|data: &[u8]| {
    check(&Input::decode(data));
});
