//! An in-memory disk: the image is a `Vec<u8>`, run by the sync engine
//! (`SyncEngine::new(MemDisk::new(..))`). For fuzzing the request path and for
//! tests that do not want files.

use std::io;

use super::backend::{DiskOp, DiskOpKind};
use super::sync_engine::SyncDisk;

/// A disk held in memory.
#[derive(Debug, Default)]
pub struct MemDisk {
    data: Vec<u8>,
    read_only: bool,
    flushes: u64,
    refused: u64,
}

impl MemDisk {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: usize, read_only: bool) -> MemDisk {
        MemDisk {
            data: vec![0; size],
            read_only,
            flushes: 0,
            refused: 0,
        }
    }

    /// The image.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Number of flushes completed.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// Operations refused because they reached past the end of the image or
    /// modified a read-only image. The request parser must stop such requests
    /// before they get here, so a fuzzer asserts this stays 0.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| einval())?;
        let len = usize::try_from(len).map_err(|_| einval())?;
        let end = start.checked_add(len).ok_or_else(einval)?;
        if end > self.data.len() {
            return Err(einval());
        }
        Ok(start..end)
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::from_raw_os_error(libc::EBADF))
        } else {
            Ok(())
        }
    }

    fn apply(&mut self, op: &DiskOp) -> io::Result<usize> {
        match op.kind {
            DiskOpKind::Read { offset } | DiskOpKind::Write { offset } => {
                let bufs = op.bufs.as_ref().ok_or_else(einval)?;
                let r = self.range(offset, bufs.len() as u64)?;
                if matches!(op.kind, DiskOpKind::Write { .. }) {
                    self.writable()?;
                    let dst = self.data.get_mut(r).ok_or_else(einval)?;
                    bufs.copy_from_guest(dst)?;
                } else {
                    let src = self.data.get(r).ok_or_else(einval)?;
                    bufs.copy_to_guest(src)?;
                }
                Ok(bufs.len())
            }
            DiskOpKind::Flush => {
                self.flushes += 1;
                Ok(0)
            }
            DiskOpKind::Discard { offset, len } | DiskOpKind::WriteZeroes { offset, len, .. } => {
                self.writable()?;
                let r = self.range(offset, len)?;
                if let Some(d) = self.data.get_mut(r) {
                    d.fill(0);
                }
                Ok(0)
            }
        }
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl SyncDisk for MemDisk {
    fn run(&mut self, op: &DiskOp) -> io::Result<usize> {
        let result = self.apply(op);
        if matches!(&result, Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EBADF)))
        {
            self.refused += 1;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::block::backend::{DiskBackend, GuestBuffers};
    use crate::virtio::block::request::Segment;
    use crate::virtio::block::sync_engine::SyncEngine;
    use crate::virtio::block::testing::guest_mem;

    #[test]
    fn operations() {
        let mem = guest_mem();
        let mut d = SyncEngine::new(MemDisk::new(8192, false));
        mem.write_slice(&[7u8; 1024], GuestAddress(0x1000)).unwrap();
        let seg = [Segment {
            addr: GuestAddress(0x1000),
            len: 1024,
        }];
        let bufs = || Some(GuestBuffers::new(mem.clone(), &seg).unwrap());
        let w = DiskOp {
            kind: DiskOpKind::Write { offset: 512 },
            bufs: bufs(),
        };
        assert_eq!(d.execute_blocking(w).unwrap(), 1024);
        assert!(d.disk().data()[512..1536].iter().all(|&b| b == 7));
        let z = DiskOp {
            kind: DiskOpKind::WriteZeroes {
                offset: 1024,
                len: 512,
                unmap: false,
            },
            bufs: None,
        };
        d.execute_blocking(z).unwrap();
        assert!(d.disk().data()[1024..1536].iter().all(|&b| b == 0));
        let out = DiskOp {
            kind: DiskOpKind::Read { offset: 8192 - 512 },
            bufs: bufs(),
        };
        assert!(d.execute_blocking(out).is_err());
        assert_eq!(d.disk().refused(), 1);
        let f = DiskOp {
            kind: DiskOpKind::Flush,
            bufs: None,
        };
        d.execute_blocking(f).unwrap();
        assert_eq!(d.disk().flushes(), 1);
        let mut ro = SyncEngine::new(MemDisk::new(4096, true));
        let w = DiskOp {
            kind: DiskOpKind::Write { offset: 0 },
            bufs: bufs(),
        };
        assert!(ro.execute_blocking(w).is_err());
        assert_eq!(ro.disk().refused(), 1);
    }
}
