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
    // No part of the cause chain printed twice ("x: y: y").
    let parts: Vec<&str> = lines[0].split(": ").collect();
    assert!(
        parts.windows(2).all(|w| w[0] != w[1]),
        "a cause is repeated: {out:?}"
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
        (format!("id=d0,file={},iothread=io0,locking=maybe", f.disk), "--drive id=d0: invalid value 'maybe' for 'locking': expected on, off or auto"),
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
    // ... and under other names: a hard link, a symlink, a relative path. The
    // drive that was there first is named (not an image lock held by our own
    // process).
    let link = f.dir.join("hard.img");
    std::fs::hard_link(&f.disk, &link).unwrap();
    let sym = f.dir.join("sym.img");
    std::os::unix::fs::symlink(&f.disk, &sym).unwrap();
    let cwd = std::env::current_dir().unwrap();
    let relative = pathdiff(std::path::Path::new(&f.disk), &cwd);
    for other in [link.to_str().unwrap(), sym.to_str().unwrap(), &relative] {
        let d1 = format!("id=d1,file={other},iothread=io0");
        expect_error(
            &[
                "--kernel", &f.kernel, "--object", io, "--drive", &d0, "--drive", &d1,
            ],
            &format!("--drive id=d1: '{other}' is already used by drive 'd0'"),
        );
        f.assert_disk_untouched();
    }
    // Read-only drives still share one image, under any name.
    let r0 = format!("id=d0,file={},iothread=io0,readonly=on", f.disk);
    let r1 = format!("id=d1,file={},iothread=io0,readonly=on", link.display());
    let out = run_vmm(
        &[
            "--kernel", &f.kernel, "--object", io, "--drive", &r0, "--drive", &r1,
        ],
        T,
    );
    assert!(
        !out.stderr.contains("already used"),
        "read-only drives share: {out:?}"
    );
    f.assert_disk_untouched();
}

