//! The test guest's benchmark modes against vmm-ref: `bench-all` (every drive
//! at once) and the `alt` driver profile (`bench.profile=alt`), checked
//! against the device side's own counters (`query-block`), not only against
//! what the guest says about itself.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const GUEST: &str = env!("VMM_REF_GUEST_ELF");
const T: Duration = Duration::from_secs(300);

/// `key=value` fields of a guest report line.
fn fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

fn num(f: &HashMap<&str, &str>, key: &str) -> u64 {
    f.get(key)
        .unwrap_or_else(|| panic!("no {key}= in {f:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key}= in {f:?}: {e}"))
}

/// Per drive from `query-block`: (requests, notifications, interrupts) summed
/// over its queues.
fn queue_totals(blk: &Value) -> Vec<(u64, u64, u64)> {
    blk.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b["queues"]
                .as_array()
                .unwrap()
                .iter()
                .fold((0, 0, 0), |t, q| {
                    (
                        t.0 + q["requests"].as_u64().unwrap(),
                        t.1 + q["notifications"].as_u64().unwrap(),
                        t.2 + q["interrupts"].as_u64().unwrap(),
                    )
                })
        })
        .collect()
}

/// What one bench-all run reported, and the device side's counters right
/// after it.
struct Run {
    probe: Vec<String>,
    all: String,
    devs: Vec<String>,
    result: String,
    host: Vec<(u64, u64, u64)>,
}

