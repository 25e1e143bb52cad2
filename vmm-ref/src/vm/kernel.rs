//! Checking a kernel image before any VM exists: its format (ELF64 or
//! bzImage), that every part the loader copies is really in the file and
//! lands in guest RAM, its PVH note, and where it ends (for the initrd).
//!
//! The checks mirror what linux-loader's `Elf::load` and `BzImage::load` do
//! while loading (the real load in [`super::boot`] still uses linux-loader),
//! so that a bad kernel is a configuration error (exit status 2) with a
//! message that says what is wrong, instead of a boot failure after the VM
//! was built.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::layout::{ram_ranges, HIMEM_START};

/// ELF header size (`Elf64_Ehdr`).
const EHDR_SIZE: u64 = 64;
/// Program header size (`Elf64_Phdr`).
const PHDR_SIZE: u64 = 56;
/// `PT_LOAD`.
const PT_LOAD: u32 = 1;
/// `PT_NOTE`.
const PT_NOTE: u32 = 4;
/// `EM_X86_64`.
const EM_X86_64: u16 = 62;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry note.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Most program headers accepted (Linux kernels have a handful).
const MAX_PHDRS: u16 = 256;
/// Offset of the bzImage setup header in the file.
const BZ_HEADER_OFFSET: u64 = 0x1f1;
/// Bytes of the setup header read (up to and including `initrd_addr_max`).
const BZ_HEADER_LEN: usize = 0x230 - 0x1f1;

/// Which kind of image it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A 64-bit x86 ELF (`vmlinux`, or a freestanding guest).
    Elf,
    /// A bzImage (Linux boot protocol 2.00 or later, loaded high).
    BzImage,
}

/// What the loader will do with a kernel image, found without loading it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// ELF or bzImage.
    pub format: KernelFormat,
    /// The 32-bit PVH entry (`XEN_ELFNOTE_PHYS32_ENTRY`), ELF only.
    pub pvh_entry: Option<u64>,
    /// Guest-physical ranges the loader writes (one per loaded segment).
    pub load_ranges: Vec<Range<u64>>,
    /// First guest-physical byte after the image (ELF: including each
    /// segment's memory size); the initrd must go above it.
    pub kernel_end: u64,
    /// bzImage `initrd_addr_max` (protocol 2.03 and later; 0 = not given).
    pub initrd_addr_max: Option<u32>,
}

