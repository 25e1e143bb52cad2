//! QMP driven by QEMU's own clients (PyPI `qemu.qmp`: `QMPClient` and `qmp-shell`)
//! against the real VMM running the test guest; see `tests/qmp-python/README.md`.

mod common;

use std::process::Command;

use common::*;

const GUEST: &str = env!("VMM_REF_GUEST_ELF");
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/qmp-python/run_real_vmm.sh"
);

fn qemu_qmp_installed() -> bool {
    let python = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status();
    let shell = Command::new("sh")
        .args(["-c", "command -v qmp-shell"])
        .status();
    matches!((python, shell), (Ok(p), Ok(s)) if p.success() && s.success())
}

#[test]
fn qemu_qmp_client_and_qmp_shell_drive_vmm_ref() {
    if !kvm_available("qemu_qmp_client_and_qmp_shell_drive_vmm_ref") {
        return;
    }
    if !qemu_qmp_installed() {
        // The test command (ci/test.sh) installs them; there they must be present.
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with qemu.qmp and qmp-shell are required in CI (ci/setup.sh)"
        );
        println!("SKIPPED: python3 qemu.qmp / qmp-shell not installed (ci/setup.sh installs them)");
        return;
    }
    let out = Command::new("timeout")
        .args(["600", "sh", SCRIPT, VMM_REF, GUEST])
        .output()
        .expect("run run_real_vmm.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "QMP Python tests failed: {:?}",
        out.status
    );
    assert!(stdout.contains("run_real_vmm: all passed"));
    assert!(stdout.contains("all checks passed"));
}