/// Boots the guest with `drives` (queues per drive) over two IOThreads and
/// `cmdline` (which must run `bench-all` first, then `hold` long enough for
/// the query), collects the report and `query-block`, then quits over QMP.
fn bench_all(tag: &str, drives: &[u32], cmdline: &str) -> Run {
    let dir = TempDir::new(tag);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", sock.display());
    let mut args: Vec<String> = [
        "--kernel",
        GUEST,
        "--cmdline",
        cmdline,
        "--object",
        "iothread,id=io0",
        "--object",
        "iothread,id=io1",
        "--qmp",
        &qmp_arg,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (i, queues) in drives.iter().enumerate() {
        let disk = dir.join(&format!("d{i}.img"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        args.push("--drive".into());
        args.push(format!(
            "id=d{i},file={},num-queues={queues},iothread=io{}",
            disk.display(),
            i % 2
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vmm = Running::spawn(&args);
    let mut qmp = Qmp::connect(&sock, T);
    let mut probe = Vec::new();
    let all = loop {
        let line = vmm
            .lines
            .recv_timeout(T)
            .expect("guest output until BENCHALL");
        if line.starts_with("blk ") {
            probe.push(line);
        } else if line.starts_with("BENCHALL ") {
            break line;
        } else {
            assert!(!line.starts_with("RESULT "), "{line}");
        }
    };
    let mut devs = Vec::new();
    let result = loop {
        let line = vmm
            .lines
            .recv_timeout(T)
            .expect("guest output until RESULT");
        if line.starts_with("BENCHDEV ") {
            devs.push(line);
        } else if line.starts_with("RESULT bench-all ") {
            break line;
        }
    };
    assert_eq!(devs.len(), drives.len(), "{devs:?}");
    // The guest is in `hold` now: nothing else is in flight.
    let host = queue_totals(&qmp.execute("query-block", json!(null)));
    qmp.execute("quit", json!(null));
    assert_eq!(vmm.wait(T), Some(0));
    Run {
        probe,
        all,
        devs,
        result,
        host,
    }
}

/// Every drive is driven in the one run, and the guest's per-drive counts
/// are exactly what each device served.
#[test]
fn bench_all_drives_every_device_in_one_run() {
    if !kvm_available("bench_all_drives_every_device_in_one_run") {
        return;
    }
    let drives = [1, 2, 1];
    let r = bench_all(
        "bench-all",
        &drives,
        "scenario=bench-all,hold hold.secs=60 bench.ios=6000 bench.qd=4 bench.rw=randrw bench.rwmixread=70",
    );
    assert!(
        r.result.starts_with("RESULT bench-all PASS"),
        "{}",
        r.result
    );
    let all = fields(&r.all);
    assert_eq!(num(&all, "devices"), 3, "{}", r.all);
    assert_eq!(num(&all, "queues"), 4, "{}", r.all);
    assert_eq!(all["rw"], "randrw");
    assert_eq!(all["profile"], "ours");
    let ios = num(&all, "ios");
    // bench.ios bounds submissions; all submitted requests complete.
    assert_eq!(ios, 6000, "{}", r.all);
    assert_eq!(num(&all, "reads") + num(&all, "writes"), ios);
    // A 70/30 mix over 6000 I/Os: both kinds, reads the majority.
    assert!(num(&all, "writes") > 0 && num(&all, "reads") > num(&all, "writes"));
    let mut sum = 0;
    for (i, (line, queues)) in r.devs.iter().zip(drives).enumerate() {
        let d = fields(line);
        assert_eq!(
            d["dev"],
            format!("{:#x}", 0xd000_0000u64 + 0x1000 * i as u64)
        );
        assert_eq!(num(&d, "queues"), u64::from(queues), "{line}");
        assert_eq!(num(&d, "errors"), 0, "{line}");
        let dev_ios = num(&d, "ios");
        assert!(dev_ios > 0, "{line}");
        let (requests, notifications, interrupts) = r.host[i];
        assert_eq!(
            dev_ios, requests,
            "guest vs device count, drive {i}: {line}"
        );
        // Several kicks may be taken in one wake-up, never the reverse.
        assert!(
            notifications <= num(&d, "kicks"),
            "{line} vs {:?}",
            r.host[i]
        );
        // Our driver keeps used_event one behind its own position, rewritten
        // at every completion: a device that checks once per batch of
        // completions can find it crossed, so some interrupts are expected
        // (unlike the alt profile's, see below); never more than completions.
        assert!(interrupts <= requests, "drive {i}: {:?}", r.host[i]);
        sum += dev_ios;
    }
    assert_eq!(sum, ios);
}

/// The independent-driver profile: 128-entry rings, and `used_event` kept
/// far ahead through several wraps of the 16-bit used index (150 000 I/Os
/// per queue): the device never finds a reason to interrupt.
#[test]
fn alt_profile_runs_128_entry_rings_without_interrupts() {
    if !kvm_available("alt_profile_runs_128_entry_rings_without_interrupts") {
        return;
    }
    let r = bench_all(
        "bench-alt",
        &[2],
        "scenario=bench-all,hold hold.secs=60 bench.ios=300000 bench.profile=alt",
    );
    assert!(
        r.result.starts_with("RESULT bench-all PASS"),
        "{}",
        r.result
    );
    assert_eq!(r.probe.len(), 1);
    assert!(
        r.probe[0].contains(" queues=2 queue_size=128 "),
        "{}",
        r.probe[0]
    );
    let all = fields(&r.all);
    assert_eq!(all["profile"], "alt");
    // Fixed chains of 3 descriptors in a 128-entry ring: 42 slots, so the
    // default depth of 32 fits.
    assert_eq!(num(&all, "qd"), 32, "{}", r.all);
    assert_eq!(num(&all, "ios"), 300_000);
    let (requests, notifications, interrupts) = r.host[0];
    assert_eq!(requests, 300_000);
    assert!(
        notifications <= num(&all, "kicks"),
        "{:?} vs {}",
        r.host[0],
        r.all
    );
    assert_eq!(interrupts, 0, "used_event was crossed");
}

/// The alt profile moves real data correctly (fixed chains of 3 descriptors,
/// FLUSH as a 2-descriptor chain in a 3-descriptor slot): `verify` passes
/// under it after a bench.
#[test]
fn alt_profile_passes_verify() {
    if !kvm_available("alt_profile_passes_verify") {
        return;
    }
    let dir = TempDir::new("alt-verify");
    let disk = dir.join("d.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let drive = format!("id=d0,file={},num-queues=4,iothread=io0", disk.display());
    let out = run_vmm(
        &[
            "--kernel",
            GUEST,
            "--cmdline",
            "scenario=bench,verify bench.ios=20000 bench.rw=randwrite bench.profile=alt",
            "--object",
            "iothread,id=io0",
            "--drive",
            &drive,
        ],
        T,
    );
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(out.stdout.contains("queue_size=128"), "{out:?}");
    assert!(out.stdout.contains("RESULT bench PASS"), "{out:?}");
    assert!(out.stdout.contains("profile=alt"), "{out:?}");
    assert!(
        out.stdout
            .contains("RESULT verify PASS dev=0xd0000000 queues=4 "),
        "{out:?}"
    );
}

/// A profile the guest does not know is a reported command-line error and a
/// failing exit status, not a silent fallback.
#[test]
fn unknown_profile_is_an_error() {
    if !kvm_available("unknown_profile_is_an_error") {
        return;
    }
    let dir = TempDir::new("bad-profile");
    let disk = dir.join("d.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let drive = format!("id=d0,file={},iothread=io0", disk.display());
    let out = run_vmm(
        &[
            "--kernel",
            GUEST,
            "--cmdline",
            "scenario=bench bench.ios=100 bench.profile=linux",
            "--object",
            "iothread,id=io0",
            "--drive",
            &drive,
        ],
        T,
    );
    assert!(
        out.stdout
            .contains("cmdline: bad value in 'bench.profile=linux'"),
        "{out:?}"
    );
    assert!(out.stdout.contains("DONE failures=1"), "{out:?}");
    assert_ne!(out.status, Some(0), "{out:?}");
}