/// `target` relative to `base` (both absolute): `../..` up to the common
/// prefix, then down.
fn pathdiff(target: &std::path::Path, base: &std::path::Path) -> String {
    let t: Vec<_> = target.components().collect();
    let b: Vec<_> = base.components().collect();
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec!["..".into(); b.len() - common];
    parts.extend(
        t[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
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
    // Every value out of range gets the same message (256 used to get the
    // argument parser's "256 is not in 0..=255").
    for n in ["33", "256", "100000"] {
        expect_error(
            &["--kernel", k, "--vcpus", n],
            "--vcpus: number of vCPUs must be between 1 and 32",
        );
    }
    expect_error(
        &["--kernel", "/nonexistent/k"],
        "--kernel: cannot open '/nonexistent/k'",
    );
    expect_error(&["--memory", "64M"], "--kernel is required");
    // The argument parser's own errors are one line too (clap adds a usage
    // block of its own).
    expect_error(
        &["--kernel", k, "--vcpus", "1", "--vcpus", "2"],
        "error: the argument '--vcpus <N>' cannot be used multiple times (see --help)",
    );
    expect_error(&["--kernel", k, "--bogus"], "unexpected argument '--bogus'");
    expect_error(&["export", "--bogus"], "unexpected argument '--bogus'");
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
    // Socket paths longer than sun_path, in the JSON form too.
    let long_sock = socket_path_of_len(f.dir.path(), MAX_SOCKET_PATH + 1);
    let too_long = format!(
        "socket path is {} bytes long; the limit is {MAX_SOCKET_PATH}",
        MAX_SOCKET_PATH + 1
    );
    write(format!(
        r#"{{"kernel": "{}", "qmp": "unix:{long_sock}"}}"#,
        f.kernel
    ));
    expect_error(&["--config", c], &format!("--config {c}: {too_long}"));
    write(format!(
        r#"{{"kernel": "{}", "chardevs": [{{"backend": "socket", "id": "c0", "path": "{long_sock}"}}],
            "devices": [{{"driver": "vhost-user-blk", "id": "vu0", "chardev": "c0"}}]}}"#,
        f.kernel
    ));
    expect_error(
        &["--config", c],
        &format!("--config {c}: chardevs[0] (id=c0): {too_long}"),
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

/// Everything the README promises is refused "before any VM exists" (status
/// 2, one message) instead of failing after the VM was built (status 1).
#[test]
fn configuration_errors_exit_2_before_any_vm() {
    let f = fixture("cli-config");
    let d = f.dir.path();
    let file = |name: &str, bytes: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let elf = std::fs::read(&f.kernel).unwrap();
    let text = file("notes.txt", b"not a kernel\n");
    let empty = file("empty.elf", b"");
    let short_header = file("short-header.elf", &elf[..40]);
    let short_segment = file("short-segment.elf", &elf[..elf.len() - 8]);
    let dir = d.to_str().unwrap().to_owned();
    let disk0 = file("zero.img", b"");
    let disk1 = file("one.img", b"x");
    let initrd = d.join("big.initrd");
    std::fs::File::create(&initrd)
        .and_then(|f| f.set_len(20 << 20))
        .unwrap();
    let initrd = initrd.to_str().unwrap().to_owned();
    let regular = file("qmp.txt", b"");
    let fifo = d.join("fifo.img");
    mkfifo(&fifo);
    let fifo = fifo.to_str().unwrap().to_owned();
    let not_an_image = format!("--drive id=d0: '{fifo}' is not a regular file or block device");
    let long_cmdline = "a".repeat(100 * 1024);
    // One byte more than sun_path holds (with its NUL), in a directory that exists.
    let long_sock = socket_path_of_len(d, MAX_SOCKET_PATH + 1);
    let too_long = format!(
        "socket path is {} bytes long; the limit is {MAX_SOCKET_PATH}",
        MAX_SOCKET_PATH + 1
    );
    let k = f.kernel.as_str();
    let drive = |img: &str, extra: &str| format!("id=d0,file={img},iothread=io0{extra}");
    let with_drive = |kernel: &str, drive: String| -> Vec<String> {
        vec![
            "--kernel".into(),
            kernel.into(),
            "--object".into(),
            "iothread,id=io0".into(),
            "--drive".into(),
            drive,
        ]
    };
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            owned(&["--kernel", &text]),
            format!("--kernel: '{text}' is neither an ELF nor a bzImage kernel"),
        ),
        (
            owned(&["--kernel", &empty]),
            format!("--kernel: '{empty}' is empty"),
        ),
        (
            owned(&["--kernel", &short_header]),
            "truncated ELF: the ELF header needs 64 bytes".into(),
        ),
        (
            owned(&["--kernel", &short_segment]),
            "truncated ELF: segment 0".into(),
        ),
        (
            owned(&["--kernel", &dir]),
            format!("--kernel: cannot open '{dir}': Is a directory"),
        ),
        (
            owned(&["--kernel", "/dev/null"]),
            "--kernel: '/dev/null' is not a regular file".into(),
        ),
        // A FIFO kernel or initrd is refused at once (open(2) used to wait
        // for a writer for ever).
        (
            owned(&["--kernel", &fifo]),
            format!("--kernel: '{fifo}' is not a regular file"),
        ),
        (
            owned(&["--kernel", k, "--initrd", &fifo]),
            format!("--initrd: '{fifo}' is not a regular file"),
        ),
        (
            owned(&["--kernel", k, "--boot", "pvh"]),
            "--boot: --boot pvh: the kernel has no PVH entry".into(),
        ),
        (
            with_drive(k, drive(&disk0, "")),
            format!("--drive id=d0: '{disk0}' is 0 bytes long, smaller than one 512-byte sector"),
        ),
        (
            with_drive(k, drive(&disk1, "")),
            format!("--drive id=d0: '{disk1}' is 1 bytes long"),
        ),
        // A FIFO, however it is opened: read-only must not wait for a writer.
        (
            with_drive(k, drive(&fifo, ",readonly=on")),
            not_an_image.clone(),
        ),
        (
            with_drive(k, drive(&fifo, ",readonly=on,direct=on")),
            not_an_image.clone(),
        ),
        (with_drive(k, drive(&fifo, "")), not_an_image.clone()),
        (
            with_drive(k, drive(&fifo, ",direct=on")),
            not_an_image.clone(),
        ),
        (
            with_drive(k, drive(&f.disk, ",queue-size=2")),
            "--drive id=d0: queue-size must be a power of 2 between 4 and 1024".into(),
        ),
        (
            owned(&["--kernel", k, "--memory", "16M", "--initrd", &initrd]),
            "--initrd: initrd of 20971520 bytes does not fit in guest RAM".into(),
        ),
        (
            owned(&["--kernel", k, "--initrd", &dir]),
            "--initrd: cannot open".into(),
        ),
        (
            owned(&["--kernel", k, "--cmdline", &long_cmdline]),
            "--cmdline: the kernel command line is 102".into(),
        ),
        (
            owned(&["--kernel", k, "--cmdline", "caf\u{e9}"]),
            "--cmdline: invalid kernel command line".into(),
        ),
        (
            owned(&["--kernel", k, "--qmp", &format!("unix:{regular}")]),
            format!("--qmp: '{regular}' exists and is not a socket"),
        ),
        (
            owned(&["--kernel", k, "--qmp", "unix:/nonexistent-dir/q.sock"]),
            "--qmp: directory '/nonexistent-dir' does not exist".into(),
        ),
        // A directory no socket can be created in (sysfs): bind(2) fails
        // before the VM is built (it used to fail after the guest ran, with
        // status 1).
        (
            owned(&["--kernel", k, "--qmp", "unix:/sys/qmp.sock"]),
            "--qmp: cannot create QMP socket \"/sys/qmp.sock\"".into(),
        ),
        // Paths bind(2)/connect(2) cannot take (they used to fail once the VM
        // was built, with status 1).
        (
            owned(&["--kernel", k, "--qmp", &format!("unix:{long_sock}")]),
            format!("--qmp: {too_long}"),
        ),
        (
            owned(&[
                "--kernel",
                k,
                "--chardev",
                &format!("socket,id=c0,path={long_sock}"),
                "--device",
                "vhost-user-blk,id=vu0,chardev=c0",
            ]),
            format!("--chardev id=c0: {too_long}"),
        ),
    ];
    for (args, message) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_error(&args, message);
        f.assert_disk_untouched();
    }
    assert_eq!(
        std::fs::read(&regular).unwrap(),
        b"",
        "the regular file is left alone"
    );
}

