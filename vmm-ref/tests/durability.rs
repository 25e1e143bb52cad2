//! Flush durability under a power cut: the test guest writes 4 KiB blocks
//! one by one, each followed by a FLUSH, and prints `FLUSHED <k>` once
//! blocks `0..=k` are all acknowledged. The image lives on the power-cut
//! disk model (`common/powercut.rs`, a FUSE file system): writes stay in a
//! volatile cache until an `fsync`/`fdatasync`/io_uring `FSYNC` commits them.
//! In the middle of the run the power is cut (the cache is dropped) and the
//! VMM killed; the durable store must then hold every block up to the last
//! reported `k` with exactly the guest's pattern (u64 at disk offset `a` =
//! `a ^ seed * 0x9e3779b97f4a7c15`). Unlike a SIGKILL alone, which keeps
//! the host page cache, this fails when a FLUSH is acknowledged before its
//! data is durable: the `*_detects_skipped_flushes` tests run the same
//! harness with the VMM's flushes turned into no-ops
//! (`VMM_REF_TEST_SKIP_FLUSH=1`) and require the loss to be found.
//! Runs with the io_uring and the synchronous (`aio=threads`) engines, with
//! buffered and O_DIRECT (`direct=on`) files, over one and several queues.
//! The `export_*` tests do the same for `vmm-ref export` (no KVM needed): a
//! vhost-user front-end in this test writes and flushes block by block.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::powercut::PowerCutDisk;
use common::vhost_user::{Placement, VuBlk, SECTOR, T_OUT};
use common::{kvm_available, VMM_REF};

/// Blocks the guest would write if it were never killed (256 MiB): far more
/// than it can write before the kill, so the kill lands mid-run.
const GUEST_BLOCKS: u64 = 65536;
/// Size of one block.
const BLOCK: usize = 4096;
/// The test cuts the power once the guest reported at least this block.
const KILL_AFTER_BLOCK: u64 = 100;
/// Bound on the whole run up to the cut (boot included) on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(240);

/// The guest's pattern word at disk byte offset `addr`.
fn pattern_word(seed: u64, addr: u64) -> u64 {
    addr ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// First mismatch in block `k` of `image`: (byte offset in the block, found, expected).
fn check_block(image: &[u8], seed: u64, k: u64) -> Option<(usize, u64, u64)> {
    let base = k as usize * BLOCK;
    let block = &image[base..base + BLOCK];
    block.chunks_exact(8).enumerate().find_map(|(i, word)| {
        let found = u64::from_le_bytes(word.try_into().expect("8-byte chunk"));
        let expected = pattern_word(seed, (base + 8 * i) as u64);
        (found != expected).then_some((8 * i, found, expected))
    })
}

/// One configuration of the drive under test.
struct Case {
    name: &'static str,
    /// `--object` arguments.
    objects: &'static [&'static str],
    /// Drive options after `id=d0,file=<image>,`.
    drive: &'static str,
}

/// What a run saw before the cut.
struct Seen {
    /// Highest `k` of a `FLUSHED <k>` line.
    last_flushed: u64,
    /// Number of `FLUSHED` lines.
    lines: usize,
    /// Whether the guest had already finished (RESULT line) before the kill.
    finished: bool,
}

