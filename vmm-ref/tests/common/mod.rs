//! Shared helpers for the black-box tests: they run the built `vmm-ref` binary.
#![allow(dead_code)]

pub mod powercut;
pub mod vhost_user;

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

/// Creates a FIFO (named pipe) at `path`: opening one read-only blocks
/// until a writer comes, so it must be refused before any open can wait.
pub fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(
        rc,
        0,
        "mkfifo {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Longest Unix socket path: `sun_path` (108 bytes on Linux) less its NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// A path in `dir` (which must exist) of `len` bytes, for socket-path limits.
pub fn socket_path_of_len(dir: &Path, len: usize) -> String {
    let prefix = format!("{}/", dir.display());
    assert!(prefix.len() < len, "{prefix} is too long already");
    let p = format!("{prefix}{}", "s".repeat(len - prefix.len()));
    assert_eq!(p.len(), len);
    p
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
    tiny_elf_with_pvh_note(code, None)
}

/// [`tiny_elf`], plus a PT_NOTE with the PVH entry note
/// (`XEN_ELFNOTE_PHYS32_ENTRY`, name "Xen", an 8-byte descriptor) when
/// `pvh_entry` is given.
pub fn tiny_elf_with_pvh_note(code: &[u8], pvh_entry: Option<u64>) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let phoff: u64 = 64;
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let code_off: u64 = 64 + 56 * u64::from(phnum);
    let note_off = code_off + code.len() as u64;
    let note_len: u64 = 12 + 4 + 8;
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
    e.extend_from_slice(&phnum.to_le_bytes()); // e_phnum
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
    if pvh_entry.is_some() {
        e.extend_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        e.extend_from_slice(&4u32.to_le_bytes()); // R
        e.extend_from_slice(&note_off.to_le_bytes());
        e.extend_from_slice(&0u64.to_le_bytes()); // p_vaddr
        e.extend_from_slice(&0u64.to_le_bytes()); // p_paddr
        e.extend_from_slice(&note_len.to_le_bytes());
        e.extend_from_slice(&note_len.to_le_bytes());
        e.extend_from_slice(&4u64.to_le_bytes());
    }
    assert_eq!(e.len() as u64, code_off);
    e.extend_from_slice(code);
    if let Some(entry) = pvh_entry {
        e.extend_from_slice(&4u32.to_le_bytes()); // n_namesz
        e.extend_from_slice(&8u32.to_le_bytes()); // n_descsz
        e.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        e.extend_from_slice(b"Xen\0");
        e.extend_from_slice(&entry.to_le_bytes());
    }
    e
}

/// 32-bit protected-mode code (a PVH entry): writes `status` to the
/// debug-exit port. Entered in 64-bit mode instead, the same bytes decode
/// differently (`dec eax; mov eax, imm32` become `mov rax, imm64`) and run
/// into `ud2`: with no usable IDT, a triple fault.
pub fn pvh_stub_code(status: u8) -> Vec<u8> {
    vec![
        0x48, // 32-bit: dec eax | 64-bit: REX.W of the next instruction
        0xb8, 0x66, 0xba, 0xf4, 0x00, // mov eax, imm32 | mov rax, imm64 (8 bytes)...
        0xeb, 0x08, // 32-bit: jmp +8 (to offset 16) | ...imm64
        0x90, 0x90, // ...imm64
        0x0f, 0x0b, // 64-bit: ud2 (offset 10)
        0x90, 0x90, 0x90, 0x90, // padding
        0x66, 0xba, 0xf4, 0x00, // offset 16 (32-bit): mov dx,0xf4
        0xb8, status, 0, 0, 0,    // mov eax, status
        0xef, // out dx,eax
        0xf4, 0xeb, 0xfd, // hlt; jmp $-1
    ]
}

/// 64-bit code: prints "OK:" and the kernel command line (via the zero page's
/// cmd_line_ptr in rsi+0x228) on COM1, then writes `status` to port 0xf4.
pub fn echo_cmdline_code(status: u8) -> Vec<u8> {
    echo_zero_page_string_code(0x228, status)
}

