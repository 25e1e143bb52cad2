//! `system_reset` through QMP reloads the kernel and re-runs the guest from its
//! entry point; `stop` and `cont` stop and resume the guest; `quit` stops the
//! VMM with status 0.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Boots `code` with `--cmdline first`, `vcpus` vCPUs and a QMP socket;
/// returns the directory (keep it alive), the VMM and the socket path.
fn boot_with_qmp(tag: &str, code: &[u8], vcpus: &str) -> (TempDir, Running, PathBuf) {
    let dir = TempDir::new(tag);
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, tiny_elf(code)).unwrap();
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", sock.display());
    let vmm = Running::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "first",
        "--vcpus",
        vcpus,
        "--qmp",
        &qmp_arg,
    ]);
    (dir, vmm, sock)
}

#[test]
fn system_reset_reruns_the_guest_and_quit_exits() {
    if !kvm_available("system_reset_reruns_the_guest_and_quit_exits") {
        return;
    }
    let (_dir, vmm, sock) = boot_with_qmp("qmpreset", &echo_cmdline_then_halt_code(), "1");
    let t = Duration::from_secs(120);
    let line = vmm.expect_line("OK:", t);
    assert!(line.starts_with("OK:first tsc_khz="), "{line}");
    let mut qmp = Qmp::connect(&sock, t);
    assert_eq!(
        qmp.execute("query-status", json!(null)),
        json!({"status": "running", "running": true})
    );
    let mut events = Vec::new();
    for round in 0..2 {
        qmp.execute_collect("system_reset", json!(null), &mut events);
        let line = vmm.expect_line("OK:", t);
        assert!(line.starts_with("OK:first"), "round {round}: {line}");
    }
    let ev = loop {
        if let Some(e) = events.iter().find(|e| e["event"] == "RESET") {
            break e.clone();
        }
        events.push(qmp.read());
    };
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    assert_eq!(qmp.execute("query-block", json!(null)), json!([]));
    qmp.execute("quit", json!(null));
    assert_eq!(vmm.wait(t), Some(0));
    assert!(!sock.exists(), "socket removed on exit");
}

/// `system_reset`s sent back to back (each as soon as the previous one
/// answered, so a vCPU may not have run between one reset's resume and the
/// next reset's pause) all succeed promptly, and the guest runs after them.
fn back_to_back_system_resets(vcpus: &str) {
    let (_dir, vmm, sock) = boot_with_qmp("qmpresets", &echo_cmdline_then_halt_code(), vcpus);
    let t = Duration::from_secs(120);
    vmm.expect_line("OK:first", t);
    let mut qmp = Qmp::connect(&sock, t);
    for round in 0..20 {
        let start = std::time::Instant::now();
        let r = qmp.execute_result("system_reset", json!(null));
        let took = start.elapsed();
        assert_eq!(r, Ok(json!({})), "reset {round} after {took:?}");
        assert!(took < Duration::from_secs(5), "reset {round} took {took:?}");
    }
    // The guest runs again: once the earlier boots' output is through, one more
    // reset prints a fresh line.
    std::thread::sleep(Duration::from_millis(300));
    while vmm.lines.try_recv().is_ok() {}
    qmp.execute("system_reset", json!(null));
    vmm.expect_line("OK:first", t);
    assert_eq!(
        qmp.execute("query-status", json!(null)),
        json!({"status": "running", "running": true})
    );
    qmp.execute("quit", json!(null));
    assert_eq!(vmm.wait(t), Some(0));
}

#[test]
fn back_to_back_system_resets_one_vcpu() {
    if kvm_available("back_to_back_system_resets_one_vcpu") {
        back_to_back_system_resets("1");
    }
}

#[test]
fn back_to_back_system_resets_two_vcpus() {
    if kvm_available("back_to_back_system_resets_two_vcpus") {
        back_to_back_system_resets("2");
    }
}

/// `stop` takes the guest off its vCPUs until `cont` (a guest printing a line
/// every few milliseconds prints nothing in between), a `system_reset` while
/// stopped stays stopped and is applied by `cont`, and a stopped VM quits.
#[test]
fn stop_and_cont_pause_and_resume_the_guest() {
    if !kvm_available("stop_and_cont_pause_and_resume_the_guest") {
        return;
    }
    let (_dir, vmm, sock) = boot_with_qmp("qmpstop", &echo_cmdline_then_tick_code(), "2");
    let t = Duration::from_secs(120);
    vmm.expect_line("OK:first", t);
    vmm.expect_line("T", t);
    let mut qmp = Qmp::connect(&sock, t);
    let quiet = |what: &str| {
        // Lines already on their way (written before the stop) drain first.
        std::thread::sleep(Duration::from_millis(300));
        while vmm.lines.try_recv().is_ok() {}
        match vmm.lines.recv_timeout(Duration::from_secs(1)) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            other => panic!("{what}: the guest ran: {other:?}"),
        }
    };
    let paused = json!({"status": "paused", "running": false});
    let running = json!({"status": "running", "running": true});

    assert_eq!(qmp.execute("stop", json!(null)), json!({}));
    assert!(qmp.wait_event("STOP").get("data").is_none());
    assert_eq!(qmp.execute("query-status", json!(null)), paused);
    quiet("stopped");
    assert_eq!(qmp.execute("stop", json!(null)), json!({}), "stop again");
    assert_eq!(qmp.execute("cont", json!(null)), json!({}));
    qmp.wait_event("RESUME");
    assert_eq!(qmp.execute("query-status", json!(null)), running);
    vmm.expect_line("T", t);

    // A reset while stopped: still stopped, and the guest starts over at cont.
    qmp.execute("stop", json!(null));
    qmp.wait_event("STOP");
    assert_eq!(qmp.execute("system_reset", json!(null)), json!({}));
    qmp.wait_event("RESET");
    assert_eq!(qmp.execute("query-status", json!(null)), paused);
    quiet("reset while stopped");
    qmp.execute("cont", json!(null));
    vmm.expect_line("OK:first", t);
    vmm.expect_line("T", t);
    assert_eq!(qmp.execute("cont", json!(null)), json!({}), "cont again");

    // A stopped VM quits.
    qmp.execute("stop", json!(null));
    qmp.execute("quit", json!(null));
    assert_eq!(vmm.wait(t), Some(0));
}
