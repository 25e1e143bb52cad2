//! Image locking, black box: vmm-ref takes QEMU's `file-posix` lock bytes,
//! so two vmm-ref processes, and vmm-ref and qemu-storage-daemon in either
//! order, never write one image at the same time; read-only users share it;
//! `locking=off` skips the locks. A conflict is a configuration error
//! (status 2) naming the image and the process holding it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Generous: the machine is shared and noisy.
const T: Duration = Duration::from_secs(120);

fn make_image(dir: &TempDir) -> String {
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    img.to_str().unwrap().to_owned()
}

/// `vmm-ref export` arguments serving `img` on `sock` (writable or not).
fn export_args(img: &str, sock: &Path, writable: bool, drive_extra: &str) -> Vec<String> {
    vec![
        "export".into(),
        "--drive".into(),
        format!("id=d0,file={img}{drive_extra}"),
        "--object".into(),
        "iothread,id=io0".into(),
        "--export".into(),
        format!(
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:{},iothread=io0,writable={}",
            sock.display(),
            if writable { "on" } else { "off" }
        ),
    ]
}

/// A running `vmm-ref export`, ready.
fn spawn_export(img: &str, sock: &Path, writable: bool, drive_extra: &str) -> Running {
    let args = export_args(img, sock, writable, drive_extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = Running::spawn(&args);
    r.expect_line("vmm-ref export: ready", T);
    r
}

/// Runs `vmm-ref args...`; expects status 2 and one message saying the image
/// is in use, with `what` and `holder` in it.
fn expect_locked(args: &[String], img: &str, what: &str, holder: &str) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_vmm(&args, T);
    assert_eq!(out.status, Some(2), "{args:?}: {out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one message: {out:?}");
    let want = format!("image '{img}' is in use: {what}, held by {holder}");
    assert!(lines[0].contains(&want), "want {want:?}: {out:?}");
}

