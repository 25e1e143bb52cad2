//! The command line (clap), in QEMU's vocabulary, turned into a [`VmConfig`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use iothread_registry::IoThreadVqMapping;

use super::keyval::{parse_size, KeyVals, OptionError};
use super::{
    load_json, AioMode, ByteSize, ConfigError, DriveConfig, InvalidOption, IoThreadObject, Origin,
    QmpAddr, QomType, VmConfig, DEFAULT_MEMORY, DEFAULT_QUEUE_SIZE,
};

/// vmm-ref: a reference VMM on KVM with multi-queue virtio-blk served by IOThreads.
#[derive(Debug, Parser)]
#[command(name = "vmm-ref", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// `run` (the default when options are given directly) or `demo`.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of the implicit `run`.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest (the default).
    Run(RunArgs),
    /// Boot the embedded test guest on a temporary disk: verify, then a short bench.
    Demo(DemoArgs),
    /// Serve drives to vhost-user front-ends (vhost-user-blk exports on IOThreads).
    Export(ExportArgs),
}

/// Options of `run`.
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// Kernel image: ELF64 x86-64 (PVH entry if it has the note, else its 64-bit entry) or bzImage.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (virtio_mmio.device= and tsc_khz= are appended).
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// Boot protocol: `auto` (the default: PVH if the ELF has the PVH note, else the 64-bit entry), `linux64` or `pvh`.
    #[arg(long, value_name = "auto|linux64|pvh")]
    pub boot: Option<crate::vm::boot::BootProtocol>,
    /// Guest RAM, e.g. 256M or 1G.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// `iothread,id=ID[,poll-max-ns=N][,poll-grow=N][,poll-shrink=N][,poll-weight=N][,aio-max-batch=N][,poll-algorithm=weighted|classic]` (repeatable).
    #[arg(long = "object", value_name = "iothread,id=ID,...")]
    pub objects: Vec<String>,
    /// `id=ID,file=PATH[,num-queues=N][,queue-size=N][,iothread=ID | iothread-vq-mapping=ID:ID...][,readonly=on][,direct=on][,aio=io_uring|threads|auto][,serial=S][,locking=auto|on|off]` (repeatable).
    #[arg(long = "drive", value_name = "id=ID,file=PATH,...")]
    pub drives: Vec<String>,
    /// QMP monitor socket: `unix:/path`.
    #[arg(long, value_name = "unix:PATH")]
    pub qmp: Option<String>,
    /// `socket,id=ID,path=PATH` (repeatable): a vhost-user back-end's socket.
    #[arg(long = "chardev", value_name = "socket,id=ID,path=PATH")]
    pub chardevs: Vec<String>,
    /// `vhost-user-blk,id=ID,chardev=ID[,num-queues=N][,queue-size=N][,reconnect=SECONDS]` (repeatable).
    #[arg(long = "device", value_name = "vhost-user-blk,id=ID,chardev=ID,...")]
    pub devices: Vec<String>,
    /// The whole configuration as a JSON file (instead of the options above).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kernel", "initrd", "cmdline", "memory", "vcpus", "objects", "drives", "qmp", "chardevs", "devices"])]
    pub config: Option<PathBuf>,
}

/// Options of `export` (QEMU's `qemu-storage-daemon` vocabulary).
#[derive(Debug, Default, Args)]
pub struct ExportArgs {
    /// `id=ID,file=PATH[,readonly=on][,cache.direct=on][,aio=auto|io_uring|threads][,locking=auto|on|off]` (repeatable): a drive (block node) exports refer to by `node-name`.
    #[arg(long = "drive", value_name = "id=ID,file=PATH,...")]
    pub drives: Vec<String>,
    /// `iothread,id=ID[,poll-max-ns=N][,poll-grow=N][,poll-shrink=N][,poll-weight=N][,aio-max-batch=N][,poll-algorithm=weighted|classic]` (repeatable).
    #[arg(long = "object", value_name = "iothread,id=ID,...")]
    pub objects: Vec<String>,
    /// `vhost-user-blk,id=ID,node-name=DRIVE,addr=unix:PATH[,num-queues=N][,iothread=ID | iothread-vq-mapping=ID:ID...][,writable=on|off]` (repeatable).
    #[arg(long = "export", value_name = "vhost-user-blk,id=ID,...")]
    pub exports: Vec<String>,
    /// QMP monitor socket: `unix:/path` (block-export-add/-del, query-block-exports, ...).
    #[arg(long, value_name = "unix:PATH")]
    pub qmp: Option<String>,
}

