//! A vhost-user front-end that shrinks its guest-memory memfd under a
//! running `vmm-ref export` (no KVM needed). The daemon's next access to a
//! lost page raises SIGBUS; the SIGBUS guard turns that into a failed
//! request and a stopped ring (the front-end's vring error eventfd fires)
//! instead of the death of the daemon and of every export it serves. Both
//! directions are covered: the device reading a request header from a lost
//! page, and the device writing data and the status byte into lost pages.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::vhost_user::{Placement, VuBlk, T_IN, T_OUT};
use common::{Qmp, Running, TempDir};
use serde_json::Value;

/// Generous: the machine is shared and noisy.
const T: Duration = Duration::from_secs(120);
/// Guest memory of each front-end; the shrink keeps the first half.
const MEM: u64 = 2 << 20;
const KEPT: u64 = MEM / 2;

fn pattern(tag: u8) -> Vec<u8> {
    (0..4096u32).map(|i| (i % 251) as u8 ^ tag).collect()
}

/// A write and a read-back through queue 0 of `vu` succeed.
fn serves(vu: &mut VuBlk, sector: u64, tag: u8) {
    let data = pattern(tag);
    assert_eq!(vu.write(0, sector, &data), Ok(0), "write");
    let (status, back) = vu.read(0, sector, 4096).expect("read");
    assert_eq!(status, 0, "read status");
    assert_eq!(back, data, "read-back");
}

/// Waits for the vring error eventfd of queue 0.
fn wait_ring_error(vu: &VuBlk, daemon: &mut Running, what: &str) {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!("{what}: the export daemon died ({status}) instead of stopping the ring");
        }
        if vu.ring_error(0) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: no vring error");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn shrink(vu: &VuBlk) {
    vu.memfd().set_len(KEPT).expect("shrink the memfd");
}

/// Asserts the daemon is alive and its QMP monitor answers.
fn alive(daemon: &mut Running, qmp_sock: &Path, what: &str) {
    assert!(
        matches!(daemon.child.try_wait(), Ok(None)),
        "{what}: the export daemon died"
    );
    let mut q = Qmp::connect(qmp_sock, T);
    let exports = q.execute("query-block-exports", Value::Null);
    assert_eq!(exports.as_array().map(Vec::len), Some(2), "{exports}");
}

#[test]
fn a_front_end_shrinking_guest_memory_stops_its_ring_not_the_daemon() {
    let dir = TempDir::new("export-sigbus");
    let (img0, img1) = (dir.join("d0.img"), dir.join("d1.img"));
    for img in [&img0, &img1] {
        std::fs::write(img, vec![0u8; 1 << 20]).unwrap();
    }
    let (s0, s1, qmp) = (
        dir.join("e0.sock"),
        dir.join("e1.sock"),
        dir.join("qmp.sock"),
    );
    let args = [
        "export".to_owned(),
        "--drive".to_owned(),
        format!("id=d0,file={},aio=threads", img0.display()),
        "--drive".to_owned(),
        format!("id=d1,file={}", img1.display()),
        // Both exports on one IOThread: it must survive too.
        "--object".to_owned(),
        "iothread,id=io0".to_owned(),
        "--export".to_owned(),
        format!(
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:{},iothread=io0",
            s0.display()
        ),
        "--export".to_owned(),
        format!(
            "vhost-user-blk,id=e1,node-name=d1,addr=unix:{},iothread=io0",
            s1.display()
        ),
        "--qmp".to_owned(),
        format!("unix:{}", qmp.display()),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = dir.join("stderr");
    let mut daemon = Running::spawn_with_stderr_to(&args, &log);
    daemon.expect_line("vmm-ref export: ready", T);
    let mut other = VuBlk::connect(&s1, 1, MEM, T).expect("front-end of e1");
    serves(&mut other, 8, 1);

    // 1. The device reads a request header from a lost page.
    let mut vu = VuBlk::connect(&s0, 1, MEM, T).expect("front-end of e0");
    serves(&mut vu, 0, 2);
    let done = vu.completed(0);
    let lost = Placement {
        header: KEPT + 0x1_0000,
        data: KEPT + 0x1_1000,
        status: KEPT + 0x1_0200,
    };
    vu.prepare(0, T_OUT, 16, &pattern(3), 0, lost).unwrap();
    shrink(&vu);
    vu.publish(0).unwrap();
    wait_ring_error(&vu, &mut daemon, "header in a lost page");
    // The log names the export (not "drive 'e0'") and its queue.
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains("export 'e0' queue 0: guest memory: pages lost"),
        "{stderr}"
    );
    assert_eq!(vu.completed(0), done, "the failed request is not completed");
    alive(&mut daemon, &qmp, "header in a lost page");
    serves(&mut other, 16, 4);
    drop(vu);

    // 2. The device writes read data and the status into lost pages.
    let mut vu = VuBlk::connect(&s0, 1, MEM, T).expect("second front-end of e0");
    serves(&mut vu, 0, 5);
    let done = vu.completed(0);
    let lost = Placement {
        header: 0x8_0000,
        data: KEPT + 0x2_0000,
        status: KEPT + 0x2_0200,
    };
    vu.prepare(0, T_IN, 0, &[], 4096, lost).unwrap();
    shrink(&vu);
    vu.publish(0).unwrap();
    wait_ring_error(&vu, &mut daemon, "data and status in lost pages");
    assert_eq!(vu.completed(0), done, "the failed request is not completed");
    alive(&mut daemon, &qmp, "data and status in lost pages");
    serves(&mut other, 24, 6);
    drop(vu);

    // 3. A new front-end with intact memory is served by the same export.
    let mut vu = VuBlk::connect(&s0, 1, MEM, T).expect("third front-end of e0");
    serves(&mut vu, 32, 7);
    drop(vu);
    drop(other);
    let pid = daemon.child.id() as libc::pid_t;
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(daemon.wait(T), Some(0), "clean stop after the faults");
}
