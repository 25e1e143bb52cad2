//! The test guest against virtio-blk on KVM: `verify` with 1, 2 and 4 queues over
//! 1 and 2 IOThreads in several mappings (CLI and JSON forms), the host image
//! checked byte by byte afterwards; a read-only drive; malformed requests;
//! query-block following device activation and reset while the holders stay (QMP).
//!
//! Disk layout written by `verify` (guest/src/scenarios/mod.rs): queue `q`
//! writes its pattern over sectors `q*256 .. q*256+128`; sectors 4096..4160 are
//! written then DISCARDed, 4224..4288 written then WRITE_ZEROESed. The pattern
//! word at byte offset `a` is `a ^ (seed * 0x9e3779b97f4a7c15)`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const GUEST: &str = env!("VMM_REF_GUEST_ELF");
const DISK_SIZE: usize = 16 << 20;
const FILL: u8 = 0xa5;
const SEED: u64 = 0x5eed_1234;
const T: Duration = Duration::from_secs(300);

fn pattern_word(seed: u64, addr: u64) -> u64 {
    addr ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn make_disk(dir: &TempDir) -> String {
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![FILL; DISK_SIZE]).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Checks that the image holds exactly what `verify` wrote with `queues` queues.
fn check_image(disk: &str, queues: u64) {
    let img = std::fs::read(disk).unwrap();
    assert_eq!(img.len(), DISK_SIZE, "image size unchanged");
    let sector = |s: u64| (s * 512) as usize;
    let mut expected = vec![FILL; DISK_SIZE];
    for q in 0..queues {
        let start = sector(q * 256);
        let end = sector(q * 256 + 128);
        for (i, chunk) in expected[start..end].chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&pattern_word(SEED, (start + 8 * i) as u64).to_le_bytes());
        }
    }
    expected[sector(4096)..sector(4160)].fill(0);
    expected[sector(4224)..sector(4288)].fill(0);
    if let Some(pos) = img.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "image differs at byte {pos} (sector {}): got {:#04x}, expected {:#04x}",
            pos / 512,
            img[pos],
            expected[pos]
        );
    }
}

fn run_verify(tag: &str, objects: &[&str], drive_opts: &str, queues: u64) {
    run_verify_with(tag, &[], objects, drive_opts, queues);
}

/// Runs `verify` and checks the image; returns the run (`None`: no KVM).
fn run_verify_with(
    tag: &str,
    extra: &[&str],
    objects: &[&str],
    drive_opts: &str,
    queues: u64,
) -> Option<Output> {
    if !kvm_available(tag) {
        return None;
    }
    let dir = TempDir::new(tag);
    let disk = make_disk(&dir);
    let cmdline = format!("scenario=verify verify.seed={SEED}");
    let drive = format!("id=d0,file={disk},{drive_opts}");
    let mut args = vec!["--kernel", GUEST, "--cmdline", &cmdline, "--drive", &drive];
    args.extend_from_slice(extra);
    for o in objects {
        args.push("--object");
        args.push(o);
    }
    let out = run_vmm(&args, T);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!(
            "RESULT verify PASS dev=0xd0000000 queues={queues} "
        )),
        "{out:?}"
    );
    check_image(&disk, queues);
    Some(out)
}

/// The guest entered through its PVH note (32-bit protected mode,
/// `hvm_start_info` with the command line and memory map): what `--boot
/// auto`, the default, chooses for an ELF with the note.
#[test]
fn verify_through_the_pvh_entry() {
    for (tag, extra) in [("pvh", &["--boot", "pvh"][..]), ("auto", &[][..])] {
        let Some(out) = run_verify_with(
            tag,
            extra,
            &["iothread,id=io0", "iothread,id=io1"],
            "num-queues=2,iothread-vq-mapping=io0:io1",
            2,
        ) else {
            return;
        };
        assert!(out.stdout.contains("boot: protocol=pvh "), "{tag}: {out:?}");
    }
}

