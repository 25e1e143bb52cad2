//! Boot path with hand-assembled 64-bit guests (no test guest needed): the
//! 64-bit boot protocol (entry, zero page, command line), the serial port, the
//! debug-exit port, the i8042 reset, a triple fault.

mod common;

use common::*;

fn write_guest(dir: &TempDir, code: &[u8]) -> String {
    let path = dir.join("tiny.elf");
    std::fs::write(&path, tiny_elf(code)).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn serial_cmdline_and_debug_exit_status() {
    if !kvm_available("serial_cmdline_and_debug_exit_status") {
        return;
    }
    let dir = TempDir::new("tiny");
    let kernel = write_guest(&dir, &echo_cmdline_code(42));
    let out = run_vmm(
        &[
            "--kernel",
            &kernel,
            "--memory",
            "64M",
            "--cmdline",
            "hello world",
        ],
        RUN_TIMEOUT,
    );
    assert_eq!(out.status, Some(42), "{out:?}");
    let line = out.stdout.lines().next().unwrap_or_default();
    assert!(line.starts_with("OK:hello world tsc_khz="), "{out:?}");
}

#[test]
fn bzimage_enters_at_the_64_bit_entry() {
    if !kvm_available("bzimage_enters_at_the_64_bit_entry") {
        return;
    }
    let dir = TempDir::new("bz");
    let kernel = dir.join("bzImage");
    std::fs::write(&kernel, tiny_bzimage(&echo_cmdline_code(7))).unwrap();
    let out = run_vmm(
        &["--kernel", kernel.to_str().unwrap(), "--cmdline", "bz"],
        RUN_TIMEOUT,
    );
    assert_eq!(out.status, Some(7), "{out:?}");
    assert!(out.stdout.starts_with("OK:bz tsc_khz="), "{out:?}");
}

#[test]
fn initrd_is_loaded_and_described_in_the_zero_page() {
    if !kvm_available("initrd_is_loaded_and_described_in_the_zero_page") {
        return;
    }
    let dir = TempDir::new("initrd");
    let kernel = write_guest(&dir, &echo_zero_page_string_code(0x218, 0));
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, b"hello from the initrd\0").unwrap();
    let out = run_vmm(
        &[
            "--kernel",
            &kernel,
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "32M",
        ],
        RUN_TIMEOUT,
    );
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(out.stdout, "OK:hello from the initrd\n", "{out:?}");
}

/// With more RAM than fits below the MMIO gap, the rest goes above 4 GiB: the
/// e820 map then has 4 entries (low RAM, RAM from 1 MiB, the gap, high RAM).
#[test]
fn ram_above_the_mmio_gap() {
    if !kvm_available("ram_above_the_mmio_gap") {
        return;
    }
    let dir = TempDir::new("highmem");
    let code = [
        0x0f, 0xb6, 0x86, 0xe8, 0x01, 0x00, 0x00, // movzx eax, byte [rsi+0x1e8]
        0x66, 0xba, 0xf4, 0x00, // mov dx,0xf4
        0xef, 0xf4, 0xeb, 0xfd, // out dx,eax; hlt; jmp $-1
    ];
    let kernel = write_guest(&dir, &code);
    let out = run_vmm(&["--kernel", &kernel, "--memory", "4G"], RUN_TIMEOUT);
    assert_eq!(out.status, Some(4), "{out:?}");
    let out = run_vmm(&["--kernel", &kernel, "--memory", "64M"], RUN_TIMEOUT);
    assert_eq!(out.status, Some(3), "{out:?}");
}

#[test]
fn status_zero_and_two_vcpus() {
    if !kvm_available("status_zero_and_two_vcpus") {
        return;
    }
    let dir = TempDir::new("tiny2");
    let kernel = write_guest(&dir, &echo_cmdline_code(0));
    let out = run_vmm(&["run", "--kernel", &kernel, "--vcpus", "2"], RUN_TIMEOUT);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("OK:tsc_khz="), "{out:?}");
}

#[test]
fn i8042_reset_is_a_clean_stop() {
    if !kvm_available("i8042_reset_is_a_clean_stop") {
        return;
    }
    let dir = TempDir::new("i8042");
    // mov al,0xfe; out 0x64,al; hlt; jmp $-1
    let kernel = write_guest(&dir, &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);
    let out = run_vmm(&["--kernel", &kernel], RUN_TIMEOUT);
    assert_eq!(out.status, Some(0), "{out:?}");
    assert!(out.stderr.contains("i8042"), "{out:?}");
}

#[test]
fn triple_fault_stops_the_vm() {
    if !kvm_available("triple_fault_stops_the_vm") {
        return;
    }
    let dir = TempDir::new("tf");
    // lidt [rip+0] with a zero-limit IDT, then int3 / ud2 => triple fault.
    let code = [
        0x0f, 0x01, 0x1d, 0x02, 0x00, 0x00, 0x00, // lidt [rip+2]
        0xeb, 0x0a, // jmp over the descriptor
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // limit 0, base 0
        0x0f, 0x0b, // ud2
    ];
    let kernel = write_guest(&dir, &code);
    let out = run_vmm(&["--kernel", &kernel], RUN_TIMEOUT);
    assert_crashed(&out);
}

