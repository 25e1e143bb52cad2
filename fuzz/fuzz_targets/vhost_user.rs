#![no_main]
//! See [`vmm_ref_fuzz::vhost_user`] for the input format and the invariants.

use libfuzzer_sys::fuzz_target;
use vmm_ref_fuzz::vhost_user::{check, Input};

fuzz_target!(|data: &[u8]| {
    check(&Input::decode(data));
});
