//! `vmm-ref demo`: boots the embedded test guest on a temporary 64 MiB disk
//! with two IOThreads serving a 4-queue drive (`iothread-vq-mapping=io0:io1`),
//! runs `verify` then a short `bench`, prints the guest's report, then the
//! IOThreads with their holders as captured while the device was active.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iothread_registry::IoThreadVqMapping;

use crate::config::cli::DemoArgs;
use crate::config::{
    self, AioMode, ByteSize, DriveConfig, IoThreadObject, Origin, QomType, VmConfig,
};
use crate::vm::stop::StopReason;
use crate::vmm::{Vmm, VmmOptions};

/// The test guest, built by `build.rs` from `guest/`.
pub static TEST_GUEST_ELF: &[u8] = include_bytes!(env!("VMM_REF_GUEST_ELF"));

/// Size of the demo disk.
const DISK_SIZE: u64 = 64 << 20;
/// How often the IOThread holders are sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// A directory under `$TMPDIR` removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> io::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("vmm-ref-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            log::warn!("cannot remove {}: {e}", self.0.display());
        }
    }
}

/// Guest serial output to stdout, also kept for the final check.
#[derive(Clone, Default)]
struct Tee(Arc<Mutex<Vec<u8>>>);

impl Write for Tee {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        io::stdout().write_all(b)?;
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// The demo VM: test guest, 2 IOThreads, one 4-queue drive mapped io0:io1.
pub fn demo_config(kernel: &Path, disk: &Path, bench_secs: u32) -> VmConfig {
    let iothread = |id: &str| IoThreadObject {
        qom_type: QomType::Iothread,
        id: id.to_owned(),
        poll_max_ns: None,
        poll_grow: None,
        poll_shrink: None,
        poll_weight: None,
        aio_max_batch: None,
        poll_algorithm: None,
    };
    VmConfig {
        kernel: kernel.to_owned(),
        initrd: None,
        boot: Default::default(),
        cmdline: format!("scenario=verify,bench bench.secs={bench_secs}"),
        memory: ByteSize(256 << 20),
        vcpus: 1,
        objects: vec![iothread("io0"), iothread("io1")],
        drives: vec![DriveConfig {
            id: "d0".to_owned(),
            file: disk.to_owned(),
            num_queues: 4,
            queue_size: 256,
            iothread: None,
            iothread_vq_mapping: Some(vec![
                IoThreadVqMapping::new("io0"),
                IoThreadVqMapping::new("io1"),
            ]),
            readonly: false,
            direct: false,
            aio: AioMode::Auto,
            serial: Some("vmm-ref-demo".to_owned()),
            locking: Default::default(),
        }],
        qmp: None,
        chardevs: Vec::new(),
        devices: Vec::new(),
    }
}

/// Runs the demo and returns the process exit status.
pub fn main(args: &DemoArgs) -> i32 {
    // `verify` provokes guest-triggered warnings on purpose (a read past the end);
    // keep the demo's output to the report unless VMM_REF_LOG asks for more.
    if std::env::var_os("VMM_REF_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Error);
    }
    match run(args) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("error: demo: {e}");
            crate::EXIT_FAILURE
        }
    }
}

fn run(args: &DemoArgs) -> Result<i32, String> {
    let dir = TempDir::new().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let kernel = dir.0.join("test-guest.elf");
    std::fs::write(&kernel, TEST_GUEST_ELF)
        .map_err(|e| format!("cannot write {}: {e}", kernel.display()))?;
    let disk = dir.0.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_SIZE))
        .map_err(|e| format!("cannot create {}: {e}", disk.display()))?;
    let cfg = demo_config(&kernel, &disk, args.bench_secs);
    let valid = config::validate(cfg, &Origin::Cli).map_err(|e| crate::error_chain(&e))?;
    println!(
        "demo: test guest ({} bytes), 64 MiB disk {}, IOThreads io0+io1, drive d0 num-queues=4 iothread-vq-mapping=io0:io1",
        TEST_GUEST_ELF.len(),
        disk.display()
    );
    println!("demo: guest command line: {}", valid.vm.cmdline);
    println!("---- guest serial output ----");
    let tee = Tee::default();
    let vmm = Vmm::start(
        valid,
        VmmOptions {
            serial_out: Some(Box::new(tee.clone())),
        },
    )
    .map_err(|e| crate::error_chain(&e))?;

    // Sample `info iothreads` while the drive is active: keep the snapshot that
    // shows the most holders.
    let mut best: Option<(usize, String, String)> = None;
    let reason = loop {
        if let Some(r) = vmm.stop_reason() {
            break r;
        }
        if vmm.query_block().iter().any(|b| b.activated) {
            let infos = vmm.registry().query_iothreads();
            let holders: usize = infos.iter().map(|i| i.holders.len()).sum();
            if best.as_ref().is_none_or(|(n, _, _)| holders > *n) {
                let json = serde_json::to_string_pretty(&infos).unwrap_or_default();
                best = Some((holders, vmm.registry().info_iothreads(), json));
            }
        }
        if let Some(r) = vmm.wait_timeout(SAMPLE_INTERVAL) {
            break r;
        }
    };
    let stats: Vec<String> = vmm
        .registry()
        .ids()
        .iter()
        .filter_map(|id| {
            vmm.registry().stats(id).ok().map(|s| {
                format!(
                    "  {id}: cpu={:.1}ms iterations={} successful_polls={} blocking_waits={} eventfd_wakeups={}",
                    s.cpu_time_ns as f64 / 1e6,
                    s.poll.iterations,
                    s.poll.successful_polls,
                    s.poll.blocking_waits,
                    s.poll.eventfd_wakeups
                )
            })
        })
        .collect();
    let blocks = vmm.query_block();
    let final_reason = vmm.shutdown();
    debug_assert_eq!(final_reason, reason);
    println!("---- end of guest output ----");
    println!("guest stopped: {reason}");
    for b in &blocks {
        println!(
            "drive {}: engine={} queues={} mapping={}",
            b.device,
            b.engine,
            b.num_queues,
            b.queues
                .iter()
                .map(|q| format!("vq{}->{}", q.queue, q.iothread))
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    match &best {
        Some((_, info, json)) => {
            println!("IOThreads while the device was active (info iothreads):");
            print!("{info}");
            println!("query-iothreads:");
            println!("{json}");
        }
        None => println!("IOThreads: the device never became active"),
    }
    if !stats.is_empty() {
        println!("IOThread statistics at the end of the run:");
        for s in &stats {
            println!("{s}");
        }
    }
    let out =
        String::from_utf8_lossy(&tee.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let verify_ok = out.lines().any(|l| l.starts_with("RESULT verify PASS"));
    let bench_ok = out.lines().any(|l| l.starts_with("RESULT bench PASS"));
    let held = best.as_ref().is_some_and(|(n, _, _)| *n >= 2);
    let status = reason.exit_status();
    let pass =
        status == 0 && verify_ok && bench_ok && held && matches!(reason, StopReason::DebugExit(0));
    println!(
        "demo: {} (guest status {status}, verify {}, bench {}, holders seen on both IOThreads: {})",
        if pass { "PASS" } else { "FAIL" },
        if verify_ok { "passed" } else { "failed" },
        if bench_ok { "passed" } else { "failed" },
        if held { "yes" } else { "no" }
    );
    Ok(if pass {
        0
    } else if status != 0 {
        status
    } else {
        crate::EXIT_FAILURE
    })
}