/// The guest crashed: status 1 and the reason on stderr. With hardware
/// virtualisation a fault with no usable IDT is a triple fault
/// (KVM_EXIT_SHUTDOWN); on a PVM host the emulator may give up first
/// (KVM internal error). Neither is a clean stop.
fn assert_crashed(out: &Output) {
    assert_eq!(out.status, Some(1), "a crash is not a clean stop: {out:?}");
    let triple = "vmm-ref: vCPU 0 triple-faulted (KVM_EXIT_SHUTDOWN): the guest crashed";
    let failed = "vmm-ref: vCPU 0 failed: ";
    assert!(
        out.stderr.contains(triple) || out.stderr.contains(failed),
        "{out:?}"
    );
}

/// `--boot` defaults to `auto`: an ELF with the PVH note is entered at its
/// 32-bit PVH entry; `--boot linux64` enters the same image at `e_entry` in
/// long mode, where its 32-bit code faults.
#[test]
fn default_boot_uses_the_pvh_note() {
    if !kvm_available("default_boot_uses_the_pvh_note") {
        return;
    }
    let dir = TempDir::new("auto-pvh");
    let kernel = dir.join("pvh.elf");
    std::fs::write(
        &kernel,
        tiny_elf_with_pvh_note(&pvh_stub_code(33), Some(0x10_0000)),
    )
    .unwrap();
    let k = kernel.to_str().unwrap();
    let out = run_vmm(&["--kernel", k], RUN_TIMEOUT);
    assert_eq!(out.status, Some(33), "entered through PVH: {out:?}");
    let out = run_vmm(&["--kernel", k, "--boot", "auto"], RUN_TIMEOUT);
    assert_eq!(out.status, Some(33), "{out:?}");
    let out = run_vmm(&["--kernel", k, "--boot", "linux64"], RUN_TIMEOUT);
    assert_crashed(&out);
}

/// Without the PVH note, `auto` uses the 64-bit entry: an ELF whose entry is
/// 32-bit code then crashes, and that is reported, with status 1.
#[test]
fn default_boot_without_pvh_note_uses_the_64_bit_entry() {
    if !kvm_available("default_boot_without_pvh_note_uses_the_64_bit_entry") {
        return;
    }
    let dir = TempDir::new("auto-64");
    let kernel = write_guest(&dir, &pvh_stub_code(33));
    let out = run_vmm(&["--kernel", &kernel], RUN_TIMEOUT);
    assert_crashed(&out);
    // And a 64-bit image without the note boots as before.
    let kernel = write_guest(&dir, &echo_cmdline_code(5));
    let out = run_vmm(&["--kernel", &kernel], RUN_TIMEOUT);
    assert_eq!(out.status, Some(5), "{out:?}");
}

#[test]
fn pvh_boot_of_a_kernel_without_pvh_note_fails_cleanly() {
    if !kvm_available("pvh_boot_of_a_kernel_without_pvh_note_fails_cleanly") {
        return;
    }
    let dir = TempDir::new("nopvh");
    let kernel = write_guest(&dir, &echo_cmdline_code(0));
    let out = run_vmm(&["--kernel", &kernel, "--boot", "pvh"], RUN_TIMEOUT);
    assert_eq!(out.status, Some(2), "a configuration error: {out:?}");
    assert!(
        out.stderr.contains("the kernel has no PVH entry"),
        "{out:?}"
    );
}

#[test]
fn garbage_kernel_fails_cleanly() {
    if !kvm_available("garbage_kernel_fails_cleanly") {
        return;
    }
    let dir = TempDir::new("garbage");
    let kernel = dir.join("garbage.bin");
    std::fs::write(&kernel, vec![0x55u8; 4096]).unwrap();
    let out = run_vmm(&["--kernel", kernel.to_str().unwrap()], RUN_TIMEOUT);
    assert_eq!(out.status, Some(2), "a configuration error: {out:?}");
    assert!(
        out.stderr
            .contains("is neither an ELF nor a bzImage kernel"),
        "{out:?}"
    );
}

