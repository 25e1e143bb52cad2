//! vmm-ref as a vhost-user-blk front-end (`--chardev socket,... --device
//! vhost-user-blk,...`) with the test guest on KVM, against real back-ends
//! started by the test: `vmm-ref export` and `qemu-storage-daemon
//! --export type=vhost-user-blk` (Debian's 7.2, installed by ci/setup.sh).
//!
//! - `malformed`, `verify`, `reset` (device reset and re-initialisation) and
//!   `durability` on 1 and 4 queues; the image is checked afterwards (every
//!   block `durability` wrote holds its pattern).
//! - Each back-end killed with SIGKILL in the middle of `durability` and
//!   restarted on the same socket: with `reconnect=1` the guest finishes and
//!   passes, and vmm-ref logged the loss once and the reconnection once.
//! - A back-end that dies without `reconnect=`: vmm-ref keeps running, logs
//!   once, QMP `query-block` shows the device disconnected, `quit` works.
//!
//! qemu-storage-daemon 7.2 answers a malformed descriptor chain with
//! `vu_panic` and drops the connection (it does not complete the request);
//! against it, `malformed` is run with `reconnect=1` and the test checks
//! that vmm-ref survives every such drop and the device works afterwards.
//!
//! Tests print `SKIPPED: reason` (visible with `--nocapture`) where /dev/kvm
//! or qemu-storage-daemon is missing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{kvm_available, Qmp, TempDir, RUN_TIMEOUT, VMM_REF};
use serde_json::json;

const GUEST: &str = env!("VMM_REF_GUEST_ELF");
const DISK_SIZE: u64 = 32 << 20;
const SEED: u64 = 0x5eed_7ab1;
const BLOCK: usize = 4096;

fn pattern_word(seed: u64, addr: u64) -> u64 {
    addr ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Checks that 4 KiB blocks `0..blocks` of the image hold the durability pattern.
fn check_blocks(image: &Path, blocks: u64) {
    let data = std::fs::read(image).expect("read image");
    assert_eq!(data.len() as u64, DISK_SIZE, "image size unchanged");
    for k in 0..blocks as usize {
        let base = k * BLOCK;
        for (i, w) in data[base..base + BLOCK].chunks_exact(8).enumerate() {
            let found = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            let want = pattern_word(SEED, (base + 8 * i) as u64);
            assert_eq!(found, want, "block {k} differs at byte {}", 8 * i);
        }
    }
}

/// Whether qemu-storage-daemon can be run; prints why the test is skipped otherwise.
fn qsd_available(test: &str) -> bool {
    match Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => true,
        Ok(s) => {
            println!("SKIPPED: qemu-storage-daemon --version failed ({s}) -- {test}");
            false
        }
        Err(e) => {
            println!("SKIPPED: qemu-storage-daemon not available ({e}) -- {test}");
            false
        }
    }
}

/// A back-end implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `vmm-ref export`.
    Ours,
    /// `qemu-storage-daemon`.
    Qsd,
}

/// A running back-end process (killed on drop).
struct Backend {
    kind: Kind,
    image: PathBuf,
    socket: PathBuf,
    queues: u16,
    child: Child,
    log: PathBuf,
}

impl Backend {
    fn start(kind: Kind, image: &Path, socket: &Path, queues: u16) -> Backend {
        let _ = std::fs::remove_file(socket);
        let log = socket.with_extension(format!("{}.log", std::process::id()));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("back-end log");
        let mut cmd = match kind {
            Kind::Ours => {
                let mut c = Command::new(VMM_REF);
                c.args([
                    "export",
                    "--drive",
                    &format!("id=d0,file={}", image.display()),
                    "--object",
                    "iothread,id=io0",
                    "--export",
                    &format!(
                        "vhost-user-blk,id=e0,node-name=d0,addr=unix:{},num-queues={queues},iothread=io0",
                        socket.display()
                    ),
                ]);
                c
            }
            Kind::Qsd => {
                let mut c = Command::new("qemu-storage-daemon");
                c.args([
                    "--blockdev",
                    &format!("driver=file,node-name=f0,filename={}", image.display()),
                    "--object",
                    "iothread,id=io0",
                    "--export",
                    &format!(
                        "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={queues},iothread=io0",
                        socket.display()
                    ),
                ]);
                c
            }
        };
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn the back-end");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "{kind:?} exited ({st}) before listening: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{kind:?}: no socket after 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Backend {
            kind,
            image: image.to_owned(),
            socket: socket.to_owned(),
            queues,
            child,
            log,
        }
    }

