//! Holders follow attachment, seen through QMP on the real VMM: a drive holds every
//! IOThread of its mapping before (and without) the guest driver, through device
//! resets and VM resets, and `x-drive-set-iothreads` moves a running drive's queues
//! while the test guest verifies its data with requests in flight on every queue.
//!
//! Each test prints the `query-iothreads` replies it checks (`--nocapture`).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const GUEST: &str = env!("VMM_REF_GUEST_ELF");
const D0: &str = "/machine/peripheral/d0/virtio-backend";
const T: Duration = Duration::from_secs(120);

/// IOThread id -> how many times d0 holds it, for every IOThread; panics on any
/// other holder.
fn d0_holders(qmp: &mut Qmp) -> BTreeMap<String, usize> {
    let reply = qmp.execute("query-iothreads", json!(null));
    reply
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let holders = t["holders"].as_array().unwrap();
            for h in holders {
                assert_eq!(h, &json!({"type": "qom-object", "qom-path": D0}), "{reply}");
            }
            (t["id"].as_str().unwrap().to_owned(), holders.len())
        })
        .collect()
}

/// The IOThreads d0 is on, checking it is on each at most once.
fn held(qmp: &mut Qmp) -> Vec<String> {
    d0_holders(qmp)
        .into_iter()
        .filter(|(id, n)| {
            assert!(*n <= 1, "d0 holds {id} {n} times");
            *n == 1
        })
        .map(|(id, _)| id)
        .collect()
}

fn activated(qmp: &mut Qmp) -> bool {
    let b = qmp.execute("query-block", json!(null));
    b[0]["activated"].as_bool().unwrap()
}