#[test]
fn sigterm_is_a_clean_shutdown() {
    if !kvm_available("sigterm_is_a_clean_shutdown") {
        return;
    }
    let dir = TempDir::new("sigterm");
    let kernel = write_guest(&dir, &echo_cmdline_then_halt_code());
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{}", sock.display());
    let stderr = dir.join("stderr");
    let vmm = Running::spawn_with_stderr_to(&["--kernel", &kernel, "--qmp", &qmp_arg], &stderr);
    vmm.expect_line("OK:", RUN_TIMEOUT);
    let mut qmp = Qmp::connect(&sock, RUN_TIMEOUT);
    // SAFETY: kill(2) with a valid pid and signal number touches no memory.
    let ret = unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    assert_eq!(ret, 0);
    let event = qmp.wait_event("SHUTDOWN");
    // QEMU's cause for a termination signal.
    assert_eq!(
        event["data"],
        serde_json::json!({"guest": false, "reason": "host-signal"})
    );
    assert_eq!(vmm.wait(RUN_TIMEOUT), Some(0));
    // One message, naming the signal and who sent it (this test).
    let stderr = std::fs::read_to_string(&stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line: {stderr:?}");
    let want = format!(
        "vmm-ref: terminating on signal 15 from pid {} (",
        std::process::id()
    );
    assert!(lines[0].starts_with(&want), "{stderr:?}");
}

/// stdin a terminal that hangs up (reads fail with EIO): the end of the
/// guest's input, not an error; a SIGTERM afterwards is the only message.
#[test]
fn a_terminal_hang_up_on_stdin_ends_input_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    if !kvm_available("a_terminal_hang_up_on_stdin_ends_input_quietly") {
        return;
    }
    let dir = TempDir::new("hangup");
    let kernel = write_guest(&dir, &echo_cmdline_then_halt_code());
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the two ints; the name,
    // termios and window-size pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // The child must not inherit the master: its copy would keep the
    // terminal from hanging up.
    for fd in [master, slave] {
        // SAFETY: F_SETFD on a descriptor openpty just returned.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        assert_eq!(rc, 0);
    }
    // SAFETY: openpty just returned these descriptors; nothing else owns them.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let stderr = dir.join("stderr");
    let vmm = Running::spawn_with_stdio(
        &["--kernel", &kernel],
        std::process::Stdio::from(slave),
        std::process::Stdio::from(std::fs::File::create(&stderr).unwrap()),
    );
    vmm.expect_line("OK:", RUN_TIMEOUT);
    drop(master);
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: kill(2) with a valid pid and signal number touches no memory.
    let rc = unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    assert_eq!(vmm.wait(RUN_TIMEOUT), Some(0));
    let stderr = std::fs::read_to_string(&stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "only the signal's line: {stderr:?}");
    assert!(
        lines[0].starts_with("vmm-ref: terminating on signal 15"),
        "{stderr:?}"
    );
}

#[test]
fn stdin_reaches_the_guest_serial_port() {
    if !kvm_available("stdin_reaches_the_guest_serial_port") {
        return;
    }
    use std::io::Write;
    let dir = TempDir::new("stdin");
    // Poll LSR.DR, read RBR, exit with the byte as status.
    let code = [
        0x66, 0xba, 0xfd, 0x03, // mov dx,0x3fd
        0xec, // l: in al,dx
        0xa8, 0x01, // test al,1
        0x74, 0xfb, // jz l
        0x66, 0xba, 0xf8, 0x03, // mov dx,0x3f8
        0xec, // in al,dx
        0x0f, 0xb6, 0xc0, // movzx eax,al
        0x66, 0xba, 0xf4, 0x00, // mov dx,0xf4
        0xef, // out dx,eax
        0xf4, 0xeb, 0xfd, // hlt; jmp $-1
    ];
    let kernel = write_guest(&dir, &code);
    let mut child = std::process::Command::new(VMM_REF)
        .args(["--kernel", &kernel])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"A").unwrap();
    let deadline = std::time::Instant::now() + RUN_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status, Some(i32::from(b'A')));
}

/// On PVM hosts (CPL0 emulated) `popcnt` at CPL0 is an emulation failure: the
/// VMM must report KVM's internal error with its details and exit 1. With
/// hardware virtualisation the instruction just runs and the guest exits 0.
#[test]
fn emulation_failure_is_reported_with_details() {
    if !kvm_available("emulation_failure_is_reported_with_details") {
        return;
    }
    let dir = TempDir::new("emufail");
    let code = [
        0xf3, 0x0f, 0xb8, 0xc3, // popcnt eax,ebx
        0x66, 0xba, 0xf4, 0x00, // mov dx,0xf4
        0x31, 0xc0, // xor eax,eax
        0xef, 0xf4, 0xeb, 0xfd, // out dx,eax; hlt; jmp $-1
    ];
    let kernel = write_guest(&dir, &code);
    let out = run_vmm(&["--kernel", &kernel], RUN_TIMEOUT);
    match out.status {
        Some(0) => println!("popcnt ran natively: no emulation failure on this host"),
        Some(1) => {
            assert!(
                out.stderr
                    .contains("vCPU 0 failed: KVM internal error, suberror 1"),
                "{out:?}"
            );
            assert!(out.stderr.contains("rip=0x100000"), "{out:?}");
        }
        _ => panic!("{out:?}"),
    }
}