/// Smallest `demo --bench-secs`: the test guest refuses `bench.secs=0` (it
/// takes any positive count, `bench.secs` being a u64; `--bench-secs` is a
/// u32, so [`MAX_BENCH_SECS`] is the type's limit).
pub const MIN_BENCH_SECS: u32 = 1;
/// Largest `demo --bench-secs`.
pub const MAX_BENCH_SECS: u32 = u32::MAX;

/// Options of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Seconds of benchmark after the verify scenario, 1..=4294967295.
    #[arg(
        long,
        default_value_t = 2,
        value_name = "N",
        value_parser = clap::value_parser!(u32)
            .range(i64::from(MIN_BENCH_SECS)..=i64::from(MAX_BENCH_SECS))
    )]
    pub bench_secs: u32,
}

/// Parses `--object iothread,id=io0,...`.
pub fn parse_object(s: &str) -> Result<IoThreadObject, ConfigError> {
    let fail = |label: String, e: OptionError| ConfigError::Option {
        option: label,
        source: InvalidOption::Parse(e),
    };
    let mut kv =
        KeyVals::parse(s, Some("qom-type")).map_err(|e| fail(format!("--object {s}"), e))?;
    let label = match kv.peek("id") {
        Some(id) => format!("--object iothread,id={id}"),
        None => format!("--object {s}"),
    };
    let inner = || -> Result<IoThreadObject, OptionError> {
        let ty = kv.take_required("qom-type")?;
        if ty != "iothread" {
            return Err(OptionError::InvalidValue {
                key: "qom-type".into(),
                value: ty,
                expected: "iothread (the only object type vmm-ref supports)".into(),
            });
        }
        let id = kv.take_required("id")?;
        let obj = IoThreadObject {
            qom_type: QomType::Iothread,
            id,
            poll_max_ns: kv.take_int("poll-max-ns")?,
            poll_grow: kv.take_int("poll-grow")?,
            poll_shrink: kv.take_int("poll-shrink")?,
            poll_weight: kv.take_int("poll-weight")?,
            aio_max_batch: kv.take_int("aio-max-batch")?,
            poll_algorithm: kv.take_with("poll-algorithm", "weighted or classic", |v| {
                v.parse::<aio_poll::PollAlgorithm>().ok()
            })?,
        };
        kv.finish()?;
        Ok(obj)
    };
    inner().map_err(|e| fail(label, e))
}

/// Parses `iothread-vq-mapping=io0:io1` (round-robin over the listed IOThreads).
fn parse_mapping(v: &str) -> Option<Vec<IoThreadVqMapping>> {
    let ids: Vec<&str> = v.split(':').collect();
    if ids.iter().any(|id| id.is_empty()) {
        return None;
    }
    Some(ids.into_iter().map(IoThreadVqMapping::new).collect())
}

/// Parses `--drive id=d0,file=...`.
pub fn parse_drive(s: &str) -> Result<DriveConfig, ConfigError> {
    let fail = |label: String, e: OptionError| ConfigError::Option {
        option: label,
        source: InvalidOption::Parse(e),
    };
    let mut kv = KeyVals::parse(s, None).map_err(|e| fail(format!("--drive {s}"), e))?;
    let label = match kv.peek("id") {
        Some(id) => format!("--drive id={id}"),
        None => format!("--drive {s}"),
    };
    let inner = || -> Result<DriveConfig, OptionError> {
        let d = DriveConfig {
            id: kv.take_required("id")?,
            file: kv.take_required("file")?.into(),
            num_queues: kv.take_int("num-queues")?.unwrap_or(1),
            queue_size: kv.take_int("queue-size")?.unwrap_or(DEFAULT_QUEUE_SIZE),
            iothread: kv.take("iothread"),
            iothread_vq_mapping: kv.take_with(
                "iothread-vq-mapping",
                "IOThread ids separated by ':' (e.g. io0:io1)",
                parse_mapping,
            )?,
            readonly: kv.take_bool("readonly")?.unwrap_or(false),
            direct: kv.take_bool("direct")?.unwrap_or(false),
            aio: kv
                .take_with("aio", "io_uring, threads or auto", AioMode::parse)?
                .unwrap_or_default(),
            serial: kv.take("serial"),
            locking: kv
                .take_with("locking", "on, off or auto", |v| v.parse().ok())?
                .unwrap_or_default(),
        };
        kv.finish()?;
        Ok(d)
    };
    inner().map_err(|e| fail(label, e))
}