/// stdout lines of `child` on a channel (the reader ends with the process).
fn line_channel(child: &mut Child) -> Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads guest output until a `FLUSHED k` with `k >= KILL_AFTER_BLOCK`, the
/// end of the output, or the timeout.
/// Every line read goes to `log`.
fn watch(lines: &Receiver<String>, seed: u64, log: &mut Vec<String>) -> Result<Seen, String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut seen = Seen {
        last_flushed: 0,
        lines: 0,
        finished: false,
    };
    let mut seed_echoed = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "no FLUSHED >= {KILL_AFTER_BLOCK} within {TIMEOUT:?}"
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err("the VMM's output ended before the kill".to_owned())
            }
        };
        log.push(line.clone());
        if let Some(rest) = line.strip_prefix("durability: ") {
            let want = format!("seed={seed:#x}");
            if !rest.split(' ').any(|w| w == want) {
                return Err(format!(
                    "guest uses another seed: {line:?}, expected {want}"
                ));
            }
            seed_echoed = true;
        } else if let Some(k) = line.strip_prefix("FLUSHED ") {
            let k: u64 = k
                .trim()
                .parse()
                .map_err(|e| format!("bad line {line:?}: {e}"))?;
            if !seed_echoed {
                return Err("FLUSHED before the durability: header line".to_owned());
            }
            if seen.lines > 0 && k <= seen.last_flushed {
                return Err(format!(
                    "FLUSHED went backwards: {k} after {}",
                    seen.last_flushed
                ));
            }
            seen.last_flushed = k;
            seen.lines += 1;
            if k >= KILL_AFTER_BLOCK {
                return Ok(seen);
            }
        } else if line.starts_with("RESULT ") {
            if !line.starts_with("RESULT durability PASS") {
                return Err(format!("guest reported {line:?}"));
            }
            seen.finished = true;
            return Ok(seen);
        }
    }
}

/// What one run found in the durable store after the cut.
struct Outcome {
    /// Highest `k` the guest reported flushed before the cut.
    last_flushed: u64,
    /// Acknowledged blocks (`0..=last_flushed`) that are not intact, with
    /// the first mismatch (byte offset in the block, found, expected).
    bad: Vec<(u64, (usize, u64, u64))>,
    /// Guest output and VMM stderr, for failure messages.
    context: String,
}

/// Runs the guest with `case` on a fresh power-cut disk, cuts the power
/// after `FLUSHED >= KILL_AFTER_BLOCK`, kills the VMM and checks the
/// durable store. With `skip_flush` the VMM acknowledges flushes without
/// syncing. `None` (after printing `SKIPPED`) without FUSE.
fn run_case(case: &Case, skip_flush: bool) -> Option<Outcome> {
    let disk = match PowerCutDisk::new(case.name, GUEST_BLOCKS * BLOCK as u64) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIPPED: {e} -- {}", case.name);
            return None;
        }
    };
    let kernel = env!("VMM_REF_GUEST_ELF");
    // A different pattern every run, so that no earlier content can match.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32)
        | 1;
    let cmdline =
        format!("scenario=durability durability.blocks={GUEST_BLOCKS} durability.seed={seed:#x}");
    let drive = format!("id=d0,file={},{}", disk.image().display(), case.drive);
    let mut args = vec![
        "--kernel",
        kernel,
        "--memory",
        "256M",
        "--cmdline",
        &cmdline,
    ];
    for o in case.objects {
        args.extend(["--object", o]);
    }
    args.extend(["--drive", &drive]);
    println!("{}: vmm-ref {}", case.name, args.join(" "));

    let mut cmd = Command::new(VMM_REF);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if skip_flush {
        cmd.env(SKIP_FLUSH_ENV, "1");
    }
    let mut child = cmd.spawn().expect("spawn vmm-ref");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let lines = line_channel(&mut child);
    let mut log = Vec::new();
    let watched = watch(&lines, seed, &mut log);
    // Cut at a varying point of the next write/flush cycle (a cycle takes
    // about a millisecond): 0-3 ms after the line.
    let delay = Duration::from_micros(seed % 3000);
    std::thread::sleep(delay);
    let at_cut = disk.cut_power();
    // SIGKILL (std's kill); fails only if the process is already reaped.
    let _ = child.kill();
    let status = child.wait().expect("wait for vmm-ref");
    let stderr = stderr_reader.join().unwrap_or_default();
    log.extend(lines.try_iter());
    let context = format!("guest output:\n{}\nstderr:\n{stderr}", lines_tail(&log));
    let seen = match watched {
        Ok(seen) => seen,
        Err(e) => panic!("{}: {e}\nexit: {status}\n{context}", case.name),
    };
    let image_data = disk.durable(0, GUEST_BLOCKS as usize * BLOCK);
    assert_eq!(image_data.len(), GUEST_BLOCKS as usize * BLOCK);
    let bad: Vec<_> = (0..=seen.last_flushed)
        .filter_map(|k| check_block(&image_data, seed, k).map(|m| (k, m)))
        .collect();
    let beyond = count_written_beyond(&image_data, seed, seen.last_flushed + 1);
    println!(
        "{}: power cut {delay:?} after FLUSHED {} ({} lines{}), then VMM killed ({status}); \
         at the cut {} FSYNCs had committed {} pages and {} pages were lost; \
         {} of blocks 0..={} damaged; {beyond} later blocks also durable",
        case.name,
        seen.last_flushed,
        seen.lines,
        if seen.finished {
            ", guest had finished"
        } else {
            ""
        },
        at_cut.fsyncs,
        at_cut.committed_pages,
        at_cut.lost_pages,
        bad.len(),
        seen.last_flushed
    );
    Some(Outcome {
        last_flushed: seen.last_flushed,
        bad,
        context,
    })
}

