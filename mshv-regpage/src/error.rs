// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Error type of the crate.

use std::io;

use crate::dirty::RegisterClass;

/// How a register write reached the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WritePath {
    /// Stored on the shared page (or KVM sync-regs area) with the class's dirty bit.
    Page,
    /// Sent with the set-registers hypercall (or a KVM set ioctl).
    Hypercall,
}

impl std::fmt::Display for WritePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WritePath::Page => f.write_str("page"),
            WritePath::Hypercall => f.write_str("hypercall"),
        }
    }
}

/// Errors of this crate.
///
/// `#[non_exhaustive]`: match the variants you handle and keep a `_` arm. The errno of a
/// failed system call is kept: [`Error::errno`], or the [`io::Error`] in the source chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `mmap` of the vCPU fd failed with something other than `ENODEV`.
    #[error("cannot map the vCPU register page")]
    Map(#[source] io::Error),
    /// A raw page pointer given to [`crate::RegisterPage::from_raw`] is not 8-byte aligned.
    #[error("register page pointer {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// The address.
        addr: usize,
        /// The required alignment.
        align: usize,
    },
    /// A get/set-registers hypercall, the run ioctl (or a KVM ioctl) failed.
    #[error("{op} failed")]
    Backend {
        /// Which operation (e.g. `"set vp registers"`, `"MSHV_RUN_VP"`, `"KVM_SET_REGS"`).
        op: &'static str,
        /// The backend's error: an OS error (`raw_os_error()` is the errno) or, for a
        /// hypercall that failed with a hypervisor status, an `io::Error` wrapping
        /// `mshv_ioctls::MshvError::Hypercall`.
        #[source]
        source: io::Error,
    },
    /// The backend cannot provide this register at all.
    #[error("{what} is not available through this backend")]
    Unsupported {
        /// The register or operation.
        what: &'static str,
    },
    /// A write of `class` through `attempted` was refused because the same class was
    /// already written through `earlier` since the last run: the hypervisor would apply
    /// one of them and silently drop the other.
    #[error(
        "refusing {attempted} write of {class} registers: already written by {earlier} \
         since the last run"
    )]
    MixedWrite {
        /// The register class.
        class: RegisterClass,
        /// The path of the earlier write.
        earlier: WritePath,
        /// The path of the refused write.
        attempted: WritePath,
    },
    /// A [`crate::RegisterCell`] was already claimed: the vCPU is running, or another
    /// thread (or an enclosing call on this thread) is using its registers.
    #[error(
        "the vCPU's registers are in use (the vCPU is running or another access is in \
         progress)"
    )]
    Busy,
}

impl Error {
    /// Wraps a backend error.
    pub(crate) fn backend(op: &'static str, source: io::Error) -> Self {
        Error::Backend { op, source }
    }

    /// The errno of the failed system call, if this error comes from one (`Map`, and
    /// `Backend` errors whose source is an OS error).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Map(e) | Error::Backend { source: e, .. } => e.raw_os_error(),
            _ => None,
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
