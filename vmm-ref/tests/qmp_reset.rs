//! `system_reset` through QMP reloads the kernel and re-runs the guest from its
//! entry point; `stop` and `cont` stop and resume the guest; `quit` stops the
//! VMM with status 0.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[test]
fn system_reset_reruns_the_guest_and_quit_exits() {
    if !kvm_available("system_reset_reruns_the_guest_and_quit_exits") {
        return;
    }
    let dir = TempDir::new("qmpreset");
    let kernel = dir.join("halt.elf");
    std::fs::write(&kernel, tiny_elf(&echo_cmdline_then_halt_code())).unwrap();
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", sock.display());
    let vmm = Running::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "first",
        "--qmp",
        &qmp_arg,
    ]);
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
    let dir = TempDir::new("qmpresets");
    let kernel = dir.join("halt.elf");
    std::fs::write(&kernel, tiny_elf(&echo_cmdline_then_halt_code())).unwrap();
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

/// Reads QMP messages until event `name` arrives (replies are skipped).
fn wait_event(qmp: &mut Qmp, name: &str) -> serde_json::Value {
    loop {
        let msg = qmp.read();
        if msg["event"] == name {
            return msg;
        }
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
    let dir = TempDir::new("qmpstop");
    let kernel = dir.join("tick.elf");
    std::fs::write(&kernel, tiny_elf(&echo_cmdline_then_tick_code())).unwrap();
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", sock.display());
    let vmm = Running::spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "first",
        "--vcpus",
        "2",
        "--qmp",
        &qmp_arg,
    ]);
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
    assert!(wait_event(&mut qmp, "STOP").get("data").is_none());
    assert_eq!(qmp.execute("query-status", json!(null)), paused);
    quiet("stopped");
    assert_eq!(qmp.execute("stop", json!(null)), json!({}), "stop again");
    assert_eq!(qmp.execute("cont", json!(null)), json!({}));
    wait_event(&mut qmp, "RESUME");
    assert_eq!(qmp.execute("query-status", json!(null)), running);
    vmm.expect_line("T", t);

    // A reset while stopped: still stopped, and the guest starts over at cont.
    qmp.execute("stop", json!(null));
    wait_event(&mut qmp, "STOP");
    assert_eq!(qmp.execute("system_reset", json!(null)), json!({}));
    wait_event(&mut qmp, "RESET");
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