#[test]
fn two_vmm_ref_processes_exclude_each_other() {
    if !kvm_available("two_vmm_ref_processes_exclude_each_other") {
        return;
    }
    let dir = TempDir::new("lock-run");
    let img = make_image(&dir);
    let kernel = dir.join("halt.elf");
    std::fs::write(&kernel, tiny_elf(&echo_cmdline_then_halt_code())).unwrap();
    let kernel = kernel.to_str().unwrap().to_owned();
    let run_args = |drive_extra: &str| -> Vec<String> {
        [
            "--kernel",
            &kernel,
            "--object",
            "iothread,id=io0",
            "--drive",
            &format!("id=d0,file={img},iothread=io0{drive_extra}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let first = Running::spawn(&run_args("").iter().map(String::as_str).collect::<Vec<_>>());
    first.expect_line("OK:", T);
    let holder = format!("process {} (vmm-ref)", first.child.id());
    // A second writer, a reader, an export: all refused before any VM exists.
    expect_locked(&run_args(""), &img, "failed to get \"write\" lock", &holder);
    expect_locked(
        &run_args(",readonly=on"),
        &img,
        "failed to get shared \"write\" lock",
        &holder,
    );
    let sock = dir.join("e0.sock");
    expect_locked(
        &export_args(&img, &sock, true, ""),
        &img,
        "failed to get \"write\" lock",
        &holder,
    );
    assert!(!sock.exists());
    // locking=off: no check (the operator's responsibility).
    let unlocked = Running::spawn(
        &run_args(",locking=off")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    unlocked.expect_line("OK:", T);
    drop(unlocked);
    // When the first one is gone the image is free again.
    drop(first);
    let again = Running::spawn(&run_args("").iter().map(String::as_str).collect::<Vec<_>>());
    again.expect_line("OK:", T);
}

#[test]
fn read_only_users_share_and_exclude_writers() {
    let dir = TempDir::new("lock-ro");
    let img = make_image(&dir);
    let r1 = spawn_export(&img, &dir.join("r1.sock"), false, "");
    let r2 = spawn_export(&img, &dir.join("r2.sock"), false, ",readonly=on");
    // A writer is refused by either reader.
    let out = run_vmm(
        &export_args(&img, &dir.join("w.sock"), true, "")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        T,
    );
    assert_eq!(out.status, Some(2), "{out:?}");
    assert!(
        out.stderr
            .contains("failed to get \"write\" lock, held by process"),
        "{out:?}"
    );
    let (p1, p2) = (r1.child.id(), r2.child.id());
    assert!(
        out.stderr.contains(&format!("{p1} (vmm-ref)"))
            || out.stderr.contains(&format!("{p2} (vmm-ref)")),
        "names a holder: {out:?}"
    );
    drop((r1, r2));
    let _w = spawn_export(&img, &dir.join("w.sock"), true, ",locking=on");
}

/// A qemu-storage-daemon serving `img` through a vhost-user-blk export.
struct Qsd {
    child: Child,
    stderr: PathBuf,
}

impl Qsd {
    fn command(img: &str, sock: &Path, writable: bool) -> Command {
        let mut c = Command::new("qemu-storage-daemon");
        let ro = if writable { "" } else { ",read-only=on" };
        c.args([
            "--blockdev",
            &format!("driver=file,node-name=f0,filename={img}{ro}"),
            "--export",
            &format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable={}",
                sock.display(),
                if writable { "on" } else { "off" }
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        c
    }

    /// Starts it and waits for its export socket (the locks come first).
    fn spawn(dir: &TempDir, img: &str, sock: &Path, writable: bool) -> Qsd {
        let stderr = dir.join("qsd.err");
        let child = Self::command(img, sock, writable)
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut q = Qsd { child, stderr };
        let deadline = Instant::now() + T;
        while !sock.exists() {
            if let Some(st) = q.child.try_wait().unwrap() {
                panic!(
                    "qemu-storage-daemon exited with {st}: {}",
                    std::fs::read_to_string(&q.stderr).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "qemu-storage-daemon not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qsd_available(test: &str) -> bool {
    let ok = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("SKIPPED: qemu-storage-daemon not installed (ci/setup.sh installs it) -- {test}");
    }
    ok
}

#[test]
fn qemu_storage_daemon_and_vmm_ref_exclude_each_other() {
    if !qsd_available("qemu_storage_daemon_and_vmm_ref_exclude_each_other") {
        return;
    }
    let dir = TempDir::new("lock-qsd");
    let img = make_image(&dir);

    // qemu-storage-daemon first: vmm-ref refuses, naming it.
    let qsd = Qsd::spawn(&dir, &img, &dir.join("q.sock"), true);
    let holder = format!("process {} (qemu-storage-daemon)", qsd.child.id());
    let sock = dir.join("v.sock");
    for writable in [true, false] {
        expect_locked(
            &export_args(&img, &sock, writable, ""),
            &img,
            "failed to get shared \"write\" lock",
            &holder,
        );
    }
    drop(qsd);
    std::fs::remove_file(dir.join("q.sock")).ok();

    // vmm-ref first: qemu-storage-daemon refuses with its own message.
    let v = spawn_export(&img, &sock, true, "");
    let out = Qsd::command(&img, &dir.join("q.sock"), true)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    drop(v);

    // Read-only on both sides: shared.
    let v = spawn_export(&img, &sock, false, ",readonly=on");
    let q = Qsd::spawn(&dir, &img, &dir.join("q.sock"), false);
    drop((q, v));

    // locking=off: vmm-ref writes next to a writing QEMU if told to.
    let qsd = Qsd::spawn(&dir, &img, &dir.join("q2.sock"), true);
    let _unlocked = spawn_export(&img, &dir.join("v2.sock"), true, ",locking=off");
    drop(qsd);
}

/// An export added through QMP locks its image until `block-export-del`.
#[test]
fn qmp_added_exports_lock_until_deleted() {
    use serde_json::json;
    let dir = TempDir::new("lock-qmp");
    let img = make_image(&dir);
    let qmp_sock = dir.join("qmp.sock");
    let daemon = Running::spawn(&[
        "export",
        "--drive",
        &format!("id=d0,file={img}"),
        "--object",
        "iothread,id=io0",
        "--qmp",
        &format!("unix:{}", qmp_sock.display()),
    ]);
    daemon.expect_line("vmm-ref export: ready", T);
    let mut qmp = Qmp::connect(&qmp_sock, T);
    let add = json!({"type": "vhost-user-blk", "id": "e0", "node-name": "d0",
        "addr": {"type": "unix", "path": dir.join("e0.sock")}, "iothread": "io0",
        "writable": true});
    qmp.execute("block-export-add", add.clone());
    let other = export_args(&img, &dir.join("o.sock"), true, "");
    let holder = format!("process {} (vmm-ref)", daemon.child.id());
    expect_locked(&other, &img, "failed to get \"write\" lock", &holder);
    // The other way round: while that one runs, block-export-add is refused.
    qmp.execute("block-export-del", json!({"id": "e0"}));
    let o = spawn_export(&img, &dir.join("o.sock"), true, "");
    let err = qmp.execute_result("block-export-add", add).unwrap_err();
    let desc = err["desc"].as_str().unwrap_or_default();
    assert!(
        desc.contains(&format!(
            "image '{img}' is in use: failed to get \"write\" lock, held by process {} (vmm-ref)",
            o.child.id()
        )),
        "{err}"
    );
    qmp.execute("quit", json!(null));
    assert_eq!(daemon.wait(T), Some(0));
}