/// Why a kernel image cannot be booted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// Opening or reading the file failed (a directory reads as `EISDIR`).
    #[error("cannot open '{path}'")]
    Read {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A device, FIFO, ... instead of a file.
    #[error("'{0}' is not a regular file")]
    NotAFile(PathBuf),
    /// Zero bytes.
    #[error("'{0}' is empty")]
    Empty(PathBuf),
    /// Neither magic matched.
    #[error(
        "'{0}' is neither an ELF nor a bzImage kernel (no ELF magic, no \"HdrS\" boot header)"
    )]
    UnknownFormat(PathBuf),
    /// An ELF that cannot be loaded.
    #[error("'{path}': {problem}")]
    Elf {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A bzImage that cannot be loaded.
    #[error("'{path}': {problem}")]
    BzImage {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A part of the image would not land in guest RAM.
    #[error("'{path}': the image needs guest memory {start:#x}..{end:#x}, outside the {mem_size} bytes of RAM")]
    OutsideRam {
        /// The image.
        path: PathBuf,
        /// First byte.
        start: u64,
        /// End (exclusive).
        end: u64,
        /// Guest RAM size.
        mem_size: u64,
    },
}

/// Reads exactly `buf.len()` bytes at `offset`; `Ok(false)` if the file ends first.
fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
    file.seek(SeekFrom::Start(offset))?;
    match file.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Opens a boot file (kernel, initrd) for reading without ever blocking in
/// open(2): `O_NONBLOCK`, so that a FIFO is opened at once (and then refused
/// as not a regular file) instead of waiting for a writer for ever. Reads of
/// a regular file are unaffected by the flag.
pub fn open_boot_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Opens `path` and checks that it is a loadable ELF64 x86 or bzImage kernel.
pub fn probe(path: &Path) -> Result<KernelInfo, KernelError> {
    let read_err = |source| KernelError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = open_boot_file(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if meta.is_dir() {
        // open(2) succeeds on a directory; say what read(2) would.
        return Err(read_err(io::Error::from_raw_os_error(libc::EISDIR)));
    }
    if !meta.is_file() {
        return Err(KernelError::NotAFile(path.to_owned()));
    }
    let len = meta.len();
    if len == 0 {
        return Err(KernelError::Empty(path.to_owned()));
    }
    let mut magic = [0u8; 4];
    if read_at(&mut file, 0, &mut magic).map_err(read_err)? && magic == *b"\x7fELF" {
        return probe_elf(&mut file, len).map_err(|problem| match problem {
            Problem::Io(e) => read_err(e),
            Problem::Bad(problem) => KernelError::Elf {
                path: path.to_owned(),
                problem,
            },
        });
    }
    let mut hdr = [0u8; BZ_HEADER_LEN];
    let has_hdr = read_at(&mut file, BZ_HEADER_OFFSET, &mut hdr).map_err(read_err)?;
    // "HdrS" at 0x202.
    if has_hdr && u32_at(&hdr, 0x202 - 0x1f1) == 0x5372_6448 {
        return probe_bzimage(&hdr, len).map_err(|problem| KernelError::BzImage {
            path: path.to_owned(),
            problem,
        });
    }
    Err(KernelError::UnknownFormat(path.to_owned()))
}

enum Problem {
    Io(io::Error),
    Bad(String),
}

impl From<io::Error> for Problem {
    fn from(e: io::Error) -> Self {
        Problem::Io(e)
    }
}

fn bad<T>(msg: String) -> Result<T, Problem> {
    Err(Problem::Bad(msg))
}

/// An ELF: header, program headers, loaded segments and the PVH note, with
/// linux-loader's rules (little endian, `e_phentsize` 56, `e_phoff` past the
/// header, `e_entry` at or above 1 MiB) plus ELF64 / x86-64 and "every byte
/// it copies is in the file".
fn probe_elf(file: &mut File, len: u64) -> Result<KernelInfo, Problem> {
    let mut eh = [0u8; EHDR_SIZE as usize];
    if !read_at(file, 0, &mut eh)? {
        return bad(format!(
            "truncated ELF: the ELF header needs {EHDR_SIZE} bytes, the file has {len}"
        ));
    }
    if eh[4] != 2 {
        return bad("not a 64-bit ELF (EI_CLASS is not ELFCLASS64)".into());
    }
    if eh[5] != 1 {
        return bad("not a little-endian ELF".into());
    }
    let machine = u16_at(&eh, 18);
    if machine != EM_X86_64 {
        return bad(format!("ELF machine {machine} is not x86-64 ({EM_X86_64})"));
    }
    let entry = u64_at(&eh, 24);
    let phoff = u64_at(&eh, 32);
    let phentsize = u16_at(&eh, 54);
    let phnum = u16_at(&eh, 56);
    if u64::from(phentsize) != PHDR_SIZE {
        return bad(format!(
            "ELF program header size {phentsize} (expected {PHDR_SIZE})"
        ));
    }
    if phoff < EHDR_SIZE {
        return bad(format!(
            "ELF program headers at offset {phoff}, inside the ELF header"
        ));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return bad(format!(
            "ELF has {phnum} program headers (expected 1..={MAX_PHDRS})"
        ));
    }
    if entry < HIMEM_START {
        return bad(format!(
            "ELF entry point {entry:#x} is below 1 MiB ({HIMEM_START:#x})"
        ));
    }
    let table_end = phoff
        .checked_add(u64::from(phnum) * PHDR_SIZE)
        .filter(|end| *end <= len);
    if table_end.is_none() {
        return bad(format!(
            "truncated ELF: {phnum} program headers at offset {phoff} end past the end of the file ({len} bytes)"
        ));
    }
    let mut info = KernelInfo {
        format: KernelFormat::Elf,
        pvh_entry: None,
        load_ranges: Vec::new(),
        kernel_end: 0,
        initrd_addr_max: None,
    };
    let mut ph = [0u8; PHDR_SIZE as usize];
    for i in 0..u64::from(phnum) {
        read_at(file, phoff + i * PHDR_SIZE, &mut ph)?;
        let p_type = u32_at(&ph, 0);
        let offset = u64_at(&ph, 8);
        let paddr = u64_at(&ph, 24);
        let filesz = u64_at(&ph, 32);
        let memsz = u64_at(&ph, 40);
        let in_file = offset.checked_add(filesz).filter(|end| *end <= len);
        if p_type == PT_NOTE && info.pvh_entry.is_none() {
            if in_file.is_none() {
                return bad(format!(
                    "truncated ELF: note segment {i} (file bytes {offset:#x}+{filesz:#x}) ends past the end of the file ({len:#x} bytes)"
                ));
            }
            info.pvh_entry = pvh_note(file, offset, filesz)?;
            continue;
        }
        if p_type != PT_LOAD || filesz == 0 {
            continue;
        }
        if in_file.is_none() {
            return bad(format!(
                "truncated ELF: segment {i} (file bytes {offset:#x}+{filesz:#x}) ends past the end of the file ({len:#x} bytes)"
            ));
        }
        let (Some(load_end), Some(mem_end)) = (paddr.checked_add(filesz), paddr.checked_add(memsz))
        else {
            return bad(format!(
                "ELF segment {i} at {paddr:#x} overflows the address space"
            ));
        };
        info.load_ranges.push(paddr..load_end);
        info.kernel_end = info.kernel_end.max(mem_end).max(load_end);
    }
    if info.load_ranges.is_empty() {
        return bad("ELF has no loadable segment".into());
    }
    Ok(info)
}

/// Walks the notes of a `PT_NOTE` segment for `XEN_ELFNOTE_PHYS32_ENTRY`
/// (name "Xen", 4-byte aligned fields, a descriptor of at least 4 bytes).
fn pvh_note(file: &mut File, offset: u64, size: u64) -> Result<Option<u64>, Problem> {
    let align4 = |v: u64| (v + 3) & !3;
    let mut pos = 0u64;
    while pos + 12 <= size {
        let mut nh = [0u8; 12];
        read_at(file, offset + pos, &mut nh)?;
        let namesz = u64::from(u32_at(&nh, 0));
        let descsz = u64::from(u32_at(&nh, 4));
        let n_type = u32_at(&nh, 8);
        let name_at = pos + 12;
        let desc_at = name_at + align4(namesz);
        let next = desc_at + align4(descsz);
        if next > size {
            return bad(format!(
                "ELF note at segment offset {pos:#x} runs past its segment"
            ));
        }
        if n_type == XEN_ELFNOTE_PHYS32_ENTRY && namesz == 4 {
            let mut name = [0u8; 4];
            read_at(file, offset + name_at, &mut name)?;
            if name == *b"Xen\0" {
                if descsz < 4 {
                    return bad("invalid PVH note: descriptor shorter than 4 bytes".into());
                }
                let mut desc = [0u8; 4];
                read_at(file, offset + desc_at, &mut desc)?;
                return Ok(Some(u64::from(u32::from_le_bytes(desc))));
            }
        }
        pos = next;
    }
    Ok(None)
}

/// A bzImage with linux-loader's rules: protocol 2.00 or later, loaded high,
/// `code32_start` at or above 1 MiB, more than the setup sectors in the file.
fn probe_bzimage(hdr: &[u8; BZ_HEADER_LEN], len: u64) -> Result<KernelInfo, String> {
    let at = |off: usize| off - BZ_HEADER_OFFSET as usize;
    let setup_sects = hdr[at(0x1f1)];
    let version = u16_at(hdr, at(0x206));
    let loadflags = hdr[at(0x211)];
    let code32_start = u64::from(u32_at(hdr, at(0x214)));
    if version < 0x0200 {
        return Err(format!(
            "bzImage boot protocol {version:#06x} is older than 2.00"
        ));
    }
    if loadflags & 1 == 0 {
        return Err("bzImage is not loaded high (loadflags bit LOADED_HIGH clear)".into());
    }
    if code32_start < HIMEM_START {
        return Err(format!(
            "bzImage code32_start {code32_start:#x} is below 1 MiB"
        ));
    }
    let sects = if setup_sects == 0 { 4 } else { setup_sects };
    let setup_size = (u64::from(sects) + 1) * 512;
    if len <= setup_size {
        return Err(format!(
            "truncated bzImage: {len} bytes, not more than its {setup_size} bytes of setup code"
        ));
    }
    let kernel_end = code32_start + (len - setup_size);
    let initrd_addr_max = (version >= 0x0203)
        .then(|| u32_at(hdr, at(0x22c)))
        .filter(|m| *m != 0);
    Ok(KernelInfo {
        format: KernelFormat::BzImage,
        pvh_entry: None,
        load_ranges: std::iter::once(code32_start..kernel_end).collect(),
        kernel_end,
        initrd_addr_max,
    })
}

impl KernelInfo {
    /// Checks that every range the loader writes is guest RAM of a VM with
    /// `mem_size` bytes (a copy into the MMIO gap or past the end fails).
    pub fn check_fits(&self, path: &Path, mem_size: u64) -> Result<(), KernelError> {
        let ram = ram_ranges(mem_size);
        for r in &self.load_ranges {
            let inside = ram
                .iter()
                .any(|(start, size)| r.start >= *start && r.end <= start + size);
            if !inside {
                return Err(KernelError::OutsideRam {
                    path: path.to_owned(),
                    start: r.start,
                    end: r.end,
                    mem_size,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);

    impl Tmp {
        fn new(tag: &str, bytes: &[u8]) -> Tmp {
            let p =
                std::env::temp_dir().join(format!("vmm-ref-kernel-{tag}-{}", std::process::id()));
            std::fs::write(&p, bytes).unwrap();
            Tmp(p)
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// ELF64 x86-64 with one PT_LOAD of `code` at 1 MiB and, if `pvh`, a
    /// PT_NOTE with the PVH entry.
    fn elf(code: &[u8], pvh: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh.is_some() { 2 } else { 1 };
        let code_off = 64 + 56 * u64::from(phnum);
        let note_off = code_off + code.len() as u64;
        let mut e = Vec::new();
        e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        e.extend_from_slice(&2u16.to_le_bytes());
        e.extend_from_slice(&62u16.to_le_bytes());
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&0x10_0000u64.to_le_bytes());
        e.extend_from_slice(&64u64.to_le_bytes());
        e.extend_from_slice(&0u64.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, phnum, 64, 0, 0] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        let ph = |e: &mut Vec<u8>, ty: u32, off: u64, addr: u64, size: u64| {
            e.extend_from_slice(&ty.to_le_bytes());
            e.extend_from_slice(&5u32.to_le_bytes());
            for v in [off, addr, addr, size, size, 4] {
                e.extend_from_slice(&v.to_le_bytes());
            }
        };
        ph(&mut e, PT_LOAD, code_off, 0x10_0000, code.len() as u64);
        if pvh.is_some() {
            ph(&mut e, PT_NOTE, note_off, 0, 20);
        }
        e.extend_from_slice(code);
        if let Some(entry) = pvh {
            for v in [4u32, 4, 18] {
                e.extend_from_slice(&v.to_le_bytes());
            }
            e.extend_from_slice(b"Xen\0");
            e.extend_from_slice(&entry.to_le_bytes());
        }
        e
    }

    fn probe_bytes(tag: &str, bytes: &[u8]) -> Result<KernelInfo, String> {
        let t = Tmp::new(tag, bytes);
        probe(&t.0).map_err(|e| crate::error_chain(&e))
    }

    #[test]
    fn elf_with_and_without_pvh_note() {
        let i = probe_bytes("elf", &elf(&[0xf4; 32], None)).unwrap();
        assert_eq!(i.format, KernelFormat::Elf);
        assert_eq!(i.pvh_entry, None);
        assert_eq!(i.load_ranges, vec![0x10_0000..0x10_0020]);
        assert_eq!(i.kernel_end, 0x10_0020);
        let i = probe_bytes("pvh", &elf(&[0xf4; 32], Some(0x10_0010))).unwrap();
        assert_eq!(i.pvh_entry, Some(0x10_0010));
        assert!(i.check_fits(Path::new("k"), 16 << 20).is_ok());
        // 1 MiB of RAM holds nothing at 1 MiB.
        let e = i.check_fits(Path::new("k"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("outside the 1048576 bytes"), "{e}");
    }

    #[test]
    fn the_real_test_guest_has_a_pvh_note() {
        let i = probe(Path::new(env!("VMM_REF_GUEST_ELF"))).unwrap();
        assert_eq!(i.format, KernelFormat::Elf);
        assert!(i.pvh_entry.is_some());
    }

    #[test]
    fn bad_images_say_what_is_wrong() {
        let good = elf(&[0xf4; 64], Some(0x10_0000));
        let mut wrong_class = good.clone();
        wrong_class[4] = 1;
        let mut arm = good.clone();
        arm[18] = 183;
        let mut low_entry = good.clone();
        low_entry[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "is empty"),
            ("text", b"hello\n".to_vec(), "neither an ELF nor a bzImage"),
            ("hdr", good[..40].to_vec(), "truncated ELF: the ELF header"),
            (
                "phdrs",
                good[..100].to_vec(),
                "truncated ELF: 2 program headers",
            ),
            ("seg", good[..200].to_vec(), "truncated ELF: segment 0"),
            ("class", wrong_class, "not a 64-bit ELF"),
            ("arm", arm, "ELF machine 183 is not x86-64"),
            ("entry", low_entry, "entry point 0x1000 is below 1 MiB"),
        ];
        for (tag, bytes, want) in cases {
            let e = probe_bytes(tag, &bytes).unwrap_err();
            assert!(e.contains(want), "{tag}: {e}");
        }
        let dir = probe(&std::env::temp_dir()).unwrap_err();
        assert!(crate::error_chain(&dir).contains("Is a directory"), "{dir}");
        let null = probe(Path::new("/dev/null")).unwrap_err();
        assert!(null.to_string().contains("is not a regular file"), "{null}");
    }

    #[test]
    fn bzimage_headers() {
        let mut img = vec![0u8; 5 * 512 + 64];
        img[0x1f1] = 4;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
        img[0x211] = 1;
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        let i = probe_bytes("bz", &img).unwrap();
        assert_eq!(i.format, KernelFormat::BzImage);
        assert_eq!(i.kernel_end, 0x10_0000 + 64);
        assert_eq!(i.initrd_addr_max, Some(0x37ff_ffff));
        let mut low = img.clone();
        low[0x211] = 0;
        let e = probe_bytes("bzlow", &low).unwrap_err();
        assert!(e.contains("not loaded high"), "{e}");
        let e = probe_bytes("bzshort", &img[..5 * 512]).unwrap_err();
        assert!(e.contains("truncated bzImage"), "{e}");
        let mut old = img;
        old[0x206..0x208].copy_from_slice(&0x0105u16.to_le_bytes());
        let e = probe_bytes("bzold", &old).unwrap_err();
        assert!(e.contains("older than 2.00"), "{e}");
    }
}
