//! Bad options: exit status 2, one message naming the option, and nothing
//! written to any disk. These run without /dev/kvm: validation happens before
//! the VM exists.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

struct Fixture {
    dir: TempDir,
    kernel: String,
    disk: String,
    original: Vec<u8>,
    mtime: std::time::SystemTime,
}

fn fixture(tag: &str) -> Fixture {
    let dir = TempDir::new(tag);
    let kernel = dir.join("k.elf");
    std::fs::write(&kernel, tiny_elf(&echo_cmdline_code(0))).unwrap();
    let disk = dir.join("disk.img");
    let original: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&disk, &original).unwrap();
    let mtime = std::fs::metadata(&disk).unwrap().modified().unwrap();
    Fixture {
        kernel: kernel.to_str().unwrap().to_owned(),
        disk: disk.to_str().unwrap().to_owned(),
        dir,
        original,
        mtime,
    }
}

impl Fixture {
    fn assert_disk_untouched(&self) {
        assert_eq!(std::fs::read(&self.disk).unwrap(), self.original);
        assert_eq!(
            std::fs::metadata(&self.disk).unwrap().modified().unwrap(),
            self.mtime
        );
    }
}

fn expect_error(args: &[&str], message: &str) -> Output {
    let out = run_vmm(args, T);
    assert_eq!(out.status, Some(2), "{args:?}: {out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one message: {out:?}");
    assert!(lines[0].starts_with("error: "), "{out:?}");
    assert!(
        lines[0].contains(message),
        "{args:?}: want {message:?} in {out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    out
}

#[test]
fn drive_option_errors_name_the_option_and_leave_the_disk_alone() {
    let f = fixture("cli-drive");
    let io = "iothread,id=io0";
    let cases: Vec<(String, &str)> = vec![
        (format!("id=d0,file={},iothread=io0,foo=1", f.disk), "error: --drive id=d0: unknown option 'foo'"),
        (format!("id=d0,file={},iothread=io0,readonly=yes", f.disk), "--drive id=d0: invalid value 'yes' for 'readonly'"),
        (format!("id=d0,file={},iothread=io9", f.disk), "--drive id=d0: invalid iothread-vq-mapping: IOThread \"io9\" object does not exist"),
        (format!("id=d0,file={},iothread-vq-mapping=io0:io0", f.disk), "--drive id=d0: invalid iothread-vq-mapping: duplicate IOThread name \"io0\""),
        (format!("id=d0,file={},iothread=io0,num-queues=0", f.disk), "--drive id=d0: num-queues must be between 1 and"),
        (format!("id=d0,file={},iothread=io0,queue-size=100", f.disk), "--drive id=d0: queue-size must be a power of 2"),
        (format!("id=d0,file={}", f.disk), "--drive id=d0: an IOThread is required"),
        (format!("id=d0,file={},iothread=io0,iothread-vq-mapping=io0", f.disk), "--drive id=d0: iothread and iothread-vq-mapping properties cannot be set at the same time"),
        (format!("id=d0,file={},iothread=io0,serial=123456789012345678901", f.disk), "--drive id=d0: serial must be at most 20 bytes"),
        (format!("id=d0,file={}/missing.img,iothread=io0", f.dir.path().display()), "--drive id=d0: cannot open"),
        (format!("id=0bad,file={},iothread=io0", f.disk), "--drive id=0bad: invalid drive id"),
    ];
    for (drive, msg) in &cases {
        expect_error(
            &["--kernel", &f.kernel, "--object", io, "--drive", drive],
            msg,
        );
        f.assert_disk_untouched();
    }
    // The same image twice read-write.
    let d0 = format!("id=d0,file={},iothread=io0", f.disk);
    let d1 = format!("id=d1,file={},iothread=io0", f.disk);
    expect_error(
        &[
            "--kernel", &f.kernel, "--object", io, "--drive", &d0, "--drive", &d1,
        ],
        "--drive id=d1: '",
    );
    f.assert_disk_untouched();
}

#[test]
fn other_option_errors() {
    let f = fixture("cli-other");
    let k = f.kernel.as_str();
    expect_error(
        &["--kernel", k, "--memory", "lots"],
        "--memory: invalid value 'lots'",
    );
    expect_error(&["--kernel", k, "--memory", "1M"], "--memory: memory size");
    expect_error(&["--kernel", k, "--vcpus", "0"], "--vcpus: number of vCPUs");
    expect_error(
        &["--kernel", "/nonexistent/k"],
        "--kernel: cannot open '/nonexistent/k'",
    );
    expect_error(&["--memory", "64M"], "--kernel is required");
    expect_error(
        &["--kernel", k, "--object", "iothread,id=io0,poll-weight=64"],
        "--object iothread,id=io0: invalid IOThread parameters",
    );
    expect_error(
        &["--kernel", k, "--object", "iothread,id=io0,bogus=1"],
        "--object iothread,id=io0: unknown option 'bogus'",
    );
    expect_error(
        &[
            "--kernel",
            k,
            "--object",
            "iothread,id=io0",
            "--object",
            "iothread,id=io0",
        ],
        "duplicate object id 'io0'",
    );
    expect_error(
        &["--kernel", k, "--qmp", "tcp:4444"],
        "--qmp: expected unix:/path",
    );
    // clap's own errors also exit with 2.
    let out = run_vmm(&["--kernel", k, "--bogus"], T);
    assert_eq!(out.status, Some(2), "{out:?}");
    let out = run_vmm(&["--kernel", k, "--vcpus", "x"], T);
    assert_eq!(out.status, Some(2), "{out:?}");
}

#[test]
fn json_config_errors() {
    let f = fixture("cli-json");
    let cfg = f.dir.join("vm.json");
    let write = |text: String| std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    write(format!(
        r#"{{"kernel": "{}", "drives": [{{"id": "d0", "file": "{}", "iothread": "io0", "foo": 1}}]}}"#,
        f.kernel, f.disk
    ));
    expect_error(&["--config", c], "unknown field `foo`");
    write(format!(
        r#"{{"kernel": "{}", "objects": [{{"qom-type": "iothread", "id": "io0"}}],
            "drives": [{{"id": "d0", "file": "{}", "num-queues": 2,
                         "iothread-vq-mapping": [{{"iothread": "io0", "vqs": [0]}}]}}]}}"#,
        f.kernel, f.disk
    ));
    expect_error(
        &["--config", c],
        "drives[0] (id=d0): invalid iothread-vq-mapping: missing vq 1 IOThread assignment",
    );
    write("{not json".into());
    expect_error(&["--config", c], &format!("--config {c}: "));
    // A clap error (with its usage lines), also status 2.
    let out = run_vmm(&["--config", c, "--kernel", &f.kernel], T);
    assert_eq!(out.status, Some(2), "{out:?}");
    assert!(
        out.stderr
            .starts_with("error: the argument '--config <FILE>' cannot be used with"),
        "{out:?}"
    );
    f.assert_disk_untouched();
}
