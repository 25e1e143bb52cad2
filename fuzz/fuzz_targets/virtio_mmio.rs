#![no_main]
//! See [`vmm_ref_fuzz::virtio_mmio`] for the input format and the invariants.

use libfuzzer_sys::fuzz_target;
use vmm_ref_fuzz::virtio_mmio::{check, Input};

fuzz_target!(|data: &[u8]| {
    check(&Input::decode(data));
});
