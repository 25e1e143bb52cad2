//! Shared helpers for the black-box tests: they run the built `vmm-ref` binary.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Path of the binary under test.
pub const VMM_REF: &str = env!("CARGO_BIN_EXE_vmm-ref");

/// Generous limit for one VM run on a loaded, nested machine.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// True if /dev/kvm can be opened read-write; otherwise prints why the test is
/// skipped (visible with `--nocapture`).
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            println!("SKIPPED: /dev/kvm not available ({e}) -- {test}");
            false
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmm-ref-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Result of one run of the binary.
#[derive(Debug)]
pub struct Output {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `vmm-ref args...`, killing it after `timeout`.
pub fn run_vmm(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(VMM_REF)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm-ref");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// A minimal ELF64 with one PT_LOAD segment at 1 MiB whose entry is its start.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let phoff: u64 = 64;
    let code_off: u64 = 64 + 56;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF");
    e.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    e.extend_from_slice(&phoff.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    e.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    e.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    e.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(e.len(), 64);
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&code_off.to_le_bytes());
    e.extend_from_slice(&LOAD.to_le_bytes()); // p_vaddr
    e.extend_from_slice(&LOAD.to_le_bytes()); // p_paddr
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(e.len() as u64, code_off);
    e.extend_from_slice(code);
    e
}

/// 64-bit code: prints "OK:" and the kernel command line (via the zero page's
/// cmd_line_ptr in rsi+0x228) on COM1, then writes `status` to port 0xf4.
pub fn echo_cmdline_code(status: u8) -> Vec<u8> {
    let mut c = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'O', 0xee, // mov al,'O'; out dx,al
        0xb0, b'K', 0xee, // mov al,'K'; out dx,al
        0xb0, b':', 0xee, // mov al,':'; out dx,al
        0x8b, 0x9e, 0x28, 0x02, 0x00, 0x00, // mov ebx,[rsi+0x228]
        // loop:
        0x8a, 0x03, // mov al,[rbx]
        0x84, 0xc0, // test al,al
        0x74, 0x06, // jz done
        0xee, // out dx,al
        0x48, 0xff, 0xc3, // inc rbx
        0xeb, 0xf4, // jmp loop
        // done:
        0xb0, b'\n', 0xee, // mov al,'\n'; out dx,al
        0x66, 0xba, 0xf4, 0x00, // mov dx,0xf4
    ];
    c.extend_from_slice(&[0xb8, status, 0, 0, 0]); // mov eax, status
    c.extend_from_slice(&[0xef, 0xf4, 0xeb, 0xfd]); // out dx,eax; hlt; jmp $-1
    c
}