/// Runs `case` with working flushes: every acknowledged block must be durable.
fn expect_durable(case: &Case) {
    let Some(out) = run_case(case, false) else {
        return;
    };
    if let Some((k, (off, found, expected))) = out.bad.first() {
        panic!(
            "{}: block {k} (acknowledged: last FLUSHED {}) is not durable, byte {off}: \
             {found:#018x}, expected {expected:#018x} ({} bad blocks)\n{}",
            case.name,
            out.last_flushed,
            out.bad.len(),
            out.context
        );
    }
}

/// Runs `case` with the VMM's flushes turned into no-ops: the check must
/// find acknowledged blocks missing (else it could not catch the bug).
fn expect_loss_detected(case: &Case) {
    let Some(out) = run_case(case, true) else {
        return;
    };
    assert!(
        !out.bad.is_empty(),
        "{}: flushes were skipped but all {} acknowledged blocks are durable: \
         the power-cut check cannot see a missing flush\n{}",
        case.name,
        out.last_flushed + 1,
        out.context
    );
    println!(
        "{}: as required, {} of {} acknowledged blocks were lost",
        case.name,
        out.bad.len(),
        out.last_flushed + 1
    );
}

/// Blocks from `from` on that already hold their pattern (written but not yet
/// reported when the VMM died); informational.
fn count_written_beyond(image: &[u8], seed: u64, from: u64) -> usize {
    (from..GUEST_BLOCKS)
        .filter(|&k| check_block(image, seed, k).is_none())
        .count()
}

/// The last lines of a log, for failure messages.
fn lines_tail(log: &[String]) -> String {
    let start = log.len().saturating_sub(20);
    log[start..].join("\n")
}

/// `VMM_REF_TEST_SKIP_FLUSH` (vmm-ref's `raw::SKIP_FLUSH_ENV`).
const SKIP_FLUSH_ENV: &str = "VMM_REF_TEST_SKIP_FLUSH";

const IO_URING_4Q: Case = Case {
    name: "io_uring-4q",
    objects: &["iothread,id=io0", "iothread,id=io1"],
    drive: "num-queues=4,iothread-vq-mapping=io0:io1,aio=io_uring",
};

const THREADS_2Q: Case = Case {
    name: "threads-2q",
    objects: &["iothread,id=io0"],
    drive: "num-queues=2,iothread=io0,aio=threads",
};

#[test]
fn flushed_writes_survive_power_cut_io_uring_4_queues() {
    if !kvm_available("flushed_writes_survive_power_cut_io_uring_4_queues") {
        return;
    }
    expect_durable(&IO_URING_4Q);
}

#[test]
fn flushed_writes_survive_power_cut_threads_2_queues() {
    if !kvm_available("flushed_writes_survive_power_cut_threads_2_queues") {
        return;
    }
    expect_durable(&THREADS_2Q);
}

#[test]
fn flushed_writes_survive_power_cut_io_uring_direct() {
    if !kvm_available("flushed_writes_survive_power_cut_io_uring_direct") {
        return;
    }
    expect_durable(&Case {
        name: "io_uring-direct-1q",
        objects: &["iothread,id=io0,poll-max-ns=0"],
        drive: "num-queues=1,iothread=io0,aio=io_uring,direct=on",
    });
}