fn queue_iothreads(qmp: &mut Qmp) -> Vec<String> {
    let b = qmp.execute("query-block", json!(null));
    b[0]["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["iothread"].as_str().unwrap().to_owned())
        .collect()
}

fn queue_requests(qmp: &mut Qmp) -> Vec<u64> {
    let b = qmp.execute("query-block", json!(null));
    b[0]["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["requests"].as_u64().unwrap())
        .collect()
}

fn disk(dir: &TempDir) -> String {
    let path = dir.join("d.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    path.to_str().unwrap().to_owned()
}

fn iothread_args(n: usize) -> Vec<String> {
    (0..n)
        .flat_map(|i| ["--object".to_owned(), format!("iothread,id=io{i}")])
        .collect()
}

#[test]
fn guest_that_never_touches_the_device_still_holds_and_object_del_is_refused() {
    if !kvm_available("guest_that_never_touches_the_device_still_holds") {
        return;
    }
    let dir = TempDir::new("holders-idle");
    let kernel = dir.join("halt.elf");
    std::fs::write(&kernel, tiny_elf(&echo_cmdline_then_halt_code())).unwrap();
    let disk = disk(&dir);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", sock.display());
    let drive = format!("id=d0,file={disk},num-queues=2,iothread-vq-mapping=io0:io1:io2");
    let mut args: Vec<String> = vec!["--kernel".into(), kernel.to_str().unwrap().into()];
    args.extend(iothread_args(4));
    args.extend(["--drive".into(), drive, "--qmp".into(), qmp_arg]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vmm = Running::spawn(&args);
    vmm.expect_line("OK:", T);
    let mut qmp = Qmp::connect(&sock, T);

    // Before (and without) any driver: every IOThread of the mapping is held, even
    // io2 which round-robin leaves without a queue (2 queues, 3 IOThreads).
    println!(
        "query-iothreads before activation: {}",
        qmp.execute("query-iothreads", json!(null))
    );
    assert!(!activated(&mut qmp));
    assert_eq!(held(&mut qmp), ["io0", "io1", "io2"]);
    let err = qmp
        .execute_result("object-del", json!({"id": "io1"}))
        .unwrap_err();
    assert_eq!(
        err,
        json!({"class": "GenericError",
               "desc": format!("IOThread 'io1' is in use by qom-object {D0}")})
    );
    let hmp = qmp.execute(
        "human-monitor-command",
        json!({"command-line": "info iothreads"}),
    );
    assert!(hmp.as_str().unwrap().contains("io1:\n"), "{hmp}");
    assert!(hmp
        .as_str()
        .unwrap()
        .contains(&format!("    qom-object {D0}\n")));
    // An IOThread nobody holds can go.
    qmp.execute("object-del", json!({"id": "io3"}));

    // Re-mapping while not activated moves the holders; the same validation as at
    // start-up; failures change nothing.
    for (args, desc) in [
        (
            json!({"id": "d0", "iothread": "io0", "iothread-vq-mapping": ["io1"]}),
            "iothread and iothread-vq-mapping properties cannot be set at the same time",
        ),
        (
            json!({"id": "d0"}),
            "an IOThread is required: give iothread=<id> or iothread-vq-mapping=<id>:<id>...",
        ),
        (
            json!({"id": "d0", "iothread-vq-mapping": ["io1", "io1"]}),
            "drive 'd0': invalid IOThread mapping: duplicate IOThread name \"io1\" in iothread-vq-mapping",
        ),
        (
            json!({"id": "d0", "iothread": "io3"}),
            "drive 'd0': invalid IOThread mapping: IOThread \"io3\" object does not exist",
        ),
    ] {
        let err = qmp
            .execute_result("x-drive-set-iothreads", args.clone())
            .unwrap_err();
        assert_eq!(err["desc"], desc, "{args}");
        assert_eq!(held(&mut qmp), ["io0", "io1", "io2"]);
    }
    let err = qmp
        .execute_result(
            "x-drive-set-iothreads",
            json!({"id": "d9", "iothread": "io0"}),
        )
        .unwrap_err();
    assert_eq!(
        err,
        json!({"class": "DeviceNotFound", "desc": "Device 'd9' not found"})
    );
    qmp.execute(
        "x-drive-set-iothreads",
        json!({"id": "d0", "iothread": "io2"}),
    );
    assert_eq!(held(&mut qmp), ["io2"]);
    assert_eq!(queue_iothreads(&mut qmp), ["io2", "io2"]);
    qmp.execute("object-del", json!({"id": "io0"}));

    // A VM reset changes nothing either.
    qmp.execute("system_reset", json!(null));
    vmm.expect_line("OK:", T);
    assert_eq!(held(&mut qmp), ["io2"]);
    qmp.execute("quit", json!(null));
    assert_eq!(vmm.wait(T), Some(0));
}

#[test]
fn holders_unchanged_across_activation_reset_and_reactivation() {
    if !kvm_available("holders_unchanged_across_activation_reset_and_reactivation") {
        return;
    }
    let dir = TempDir::new("holders-reset");
    let disk = disk(&dir);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", sock.display());
    let drive = format!("id=d0,file={disk},num-queues=2,iothread-vq-mapping=io0:io1");
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        GUEST.into(),
        "--cmdline".into(),
        "scenario=hold,reset,hold hold.secs=2 reset.pause_ms=3000".into(),
    ];
    args.extend(iothread_args(2));
    args.extend(["--drive".into(), drive, "--qmp".into(), qmp_arg]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vmm = Running::spawn(&args);
    let mut qmp = Qmp::connect(&sock, T);

    // Poll until the driver activated, reset and re-activated the device; the
    // holders never change meanwhile.
    let mut seen: Vec<bool> = Vec::new();
    let deadline = Instant::now() + T;
    // (The driver may have activated the device before we connected.)
    while !seen.ends_with(&[true, false, true]) {
        assert!(
            Instant::now() < deadline,
            "activation states seen: {seen:?}"
        );
        let a = activated(&mut qmp);
        assert_eq!(held(&mut qmp), ["io0", "io1"], "activated={a}");
        if seen.last() != Some(&a) {
            seen.push(a);
            if seen.ends_with(&[true, false]) {
                let q = qmp.execute("query-iothreads", json!(null));
                println!("query-iothreads after the guest reset its device: {q}");
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // A VM reset: the same.
    qmp.execute("system_reset", json!(null));
    assert_eq!(held(&mut qmp), ["io0", "io1"]);
    println!(
        "query-iothreads after system_reset: {}",
        qmp.execute("query-iothreads", json!(null))
    );
    qmp.execute("quit", json!(null));
    assert_eq!(vmm.wait(T), Some(0));
}

/// The mappings the re-map test cycles through: QMP arguments, and the IOThread of
/// each of the 4 queues.
fn mappings() -> Vec<(Value, [&'static str; 4])> {
    vec![
        (
            json!({"iothread-vq-mapping": ["io1", "io2", "io3", "io0"]}),
            ["io1", "io2", "io3", "io0"],
        ),
        (json!({"iothread": "io2"}), ["io2"; 4]),
        (
            json!({"iothread-vq-mapping": [{"iothread": "io3", "vqs": [0, 1]},
                                            {"iothread": "io0", "vqs": [2, 3]}]}),
            ["io3", "io3", "io0", "io0"],
        ),
        (
            json!({"iothread-vq-mapping": ["io0", "io1", "io2", "io3"]}),
            ["io0", "io1", "io2", "io3"],
        ),
    ]
}

#[test]
fn remap_100_times_while_the_guest_verifies_with_requests_in_flight() {
    if !kvm_available("remap_100_times_while_the_guest_verifies") {
        return;
    }
    let dir = TempDir::new("holders-remap");
    let disk = disk(&dir);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", sock.display());
    let drive = format!("id=d0,file={disk},num-queues=4,iothread-vq-mapping=io0:io1:io2:io3");
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        GUEST.into(),
        "--cmdline".into(),
        "scenario=verify verify.until_input=1".into(),
    ];
    args.extend(iothread_args(4));
    args.extend(["--drive".into(), drive, "--qmp".into(), qmp_arg]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vmm = Running::spawn_interactive(&args);
    let mut qmp = Qmp::connect(&sock, T);
    // The guest runs verify rounds from here until it gets input.
    vmm.expect_line("seed:", T);
    let start = queue_requests(&mut qmp);
    let mappings = mappings();
    for i in 0..100 {
        let (args, per_queue) = &mappings[i % mappings.len()];
        let mut args = args.clone();
        args["id"] = json!("d0");
        qmp.execute("x-drive-set-iothreads", args);
        let mut want: Vec<String> = per_queue.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(queue_iothreads(&mut qmp), want, "re-map {i}");
        want.sort();
        want.dedup();
        assert_eq!(held(&mut qmp), want, "re-map {i}");
        if i == 50 {
            println!(
                "query-iothreads during the re-maps ({i}): {}",
                qmp.execute("query-iothreads", json!(null))
            );
        }
    }
    // Every queue kept serving requests. A starved vCPU (loaded host) may issue
    // nothing during the quick re-maps, so wait for progress; a queue lost by a
    // move never progresses and fails here.
    let deadline = std::time::Instant::now() + T;
    let mut end = queue_requests(&mut qmp);
    while start.iter().zip(&end).any(|(a, b)| b <= a) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        end = queue_requests(&mut qmp);
    }
    for (q, (a, b)) in start.iter().zip(&end).enumerate() {
        assert!(b > a, "queue {q}: {a} -> {b} requests");
    }
    vmm.send_input(b"x");
    let result = vmm.expect_line("RESULT verify", T);
    assert!(result.contains("RESULT verify PASS"), "{result}");
    assert!(result.contains(" rounds="), "{result}");
    println!("guest: {result}");
    vmm.expect_line("DONE failures=0", T);
    assert_eq!(vmm.wait(T), Some(0));
}