    /// SIGKILL, then a new process on the same image and socket.
    fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let fresh = Backend::start(self.kind, &self.image, &self.socket, self.queues);
        *self = fresh;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A running vmm-ref whose stdout and stderr lines are all recorded.
struct Vmm {
    child: Child,
    lines: Receiver<String>,
    all: Arc<Mutex<Vec<String>>>,
}

impl Vmm {
    fn spawn(args: &[String]) -> Vmm {
        let mut child = Command::new(VMM_REF)
            .args(args)
            .env("VMM_REF_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm-ref");
        let (tx, lines) = mpsc::channel();
        let all = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let tx = tx.clone();
            let all = Arc::clone(&all);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    all.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Vmm { child, lines, all }
    }

    /// Waits for a line containing `needle`.
    fn expect_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line containing {needle:?} ({e}):\n{}", self.output()),
            }
        }
    }

    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return st.code();
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&self) -> String {
        self.all.lock().unwrap().join("\n")
    }

    fn count(&self, needle: &str) -> usize {
        self.all
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn new_image(dir: &TempDir) -> PathBuf {
    let image = dir.join("disk.img");
    let f = std::fs::File::create(&image).expect("create image");
    f.set_len(DISK_SIZE).expect("size image");
    image
}

fn vmm_args(cmdline: &str, socket: &Path, device_opts: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--kernel",
        GUEST,
        "--memory",
        "256M",
        "--cmdline",
        cmdline,
        "--chardev",
        &format!("socket,id=c0,path={}", socket.display()),
        "--device",
        &format!("vhost-user-blk,id=vu0,chardev=c0,{device_opts}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `malformed`, `verify`, `reset`, `durability` against `kind` with `queues` queues.
fn scenarios(kind: Kind, queues: u16) {
    let test = format!("scenarios_{kind:?}_{queues}q");
    if !kvm_available(&test) || (kind == Kind::Qsd && !qsd_available(&test)) {
        return;
    }
    let dir = TempDir::new(&test);
    let image = new_image(&dir);
    let socket = dir.join("vu.sock");
    let backend = Backend::start(kind, &image, &socket, queues);
    const BLOCKS: u64 = 512;
    let cmdline = format!(
        "scenario=malformed,verify,reset,durability verify.seed={SEED} durability.blocks={BLOCKS} durability.every=128"
    );
    // qemu-storage-daemon drops the connection on malformed chains.
    let opts = match kind {
        Kind::Ours => format!("num-queues={queues}"),
        Kind::Qsd => format!("num-queues={queues},reconnect=1"),
    };
    let mut vmm = Vmm::spawn(&vmm_args(&cmdline, &socket, &opts, &[]));
    let status = vmm.wait(RUN_TIMEOUT);
    let out = vmm.output();
    let ctx = || format!("{out}\n--- back-end log:\n{}", backend.log());
    assert!(
        out.contains(&format!(
            "RESULT verify PASS dev=0xd0000000 queues={queues} "
        )),
        "{}",
        ctx()
    );
    assert!(
        out.contains(&format!(
            "RESULT durability PASS dev=0xd0000000 blocks={BLOCKS} flushes={BLOCKS} queues={queues}"
        )),
        "{}",
        ctx()
    );
    // The guest reset the device and drove it again (GET_VRING_BASE, new rings).
    assert!(out.contains("RESULT reset PASS"), "{}", ctx());
    let malformed = out
        .lines()
        .find(|l| l.starts_with("RESULT malformed"))
        .unwrap_or_else(|| panic!("no malformed result: {}", ctx()));
    match kind {
        Kind::Ours => {
            assert!(malformed.starts_with("RESULT malformed PASS"), "{}", ctx());
            assert_eq!(status, Some(0), "{}", ctx());
            assert_eq!(vmm.count("lost the back-end"), 0, "{}", ctx());
        }
        Kind::Qsd => {
            // What QEMU's back-end does answer, it answers right through us...
            for case in ["unknown_type=unsupp", "sector_past_capacity=ioerr"] {
                assert!(malformed.contains(case), "{case}: {malformed}");
            }
            // ... and every case it did not answer is one it dropped us for.
            for word in malformed.split_whitespace().filter(|w| w.ends_with('!')) {
                assert!(word.ends_with("=no_completion!"), "{word}: {}", ctx());
            }
            let failed = u32::from(malformed.starts_with("RESULT malformed FAIL"));
            assert_eq!(status, Some(failed as i32), "{}", ctx());
            if failed == 1 {
                assert!(vmm.count("lost the back-end") >= 1, "{}", ctx());
                assert!(vmm.count("reconnected to") >= 1, "{}", ctx());
            }
        }
    }
    assert!(!out.contains("panicked"), "{}", ctx());
    drop(backend);
    check_blocks(&image, BLOCKS);
}

#[test]
fn our_export_1_queue() {
    scenarios(Kind::Ours, 1);
}

#[test]
fn our_export_4_queues() {
    scenarios(Kind::Ours, 4);
}

#[test]
fn qemu_storage_daemon_1_queue() {
    scenarios(Kind::Qsd, 1);
}

#[test]
fn qemu_storage_daemon_4_queues() {
    scenarios(Kind::Qsd, 4);
}

/// What happens to a `durability` run after block 255.
#[derive(Clone, Copy, Debug)]
enum Interruption {
    /// The back-end is killed and restarted (the device has `reconnect=1`).
    KillAndRestart,
    /// The VM is stopped and continued over QMP: the back-end's rings are
    /// stopped (`GET_VRING_BASE`) and started again where they stood.
    StopAndCont,
}

/// `durability` against `kind` with `queues` queues, interrupted by `how`
/// after block 255: the guest must finish and pass, vmm-ref exit 0, log the
/// loss of the back-end `losses` times (and reconnect `reconnects` times,
/// where given), and the image hold every block.
fn interrupted_durability(
    kind: Kind,
    queues: u16,
    how: Interruption,
    losses: usize,
    reconnects: Option<usize>,
) {
    let test = format!("{how:?}_{kind:?}_{queues}q");
    if !kvm_available(&test) || (kind == Kind::Qsd && !qsd_available(&test)) {
        return;
    }
    let dir = TempDir::new(&test);
    let image = new_image(&dir);
    let socket = dir.join("vu.sock");
    let qmp_sock = dir.join("qmp.sock");
    let mut backend = Backend::start(kind, &image, &socket, queues);
    const BLOCKS: u64 = 2048;
    let cmdline = format!(
        "scenario=durability verify.seed={SEED} durability.blocks={BLOCKS} durability.every=128"
    );
    let qmp_arg = format!("unix:{}", qmp_sock.display());
    let (opts, extra) = match how {
        Interruption::KillAndRestart => (format!("num-queues={queues},reconnect=1"), vec![]),
        Interruption::StopAndCont => (format!("num-queues={queues}"), vec!["--qmp", &qmp_arg]),
    };
    let mut vmm = Vmm::spawn(&vmm_args(&cmdline, &socket, &opts, &extra));
    vmm.expect_line("FLUSHED 255", RUN_TIMEOUT);
    match how {
        Interruption::KillAndRestart => backend.kill_and_restart(),
        Interruption::StopAndCont => {
            let mut qmp = Qmp::connect(&qmp_sock, RUN_TIMEOUT);
            assert_eq!(qmp.execute("stop", json!(null)), json!({}));
            qmp.wait_event("STOP");
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(qmp.execute("cont", json!(null)), json!({}));
            qmp.wait_event("RESUME");
        }
    }
    let status = vmm.wait(RUN_TIMEOUT);
    let out = vmm.output();
    let ctx = || format!("{out}\n--- back-end log:\n{}", backend.log());
    assert!(
        out.contains(&format!(
            "RESULT durability PASS dev=0xd0000000 blocks={BLOCKS} flushes={BLOCKS} queues={queues}"
        )),
        "{}",
        ctx()
    );
    assert_eq!(status, Some(0), "{}", ctx());
    assert_eq!(vmm.count("lost the back-end"), losses, "{}", ctx());
    if let Some(n) = reconnects {
        assert_eq!(vmm.count("reconnected to"), n, "{}", ctx());
    }
    drop(backend);
    check_blocks(&image, BLOCKS);
}

/// `durability` with the back-end killed and restarted after block 255:
/// the loss is logged once and the reconnection once.
fn kill_and_restart(kind: Kind, queues: u16) {
    interrupted_durability(kind, queues, Interruption::KillAndRestart, 1, Some(1));
}

/// `durability` with the VM stopped and continued over QMP after block 255:
/// no connection is lost.
fn stop_and_cont(kind: Kind, queues: u16) {
    interrupted_durability(kind, queues, Interruption::StopAndCont, 0, None);
}

#[test]
fn our_export_stopped_and_continued_mid_run_4_queues() {
    stop_and_cont(Kind::Ours, 4);
}

#[test]
fn qemu_storage_daemon_stopped_and_continued_mid_run_1_queue() {
    stop_and_cont(Kind::Qsd, 1);
}

#[test]
fn our_export_killed_and_restarted_mid_run_4_queues() {
    kill_and_restart(Kind::Ours, 4);
}

#[test]
fn qemu_storage_daemon_killed_and_restarted_mid_run_1_queue() {
    kill_and_restart(Kind::Qsd, 1);
}

/// Without `reconnect=`, a dead back-end stops the device's queues and
/// nothing else: one log line, `query-block` shows it, `quit` works.
#[test]
fn a_dead_backend_without_reconnect_leaves_the_vmm_running() {
    let test = "a_dead_backend_without_reconnect_leaves_the_vmm_running";
    if !kvm_available(test) {
        return;
    }
    let dir = TempDir::new("vu-dead");
    let image = new_image(&dir);
    let socket = dir.join("vu.sock");
    let qmp_path = dir.join("qmp.sock");
    let mut backend = Backend::start(Kind::Ours, &image, &socket, 1);
    let cmdline = format!("scenario=durability verify.seed={SEED} durability.blocks=4096");
    let qmp_arg = format!("unix:{}", qmp_path.display());
    let mut vmm = Vmm::spawn(&vmm_args(
        &cmdline,
        &socket,
        "num-queues=1",
        &["--qmp", &qmp_arg],
    ));
    vmm.expect_line("FLUSHED 15", RUN_TIMEOUT);
    let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(60));
    let blocks = qmp.execute("query-block", serde_json::Value::Null);
    let vu = &blocks[0];
    assert_eq!(vu["device"], "vu0", "{blocks}");
    assert_eq!(vu["format"], "vhost-user-blk", "{blocks}");
    assert_eq!(vu["activated"], true, "{blocks}");
    assert_eq!(
        vu["vhost-user"]["path"],
        json!(socket.display().to_string())
    );
    assert_eq!(vu["vhost-user"]["connected"], true, "{blocks}");
    assert_eq!(vu["vhost-user"]["reconnect"], serde_json::Value::Null);

    let _ = backend.child.kill();
    let _ = backend.child.wait();
    vmm.expect_line("lost the back-end", Duration::from_secs(60));
    // The guest keeps waiting for its request; the VMM keeps serving QMP.
    std::thread::sleep(Duration::from_secs(2));
    let blocks = qmp.execute("query-block", serde_json::Value::Null);
    let v = &blocks[0]["vhost-user"];
    assert_eq!(v["connected"], false, "{blocks}");
    assert_eq!(v["disconnects"], 1, "{blocks}");
    assert_eq!(
        v["last-error"], "the back-end closed the connection",
        "{blocks}"
    );
    assert_eq!(
        qmp.execute("query-status", serde_json::Value::Null)["status"],
        "running"
    );
    assert_eq!(
        vmm.count("lost the back-end"),
        1,
        "logged once:\n{}",
        vmm.output()
    );
    qmp.execute("quit", serde_json::Value::Null);
    let status = vmm.wait(Duration::from_secs(60));
    assert!(status.is_some(), "vmm-ref did not exit:\n{}", vmm.output());
    assert!(!vmm.output().contains("panicked"), "{}", vmm.output());
}

/// Configuration mistakes are reported before anything runs.
#[test]
fn unusable_device_options_are_refused() {
    let dir = TempDir::new("vu-cli");
    let socket = dir.join("none.sock");
    let out = common::run_vmm(
        &vmm_args("", &socket, "chardev=c9", &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        Duration::from_secs(60),
    );
    // `chardev=` given twice.
    assert_eq!(out.status, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("option 'chardev' given twice"),
        "{out:?}"
    );
    if !kvm_available("unusable_device_options_are_refused (no back-end)") {
        return;
    }
    let out = common::run_vmm(
        &vmm_args("", &socket, "num-queues=1", &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        Duration::from_secs(60),
    );
    assert_eq!(out.status, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "error: cannot attach drive 'vu0': cannot set up the vhost-user-blk device: cannot connect to the vhost-user back-end at {}",
            socket.display()
        )),
        "{out:?}"
    );
}