/// `demo --bench-secs` takes what the test guest's `bench.secs=` takes (a
/// positive count; `--bench-secs` is a u32): 0 used to boot the guest, which
/// refused `bench.secs=0` and ran its default 2 s, and the demo then printed
/// FAIL with status 1. `--help` gives the same range.
#[test]
fn demo_bench_secs_out_of_range_exits_2() {
    let range = format!("1..={}", u32::MAX);
    for bad in ["0", "4294967296", "-1"] {
        let out = run_vmm(&["demo", &format!("--bench-secs={bad}")], T);
        assert_eq!(out.status, Some(2), "{bad}: {out:?}");
        assert!(out.stdout.is_empty(), "{bad}: nothing ran: {out:?}");
        assert_eq!(
            out.stderr,
            format!("error: invalid value '{bad}' for '--bench-secs <N>': {bad} is not in {range} (see --help)\n"),
            "one line: {out:?}"
        );
    }
    let help = run_vmm(&["demo", "--help"], T);
    assert_eq!(help.status, Some(0), "{help:?}");
    let line = help
        .stdout
        .lines()
        .find(|l| l.contains("--bench-secs"))
        .unwrap_or_else(|| panic!("no --bench-secs in {help:?}"));
    assert!(line.contains(&range), "{line:?} should give {range}");
}
