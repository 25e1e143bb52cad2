//! The power-cut disk model (`common/powercut.rs`) itself: what a process
//! writes is lost at the cut unless an `fsync`/`fdatasync` or an io_uring
//! `FSYNC` committed it, whichever way it was written (buffered, `O_DIRECT`,
//! io_uring), and closing the file commits nothing. The durability tests of
//! `vmm-ref run` and `vmm-ref export` rest on this.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

use common::powercut::PowerCutDisk;

const SIZE: u64 = 1 << 20;

fn mount(test: &str) -> Option<PowerCutDisk> {
    match PowerCutDisk::new(test, SIZE) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("SKIPPED: {e} -- {test}");
            None
        }
    }
}

fn open(disk: &PowerCutDisk, flags: i32) -> File {
    File::options()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(disk.image())
        .expect("open the image on the FUSE mount")
}

/// A page-aligned 4 KiB buffer filled with `byte` (for O_DIRECT).
fn aligned_page(byte: u8) -> (Vec<u8>, usize) {
    let v = vec![byte; 8192];
    let skip = v.as_ptr().align_offset(4096);
    (v, skip)
}

#[test]
fn unsynced_writes_are_lost_and_synced_ones_survive() {
    let Some(disk) = mount("sync") else { return };
    let f = open(&disk, 0);
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.sync_data().unwrap(); // fdatasync
    f.write_all_at(&[2u8; 4096], 4096).unwrap();
    f.sync_all().unwrap(); // fsync
                           // A partial-page write over committed data, then never synced.
    f.write_all_at(&[3u8; 100], 10).unwrap();
    f.write_all_at(&[4u8; 4096], 8192).unwrap();
    // The process sees its own writes ...
    let mut back = vec![0u8; 4096];
    f.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(&back[10..110], &[3u8; 100][..]);
    assert_eq!(back[0], 1);
    // ... and closing the file does not make them durable.
    drop(f);
    let before = disk.stats();
    assert!(before.flushes >= 1, "close() sent FLUSH: {before:?}");
    let at_cut = disk.cut_power();
    assert_eq!(at_cut.lost_pages, 2, "{at_cut:?}");
    assert_eq!(at_cut.fsyncs, 2, "{at_cut:?}");
    assert_eq!(disk.durable(0, 4096), vec![1u8; 4096]);
    assert_eq!(disk.durable(4096, 4096), vec![2u8; 4096]);
    assert_eq!(disk.durable(8192, 4096), vec![0u8; 4096]);
    // Without power every request fails.
    let f = open(&disk, 0);
    assert!(f.write_all_at(&[5u8; 512], 0).is_err());
    assert!(disk.stats().refused_after_cut >= 1);
}

#[test]
fn o_direct_writes_and_io_uring_fsync_reach_the_model() {
    let Some(disk) = mount("uring") else { return };
    let f = open(&disk, libc::O_DIRECT);
    let (buf, skip) = aligned_page(7);
    f.write_all_at(&buf[skip..skip + 4096], 12288).unwrap();
    let (buf2, skip2) = aligned_page(8);
    f.write_all_at(&buf2[skip2..skip2 + 4096], 16384).unwrap();
    let writes = disk.stats().writes;
    assert!(writes >= 2, "O_DIRECT writes reached the server: {writes}");
    // io_uring's FSYNC (DATASYNC), which strace cannot see, commits too.
    let mut ring = io_uring::IoUring::new(4).unwrap();
    let sqe = io_uring::opcode::Fsync::new(io_uring::types::Fd(f.as_raw_fd()))
        .flags(io_uring::types::FsyncFlags::DATASYNC)
        .build()
        .user_data(1);
    // SAFETY: the SQE refers to no memory; the fd stays open until the CQE.
    unsafe { ring.submission().push(&sqe).unwrap() };
    ring.submit_and_wait(1).unwrap();
    let cqe = ring.completion().next().unwrap();
    assert_eq!(cqe.result(), 0);
    assert_eq!(disk.stats().fsyncs, 1);
    // An io_uring write after the sync stays volatile.
    let (buf3, skip3) = aligned_page(9);
    let sqe = io_uring::opcode::Write::new(
        io_uring::types::Fd(f.as_raw_fd()),
        buf3[skip3..].as_ptr(),
        4096,
    )
    .offset(20480)
    .build()
    .user_data(2);
    // SAFETY: `buf3` outlives the operation (we wait for its CQE below).
    unsafe { ring.submission().push(&sqe).unwrap() };
    ring.submit_and_wait(1).unwrap();
    assert_eq!(ring.completion().next().unwrap().result(), 4096);
    let at_cut = disk.cut_power();
    assert_eq!(at_cut.lost_pages, 1, "{at_cut:?}");
    assert_eq!(disk.durable(12288, 4096), vec![7u8; 4096]);
    assert_eq!(disk.durable(16384, 4096), vec![8u8; 4096]);
    assert_eq!(disk.durable(20480, 4096), vec![0u8; 4096]);
}