/// The same guest entered at its 64-bit entry (`--boot linux64`).
#[test]
fn verify_through_the_64_bit_entry() {
    let Some(out) = run_verify_with(
        "linux64",
        &["--boot", "linux64"],
        &["iothread,id=io0"],
        "iothread=io0",
        1,
    ) else {
        return;
    };
    assert!(out.stdout.contains("boot: protocol=linux64 "), "{out:?}");
}

#[test]
fn verify_1_queue_1_iothread() {
    run_verify("v1q1t", &["iothread,id=io0"], "iothread=io0", 1);
}

#[test]
fn verify_2_queues_1_iothread() {
    run_verify(
        "v2q1t",
        &["iothread,id=io0"],
        "num-queues=2,iothread=io0",
        2,
    );
}

#[test]
fn verify_2_queues_2_iothreads() {
    run_verify(
        "v2q2t",
        &["iothread,id=io0", "iothread,id=io1"],
        "num-queues=2,iothread-vq-mapping=io0:io1",
        2,
    );
}

#[test]
fn verify_4_queues_2_iothreads_round_robin_sync_engine() {
    run_verify(
        "v4q2t",
        &["iothread,id=io0,poll-max-ns=0", "iothread,id=io1"],
        "num-queues=4,queue-size=128,iothread-vq-mapping=io0:io1,aio=threads",
        4,
    );
}

#[test]
fn verify_4_queues_1_iothread_io_uring() {
    run_verify(
        "v4q1t",
        &["iothread,id=io0"],
        "num-queues=4,iothread=io0,aio=auto",
        4,
    );
}

#[test]
fn verify_2_queues_o_direct_io_uring() {
    run_verify(
        "vdirect",
        &["iothread,id=io0", "iothread,id=io1"],
        "num-queues=2,iothread-vq-mapping=io1:io0,direct=on,aio=io_uring",
        2,
    );
}

/// The JSON form of the mapping, with explicit queue lists, through --config.
#[test]
fn verify_4_queues_explicit_json_mapping() {
    if !kvm_available("verify_4_queues_explicit_json_mapping") {
        return;
    }
    let dir = TempDir::new("vjson");
    let disk = make_disk(&dir);
    let cfg = json!({
        "kernel": GUEST,
        "cmdline": format!("scenario=verify verify.seed={SEED}"),
        "memory": "128M",
        "objects": [
            {"qom-type": "iothread", "id": "io0", "poll-max-ns": 16384},
            {"qom-type": "iothread", "id": "io1"}
        ],
        "drives": [{
            "id": "d0", "file": disk, "num-queues": 4,
            "iothread-vq-mapping": [
                {"iothread": "io0", "vqs": [0, 1, 2]},
                {"iothread": "io1", "vqs": [3]}
            ]
        }]
    });
    let path = dir.join("vm.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let out = run_vmm(&["--config", path.to_str().unwrap()], T);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains("RESULT verify PASS dev=0xd0000000 queues=4 "),
        "{out:?}"
    );
    check_image(&disk, 4);
}