#[test]
fn flushed_writes_survive_power_cut_threads_direct() {
    if !kvm_available("flushed_writes_survive_power_cut_threads_direct") {
        return;
    }
    expect_durable(&Case {
        name: "threads-direct-3q",
        objects: &["iothread,id=io0", "iothread,id=io1"],
        drive: "num-queues=3,iothread-vq-mapping=io0:io1,aio=threads,direct=on",
    });
}

#[test]
fn power_cut_check_detects_skipped_flushes_io_uring() {
    if !kvm_available("power_cut_check_detects_skipped_flushes_io_uring") {
        return;
    }
    expect_loss_detected(&Case {
        name: "io_uring-4q-skip-flush",
        ..IO_URING_4Q
    });
}

#[test]
fn power_cut_check_detects_skipped_flushes_threads() {
    if !kvm_available("power_cut_check_detects_skipped_flushes_threads") {
        return;
    }
    expect_loss_detected(&Case {
        name: "threads-2q-skip-flush",
        ..THREADS_2Q
    });
}

#[test]
fn checker_rejects_missing_and_misplaced_blocks() {
    // The check itself must be able to fail: a zeroed block, a block written
    // with another seed and a block written at the wrong offset all differ.
    let seed = 0x1234_5678_9abc_def1;
    let mut image = vec![0u8; 3 * BLOCK];
    let fill = |buf: &mut [u8], seed: u64, offset: u64| {
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&pattern_word(seed, offset + 8 * i as u64).to_le_bytes());
        }
    };
    fill(&mut image[..BLOCK], seed, 0);
    assert_eq!(check_block(&image, seed, 0), None);
    assert!(check_block(&image, seed, 1).is_some(), "zeroed block");
    fill(&mut image[BLOCK..2 * BLOCK], seed ^ 2, BLOCK as u64);
    assert!(check_block(&image, seed, 1).is_some(), "other seed");
    fill(&mut image[2 * BLOCK..], seed, 0);
    assert!(
        check_block(&image, seed, 2).is_some(),
        "block 0's data in block 2"
    );
    // A single torn word is found, with its position.
    fill(&mut image[2 * BLOCK..], seed, 2 * BLOCK as u64);
    image[2 * BLOCK + 4000] ^= 1;
    assert_eq!(check_block(&image, seed, 2).map(|m| m.0), Some(4000));
}

// ------------------------------------------------------------ vmm-ref export

/// Blocks of the exported image (4 MiB).
const EXPORT_BLOCKS: u64 = 1024;
/// Guest memory the front-end shares.
const EXPORT_MEM: u64 = 4 << 20;
/// Bound on the daemon's start and on every request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(120);

/// The pattern of block `k` (the guest scenario's, built on the host).
fn pattern_block(seed: u64, k: u64) -> Vec<u8> {
    let base = k * BLOCK as u64;
    (0..BLOCK as u64 / 8)
        .flat_map(|i| pattern_word(seed, base + 8 * i).to_le_bytes())
        .collect()
}