/// 64-bit code: prints "OK:" and the NUL-terminated string whose 32-bit address
/// is at zero-page offset `ptr_offset` (0x228 command line, 0x218 initrd), then
/// writes `status` to port 0xf4.
pub fn echo_zero_page_string_code(ptr_offset: u16, status: u8) -> Vec<u8> {
    let [lo, hi] = ptr_offset.to_le_bytes();
    let mut c = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'O', 0xee, // mov al,'O'; out dx,al
        0xb0, b'K', 0xee, // mov al,'K'; out dx,al
        0xb0, b':', 0xee, // mov al,':'; out dx,al
        0x8b, 0x9e, lo, hi, 0x00, 0x00, // mov ebx,[rsi+ptr_offset]
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

/// 64-bit code: prints "OK:" + the command line, then halts with interrupts off
/// (the vCPU sleeps in the kernel until it is kicked).
pub fn echo_cmdline_then_halt_code() -> Vec<u8> {
    let mut c = echo_cmdline_code(0);
    // Drop the exit tail (mov dx,0xf4; mov eax,imm32; out; hlt; jmp) and halt instead.
    c.truncate(c.len() - 13);
    c.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp $-1
    c
}

/// 64-bit code: prints "OK:" + the command line, then a line "T" after every
/// busy loop of 2^16 iterations (~80 ms where CPL0 code is interpreted, as on
/// the nested KVM of our CI machines; far less on hardware KVM), for ever: a
/// guest whose progress shows on the console.
pub fn echo_cmdline_then_tick_code() -> Vec<u8> {
    let mut c = echo_cmdline_code(0);
    // Drop the exit tail; dx is still the serial port.
    c.truncate(c.len() - 13);
    c.extend_from_slice(&[
        0xb0, b'T', 0xee, // tick: mov al,'T'; out dx,al
        0xb0, b'\n', 0xee, // mov al,'\n'; out dx,al
        0xb9, 0x00, 0x00, 0x01, 0x00, // mov ecx, 1 << 16
        0xff, 0xc9, // delay: dec ecx
        0x75, 0xfc, // jnz delay
        0xeb, 0xef, // jmp tick
    ]);
    c
}

/// A spawned vmm-ref whose stdout lines arrive on a channel.
pub struct Running {
    pub child: std::process::Child,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Running {
    pub fn spawn(args: &[&str]) -> Running {
        Self::spawn_with(args, Stdio::null(), &[])
    }

    /// [`Running::spawn`] with extra environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Running {
        Self::spawn_with(args, Stdio::null(), env)
    }

    /// Like [`Running::spawn`], with stdin piped (the guest's serial input): see
    /// [`Running::send_input`].
    pub fn spawn_interactive(args: &[&str]) -> Running {
        Self::spawn_with(args, Stdio::piped(), &[])
    }

    /// Writes `bytes` to vmm-ref's stdin (the guest's serial console).
    pub fn send_input(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let stdin = self
            .child
            .stdin
            .as_mut()
            .expect("spawned with spawn_interactive");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Like [`Running::spawn`], with the given stdin and stderr.
    pub fn spawn_with_stdio(args: &[&str], stdin: Stdio, stderr: Stdio) -> Running {
        Self::spawn_full(args, stdin, &[], stderr)
    }

    /// Like [`Running::spawn`], with stderr written to the file `stderr`.
    pub fn spawn_with_stderr_to(args: &[&str], stderr: &Path) -> Running {
        let file = std::fs::File::create(stderr).expect("create the stderr file");
        Self::spawn_full(args, Stdio::null(), &[], Stdio::from(file))
    }

    fn spawn_with(args: &[&str], stdin: Stdio, env: &[(&str, &str)]) -> Running {
        Self::spawn_full(args, stdin, env, Stdio::inherit())
    }

    fn spawn_full(args: &[&str], stdin: Stdio, env: &[(&str, &str)], stderr: Stdio) -> Running {
        use std::io::BufRead;
        let mut child = Command::new(VMM_REF)
            .args(args)
            .envs(env.iter().copied())
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn vmm-ref");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        Running { child, lines: rx }
    }

    /// Waits for a stdout line containing `needle`; returns it.
    pub fn expect_line(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line containing {needle:?}: {e}"),
            }
        }
    }

    /// Waits for the exit status (kills after `timeout`).
    pub fn wait(mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
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
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal line-based QMP client (one JSON object per line).
pub struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    /// Connects (retrying while the socket appears), reads the greeting and
    /// negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Qmp {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to {}: {e}", path.display()),
            }
        };
        stream.set_read_timeout(Some(timeout)).unwrap();
        let mut q = Qmp {
            reader: std::io::BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        let r = q.execute("qmp_capabilities", serde_json::Value::Null);
        assert_eq!(r, serde_json::json!({}));
        q
    }

    /// Reads messages until event `name` arrives (replies before it are
    /// skipped) and returns it.
    pub fn wait_event(&mut self, name: &str) -> serde_json::Value {
        loop {
            let msg = self.read();
            if msg["event"] == name {
                return msg;
            }
        }
    }

    /// Reads the next message.
    pub fn read(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read QMP");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// Executes a command; returns its `return` value (events before it are skipped
    /// into `events`).
    pub fn execute_collect(
        &mut self,
        cmd: &str,
        args: serde_json::Value,
        events: &mut Vec<serde_json::Value>,
    ) -> serde_json::Value {
        use std::io::Write;
        let mut req = serde_json::json!({"execute": cmd});
        if !args.is_null() {
            req["arguments"] = args;
        }
        writeln!(self.writer, "{req}").unwrap();
        loop {
            let msg = self.read();
            if msg.get("event").is_some() {
                events.push(msg);
                continue;
            }
            if let Some(r) = msg.get("return") {
                return r.clone();
            }
            panic!("{cmd} failed: {msg}");
        }
    }

    /// Executes a command; returns its `return` value, or its `error` object.
    pub fn execute_result(
        &mut self,
        cmd: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, serde_json::Value> {
        use std::io::Write;
        let mut req = serde_json::json!({"execute": cmd});
        if !args.is_null() {
            req["arguments"] = args;
        }
        writeln!(self.writer, "{req}").unwrap();
        loop {
            let msg = self.read();
            if msg.get("event").is_some() {
                continue;
            }
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                return Err(e.clone());
            }
            panic!("{cmd}: unexpected reply {msg}");
        }
    }

    /// Executes a command; returns its `return` value.
    pub fn execute(&mut self, cmd: &str, args: serde_json::Value) -> serde_json::Value {
        let mut ev = Vec::new();
        self.execute_collect(cmd, args, &mut ev)
    }
}

/// A minimal bzImage (boot protocol 2.12, 4 setup sectors) whose protected-mode
/// part is loaded at 1 MiB and has `code` at its 64-bit entry (offset 0x200).
pub fn tiny_bzimage(code: &[u8]) -> Vec<u8> {
    let setup_sects = 4u8;
    let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    img[0x1f1] = setup_sects;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
    img[0x211] = 0x01; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    let mut pm = vec![0xf4u8; 0x200]; // hlt: the 32-bit entry is never used
    pm.extend_from_slice(code);
    img.extend_from_slice(&pm);
    img
}
