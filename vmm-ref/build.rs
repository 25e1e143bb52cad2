//! Build script of vmm-ref: compiles the freestanding test guest.
//!
//! The guest (`guest/`, a `#![no_std]` `#![no_main]` crate that is not a
//! workspace member) is compiled with one direct `rustc` invocation for
//! `x86_64-unknown-linux-gnu` - the only target installed, so no `build-std`
//! and no `x86_64-unknown-none` - made freestanding by its linker script and
//! `-nostartfiles -nostdlib -static`. The resulting ELF lands in
//! `$OUT_DIR/test-guest.elf`; its absolute path is exported to the crate as
//! `VMM_REF_GUEST_ELF` (`include_bytes!(env!("VMM_REF_GUEST_ELF"))`).
//!
//! The build is deterministic: fixed flags, no debug info, no build ID, and
//! source paths remapped to `guest/`.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Name of the guest image in `OUT_DIR`.
const GUEST_ELF: &str = "test-guest.elf";

/// `rustc` flags of the guest build (besides input, output and linker script).
const GUEST_FLAGS: &[&str] = &[
    "--edition=2021",
    "--crate-type=bin",
    "--crate-name=test_guest",
    "--target=x86_64-unknown-linux-gnu",
    "-Cpanic=abort",
    "-Copt-level=2",
    "-Ccodegen-units=1",
    // Linked at 1 MiB, identity mapped: absolute addressing, small code model.
    "-Crelocation-model=static",
    "-Ccode-model=small",
    "-Crelro-level=off",
    "-Cforce-unwind-tables=no",
    "-Cdebuginfo=0",
    "-Cstrip=debuginfo",
    "-Clink-arg=-nostartfiles",
    "-Clink-arg=-nostdlib",
    "-Clink-arg=-static",
    "-Clink-arg=-no-pie",
    "-Clink-arg=-Wl,--build-id=none",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guest_dir = manifest_dir.join("guest");
    let elf = out_dir.join(GUEST_ELF);

    // A directory makes cargo watch every file below it.
    println!("cargo:rerun-if-changed={}", guest_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        guest_dir.join("link.ld").display()
    );
    println!("cargo:rerun-if-env-changed=RUSTC");

    build_guest(&guest_dir, &elf);
    println!("cargo:rustc-env=VMM_REF_GUEST_ELF={}", elf.display());
}

/// Compiles the guest in `guest_dir` into `elf`; a failure fails the build
/// with rustc's diagnostics.
fn build_guest(guest_dir: &Path, elf: &Path) {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let mut link_script = OsString::from("-Clink-arg=-T");
    link_script.push(guest_dir.join("link.ld"));
    let mut remap = OsString::from("--remap-path-prefix=");
    remap.push(guest_dir);
    remap.push("=guest");

    let output = Command::new(&rustc)
        .args(GUEST_FLAGS)
        .arg(link_script)
        .arg(remap)
        .arg("-o")
        .arg(elf)
        .arg(guest_dir.join("src").join("main.rs"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", rustc.to_string_lossy()));
    let diagnostics = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        panic!(
            "building the test guest failed ({}):\n{diagnostics}",
            output.status
        );
    }
    // Surface guest warnings: cargo hides a successful build script's stderr.
    for line in diagnostics.lines().filter(|l| l.starts_with("warning")) {
        println!("cargo:warning=test guest: {line}");
    }
}