#[test]
fn readonly_drive_rejects_writes_and_stays_unchanged() {
    if !kvm_available("readonly_drive_rejects_writes_and_stays_unchanged") {
        return;
    }
    let dir = TempDir::new("ro");
    let disk = make_disk(&dir);
    let before = std::fs::metadata(&disk).unwrap().modified().unwrap();
    let drive = format!("id=d0,file={disk},num-queues=2,iothread=io0,readonly=on");
    let out = run_vmm(
        &[
            "--kernel",
            GUEST,
            "--cmdline",
            "scenario=verify",
            "--object",
            "iothread,id=io0",
            "--drive",
            &drive,
        ],
        T,
    );
    assert_eq!(out.status, Some(0), "{out:?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("RESULT verify"))
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!(line.starts_with("RESULT verify PASS"), "{line}");
    assert!(line.contains("ro_write=ioerr"), "{line}");
    let img = std::fs::read(&disk).unwrap();
    assert!(img.iter().all(|b| *b == FILL), "read-only image modified");
    assert_eq!(
        std::fs::metadata(&disk).unwrap().modified().unwrap(),
        before
    );
}

#[test]
fn malformed_requests_leave_the_vmm_running() {
    if !kvm_available("malformed_requests_leave_the_vmm_running") {
        return;
    }
    let dir = TempDir::new("malformed");
    let disk = make_disk(&dir);
    let drive = format!("id=d0,file={disk},num-queues=2,iothread-vq-mapping=io0:io1");
    let out = run_vmm(
        &[
            "--kernel",
            GUEST,
            "--cmdline",
            "scenario=malformed,verify",
            "--object",
            "iothread,id=io0",
            "--object",
            "iothread,id=io1",
            "--drive",
            &drive,
        ],
        T,
    );
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(out.stdout.contains("RESULT malformed PASS"), "{out:?}");
    assert!(out.stdout.contains("RESULT verify PASS"), "{out:?}");
    assert!(out.stdout.contains("DONE failures=0"), "{out:?}");
}

fn holders(qmp: &mut Qmp) -> Vec<(String, Vec<String>)> {
    let r = qmp.execute("query-iothreads", json!(null));
    r.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let h = t["holders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h["qom-path"].as_str().unwrap_or_default().to_owned())
                .collect();
            (t["id"].as_str().unwrap().to_owned(), h)
        })
        .collect()
}

/// Asserts that d0 holds both IOThreads, once each.
fn assert_held(qmp: &mut Qmp) {
    let h = holders(qmp);
    assert_eq!(h.len(), 2, "{h:?}");
    assert!(
        h.iter()
            .all(|(_, v)| v == &["/machine/peripheral/d0/virtio-backend"]),
        "{h:?}"
    );
}

fn wait_activated(qmp: &mut Qmp, want: bool, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        assert_held(qmp);
        let blk = qmp.execute("query-block", json!(null));
        if blk[0]["activated"] == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "activated never became {want}: {blk}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// query-block follows activation, device reset, re-activation and system_reset;
/// the holders stay all along (they follow attachment, not activation).
#[test]
fn query_block_follows_activation_and_reset_while_holders_stay() {
    if !kvm_available("query_block_follows_activation_and_reset_while_holders_stay") {
        return;
    }
    let dir = TempDir::new("holders");
    let disk = make_disk(&dir);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", sock.display());
    let drive = format!("id=d0,file={disk},num-queues=4,iothread-vq-mapping=io0:io1");
    let vmm = Running::spawn(&[
        "--kernel",
        GUEST,
        "--cmdline",
        "scenario=hold,reset,hold hold.secs=3 reset.pause_ms=3000",
        "--object",
        "iothread,id=io0",
        "--object",
        "iothread,id=io1",
        "--drive",
        &drive,
        "--qmp",
        &qmp_arg,
    ]);
    let mut qmp = Qmp::connect(&sock, T);
    // 1. Attached (held) from the start; activation during the first hold.
    assert_held(&mut qmp);
    wait_activated(&mut qmp, true, T);
    let blk = qmp.execute("query-block", json!(null));
    assert_eq!(blk[0]["device"], "d0");
    assert_eq!(blk[0]["activated"], true);
    assert_eq!(blk[0]["num-queues"], 4);
    assert_eq!(blk[0]["queues"][3]["iothread"], "io1");
    // 2. Device reset by the guest: not activated during the 3 s pause.
    vmm.expect_line("RESULT hold PASS", T);
    wait_activated(&mut qmp, false, Duration::from_millis(2500));
    // 3. Re-initialised: activated again during the second hold.
    vmm.expect_line("RESULT reset PASS", T);
    wait_activated(&mut qmp, true, Duration::from_secs(2));
    // 4. system_reset: the guest boots again and re-activates; still held.
    qmp.execute("system_reset", json!(null));
    assert_held(&mut qmp);
    wait_activated(&mut qmp, true, T);
    qmp.execute("quit", json!(null));
    assert_eq!(vmm.wait(T), Some(0));
}