impl RunArgs {
    /// Builds the configuration from the options or the `--config` file.
    pub fn into_config(self) -> Result<(VmConfig, Origin), ConfigError> {
        if let Some(path) = self.config {
            let cfg = load_json(&path)?;
            return Ok((cfg, Origin::File(path)));
        }
        let kernel = self.kernel.ok_or(ConfigError::MissingKernel)?;
        let memory = match self.memory {
            None => ByteSize(DEFAULT_MEMORY),
            Some(m) => ByteSize(parse_size(&m).ok_or_else(|| ConfigError::Option {
                option: "--memory".into(),
                source: InvalidOption::Parse(OptionError::InvalidValue {
                    key: "memory".into(),
                    value: m.clone(),
                    expected: "a size like 256M or 1G".into(),
                }),
            })?),
        };
        let qmp = match self.qmp {
            None => None,
            Some(q) => Some(QmpAddr::try_from(q).map_err(|msg| ConfigError::Option {
                option: "--qmp".into(),
                source: InvalidOption::Message(msg),
            })?),
        };
        let cfg = VmConfig {
            kernel,
            initrd: self.initrd,
            cmdline: self.cmdline.unwrap_or_default(),
            boot: self.boot.unwrap_or_default(),
            memory,
            vcpus: self.vcpus.unwrap_or(1),
            objects: self
                .objects
                .iter()
                .map(|o| parse_object(o))
                .collect::<Result<_, _>>()?,
            drives: self
                .drives
                .iter()
                .map(|d| parse_drive(d))
                .collect::<Result<_, _>>()?,
            qmp,
            chardevs: self
                .chardevs
                .iter()
                .map(|c| super::vhost_user::parse_chardev(c))
                .collect::<Result<_, _>>()?,
            devices: self
                .devices
                .iter()
                .map(|d| super::vhost_user::parse_device(d))
                .collect::<Result<_, _>>()?,
        };
        Ok((cfg, Origin::Cli))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }

    #[test]
    fn full_drive() {
        let d = parse_drive(
            "id=d0,file=disk.img,num-queues=4,queue-size=128,iothread-vq-mapping=io0:io1,readonly=on,direct=off,aio=threads,serial=abc",
        )
        .unwrap();
        assert_eq!(d.id, "d0");
        assert_eq!(d.num_queues, 4);
        assert_eq!(d.queue_size, 128);
        assert_eq!(
            d.iothread_vq_mapping,
            Some(vec![
                IoThreadVqMapping::new("io0"),
                IoThreadVqMapping::new("io1")
            ])
        );
        assert!(d.readonly && !d.direct);
        assert_eq!(d.aio, AioMode::Threads);
        assert_eq!(d.serial.as_deref(), Some("abc"));
    }

    #[test]
    fn drive_defaults() {
        let d = parse_drive("id=d0,file=x,iothread=io0").unwrap();
        assert_eq!(
            (d.num_queues, d.queue_size, d.readonly, d.aio),
            (1, 256, false, AioMode::Auto)
        );
        assert_eq!(d.iothread.as_deref(), Some("io0"));
    }