/// Serves the image of a power-cut disk with `vmm-ref export` (drive
/// options `drive`, two queues on two IOThreads) to a vhost-user front-end
/// that writes block `k` on queue `k % 2` and FLUSHes on queue `(k + 1) %
/// 2`, as the guest scenario does, then writes a few blocks without
/// flushing, cuts the power with a write in flight, kills the daemon and
/// checks the durable store.
fn run_export_case(name: &str, drive: &str, skip_flush: bool) -> Option<Outcome> {
    let disk = match PowerCutDisk::new(name, EXPORT_BLOCKS * BLOCK as u64) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIPPED: {e} -- {name}");
            return None;
        }
    };
    let dir = common::TempDir::new(name);
    let sock = dir.join("e0.sock");
    let args = [
        "export".to_owned(),
        "--drive".to_owned(),
        format!("id=d0,file={},{drive}", disk.image().display()),
        "--object".to_owned(),
        "iothread,id=io0".to_owned(),
        "--object".to_owned(),
        "iothread,id=io1".to_owned(),
        "--export".to_owned(),
        format!(
            "vhost-user-blk,id=e0,node-name=d0,addr=unix:{},num-queues=2,\
             iothread-vq-mapping=io0:io1,writable=on",
            sock.display()
        ),
    ];
    println!("{name}: vmm-ref {}", args.join(" "));
    let mut cmd = Command::new(VMM_REF);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if skip_flush {
        cmd.env(SKIP_FLUSH_ENV, "1");
    }
    let mut child = cmd.spawn().expect("spawn vmm-ref export");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let lines = line_channel(&mut child);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32)
        | 1;
    // 48..96 flushed blocks, then 3 written without a flush, then one in
    // flight at the cut.
    let flushed_blocks = 48 + seed % 48;
    let drive_front_end = || -> Result<(u64, VuBlk), String> {
        match lines.recv_timeout(EXPORT_TIMEOUT) {
            Ok(l) if l.starts_with("vmm-ref export: ready") => {}
            other => return Err(format!("no ready line: {other:?}")),
        }
        let mut vu = VuBlk::connect(&sock, 2, EXPORT_MEM, EXPORT_TIMEOUT)?;
        for k in 0..flushed_blocks + 3 {
            let q = (k % 2) as usize;
            let st = vu.write(q, k * BLOCK as u64 / SECTOR, &pattern_block(seed, k))?;
            if st != 0 {
                return Err(format!("write of block {k} on queue {q}: status {st}"));
            }
            if k < flushed_blocks {
                let st = vu.flush(1 - q)?;
                if st != 0 {
                    return Err(format!("flush after block {k}: status {st}"));
                }
            }
        }
        let k = flushed_blocks + 3;
        vu.prepare(
            0,
            T_OUT,
            k * BLOCK as u64 / SECTOR,
            &pattern_block(seed, k),
            0,
            Placement::of_queue(0),
        )?;
        vu.publish(0)?;
        Ok((flushed_blocks - 1, vu))
    };
    let driven = drive_front_end();
    let at_cut = disk.cut_power();
    let _ = child.kill();
    let status = child.wait().expect("wait for vmm-ref export");
    let stderr = stderr_reader.join().unwrap_or_default();
    let context = format!("daemon stderr:\n{stderr}");
    let last_flushed = match driven {
        Ok((k, _vu)) => k,
        Err(e) => panic!("{name}: {e}\nexit: {status}\n{context}"),
    };
    let image_data = disk.durable(0, EXPORT_BLOCKS as usize * BLOCK);
    let bad: Vec<_> = (0..=last_flushed)
        .filter_map(|k| check_block(&image_data, seed, k).map(|m| (k, m)))
        .collect();
    let beyond = (last_flushed + 1..EXPORT_BLOCKS)
        .filter(|&k| check_block(&image_data, seed, k).is_none())
        .count();
    println!(
        "{name}: power cut after {} flushed and 4 unflushed writes, then daemon killed \
         ({status}); at the cut {} FSYNCs had committed {} pages and {} pages were lost; \
         {} of blocks 0..={last_flushed} damaged; {beyond} later blocks durable",
        last_flushed + 1,
        at_cut.fsyncs,
        at_cut.committed_pages,
        at_cut.lost_pages,
        bad.len(),
    );
    Some(Outcome {
        last_flushed,
        bad,
        context,
    })
}

#[test]
fn export_flushed_writes_survive_power_cut_io_uring() {
    let Some(out) = run_export_case("export-io_uring", "aio=io_uring", false) else {
        return;
    };
    assert!(out.bad.is_empty(), "{:?}\n{}", out.bad, out.context);
}

#[test]
fn export_flushed_writes_survive_power_cut_threads_direct() {
    let Some(out) = run_export_case(
        "export-threads-direct",
        "aio=threads,cache.direct=on",
        false,
    ) else {
        return;
    };
    assert!(out.bad.is_empty(), "{:?}\n{}", out.bad, out.context);
}