    #[test]
    fn drive_errors_name_the_option() {
        let cases = [
            ("id=d0,file=x,foo=1", "--drive id=d0: unknown option 'foo'"),
            ("id=d0,file=x,readonly=yes", "--drive id=d0: invalid value 'yes' for 'readonly': expected on, off, true or false"),
            ("id=d0,file=x,num-queues=-1", "--drive id=d0: invalid value '-1' for 'num-queues'"),
            ("id=d0,file=x,aio=native", "--drive id=d0: invalid value 'native' for 'aio': expected io_uring, threads or auto"),
            ("id=d0,file=x,iothread-vq-mapping=io0::io1", "--drive id=d0: invalid value 'io0::io1' for 'iothread-vq-mapping'"),
            ("id=d0", "--drive id=d0: missing required option 'file'"),
            ("file=x", "--drive file=x: missing required option 'id'"),
            ("id=d0,id=d1,file=x", "--drive id=d0,id=d1,file=x: option 'id' given twice"),
            ("id=d0,file=x,direct", "--drive id=d0,file=x,direct: expected key=value, got 'direct'"),
        ];
        for (input, want) in cases {
            let e = parse_drive(input).unwrap_err();
            let got = chain(&e);
            assert!(got.starts_with(want), "{input}: got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn objects() {
        let o = parse_object("iothread,id=io0,poll-max-ns=32768,poll-grow=2,poll-shrink=2,poll-weight=3,aio-max-batch=0").unwrap();
        assert_eq!(o.id, "io0");
        assert_eq!(o.poll_max_ns, Some(32768));
        assert_eq!(o.poll_weight, Some(3));
        let o = parse_object("qom-type=iothread,id=io1,poll-algorithm=classic").unwrap();
        assert_eq!(o.poll_algorithm, Some(aio_poll::PollAlgorithm::Classic));
        let e = chain(&parse_object("memory-backend-ram,id=m").unwrap_err());
        assert!(
            e.starts_with(
                "--object iothread,id=m: invalid value 'memory-backend-ram' for 'qom-type'"
            ),
            "{e}"
        );
        let e = chain(&parse_object("iothread,id=io0,poll-max=1").unwrap_err());
        assert_eq!(e, "--object iothread,id=io0: unknown option 'poll-max'");
        let e = chain(&parse_object("iothread,id=io0,poll-max-ns=abc").unwrap_err());
        assert!(e.contains("invalid value 'abc' for 'poll-max-ns'"), "{e}");
        assert!(parse_object("iothread").is_err());
    }

    #[test]
    fn clap_shapes() {
        let cli = Cli::try_parse_from([
            "vmm-ref",
            "--kernel",
            "k",
            "--object",
            "iothread,id=io0",
            "--object",
            "iothread,id=io1",
            "--drive",
            "id=d0,file=f,iothread=io0",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.objects.len(), 2);
        let cli =
            Cli::try_parse_from(["vmm-ref", "run", "--kernel", "k", "--memory", "64M"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Run(_))));
        let cli = Cli::try_parse_from(["vmm-ref", "demo"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Demo(DemoArgs { bench_secs: 2 }))
        ));
        assert!(Cli::try_parse_from(["vmm-ref", "--config", "c.json", "--kernel", "k"]).is_err());
        // --bench-secs: what the test guest's bench.secs= takes, as --help says.
        let range = format!("{MIN_BENCH_SECS}..={MAX_BENCH_SECS}");
        for bad in ["0", "4294967296"] {
            let e = Cli::try_parse_from(["vmm-ref", "demo", "--bench-secs", bad]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
            assert!(e.to_string().contains(&format!("is not in {range}")), "{e}");
        }
        let cli = Cli::try_parse_from(["vmm-ref", "demo", "--bench-secs", "4294967295"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Demo(DemoArgs {
                bench_secs: MAX_BENCH_SECS
            }))
        ));
        let mut demo = <Cli as clap::CommandFactory>::command();
        let help = demo
            .find_subcommand_mut("demo")
            .unwrap()
            .render_help()
            .to_string();
        assert!(help.contains(&range), "{help}");
        assert!(Cli::try_parse_from(["vmm-ref", "--bogus"]).is_err());
    }

    #[test]
    fn run_args_into_config() {
        let args = RunArgs {
            kernel: Some("k".into()),
            memory: Some("1G".into()),
            qmp: Some("unix:/tmp/q".into()),
            ..Default::default()
        };
        let (cfg, _) = args.into_config().unwrap();
        assert_eq!(cfg.memory, ByteSize(1 << 30));
        let args = RunArgs {
            kernel: Some("k".into()),
            memory: Some("lots".into()),
            ..Default::default()
        };
        let e = chain(&args.into_config().unwrap_err());
        assert!(e.starts_with("--memory: invalid value 'lots'"), "{e}");
        assert!(matches!(
            RunArgs::default().into_config(),
            Err(ConfigError::MissingKernel)
        ));
        let args = RunArgs {
            kernel: Some("k".into()),
            qmp: Some("tcp:4444".into()),
            ..Default::default()
        };
        assert_eq!(
            chain(&args.into_config().unwrap_err()),
            "--qmp: expected unix:/path, got 'tcp:4444'"
        );
    }
}