#[test]
fn export_power_cut_check_detects_skipped_flushes() {
    for (name, drive) in [
        ("export-io_uring-skip-flush", "aio=io_uring"),
        ("export-threads-skip-flush", "aio=threads"),
    ] {
        let Some(out) = run_export_case(name, drive, true) else {
            return;
        };
        assert!(
            !out.bad.is_empty(),
            "{name}: flushes were skipped but all {} acknowledged blocks are durable\n{}",
            out.last_flushed + 1,
            out.context
        );
    }
}

/// Runs the test guest's write benchmark (4 KiB random writes, no FLUSH)
/// with `case` on a power-cut disk, stops the VM over QMP once the model has
/// served `MIN_WRITES` writes, and cuts the power right after `STOP`.
/// Returns the model's counters at the cut (`None` without FUSE).
fn stop_then_cut(case: &Case, skip_flush: bool) -> Option<common::powercut::Stats> {
    const MIN_WRITES: u64 = 200;
    let name = format!("stop-{}", case.name);
    let disk = match PowerCutDisk::new(&name, 64 << 20) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIPPED: {e} -- {name}");
            return None;
        }
    };
    let dir = common::TempDir::new(&name);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", sock.display());
    let drive = format!("id=d0,file={},{}", disk.image().display(), case.drive);
    let mut args = vec![
        "--kernel",
        env!("VMM_REF_GUEST_ELF"),
        "--memory",
        "256M",
        "--cmdline",
        "scenario=bench bench.secs=120 bench.rw=randwrite bench.qd=8",
        "--drive",
        &drive,
        "--qmp",
        &qmp_arg,
    ];
    for o in case.objects {
        args.extend(["--object", o]);
    }
    let env: &[(&str, &str)] = if skip_flush {
        &[(SKIP_FLUSH_ENV, "1")]
    } else {
        &[]
    };
    let vmm = common::Running::spawn_with_env(&args, env);
    vmm.expect_line("bench: start", TIMEOUT);
    let mut qmp = common::Qmp::connect(&sock, TIMEOUT);
    let deadline = Instant::now() + TIMEOUT;
    while disk.stats().writes < MIN_WRITES {
        assert!(
            Instant::now() < deadline,
            "{name}: the guest wrote {:?}",
            disk.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        qmp.execute("stop", serde_json::json!(null)),
        serde_json::json!({})
    );
    qmp.wait_event("STOP");
    let at_cut = disk.cut_power();
    println!("{name}: stopped after {MIN_WRITES}+ writes; at the cut: {at_cut:?}");
    assert!(at_cut.writes >= MIN_WRITES, "{name}: {at_cut:?}");
    // A stopped VM quits (its last flush meets the cut: an error, logged).
    qmp.execute("quit", serde_json::json!(null));
    vmm.wait(TIMEOUT);
    Some(at_cut)
}

/// QMP `stop` drains and flushes the drives, as QEMU's `vm_stop` does
/// (`bdrv_drain_all` + `bdrv_flush_all`): a guest writing without FLUSH is
/// stopped, and the power-cut model's volatile cache must then hold nothing,
/// i.e. every write the guest was told is complete is durable, and so is a
/// copy of the image taken while the VM is stopped. Before the flush at
/// stop, the pages written since the last commit were lost.
#[test]
fn stop_leaves_no_unflushed_write() {
    if !kvm_available("stop_leaves_no_unflushed_write") {
        return;
    }
    for case in [&IO_URING_4Q, &THREADS_2Q] {
        let Some(at_cut) = stop_then_cut(case, false) else {
            return;
        };
        assert_eq!(
            at_cut.lost_pages, 0,
            "{}: pages written before the stop were not flushed: {at_cut:?}",
            case.name
        );
        assert!(at_cut.fsyncs >= 1, "{}: {at_cut:?}", case.name);
    }
}

/// The check above can fail: with the VMM's flushes turned into no-ops the
/// cut finds written pages in the volatile cache.
#[test]
fn stop_check_detects_skipped_flushes() {
    if !kvm_available("stop_check_detects_skipped_flushes") {
        return;
    }
    let Some(at_cut) = stop_then_cut(&THREADS_2Q, true) else {
        return;
    };
    assert!(
        at_cut.lost_pages > 0,
        "flushes were skipped, yet nothing was in the cache: {at_cut:?}"
    );
}
