//! Error type of the crate.

use crate::dirty::RegisterClass;

/// Boxed error returned by a register backend (hypercall or ioctl).
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

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
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `mmap` of the vCPU fd failed with something other than `ENODEV`.
    #[error("cannot map the vCPU register page")]
    Map(#[source] std::io::Error),
    /// A raw page pointer given to [`crate::RegisterPage::from_raw`] is not 8-byte aligned.
    #[error("register page pointer {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// The address.
        addr: usize,
        /// The required alignment.
        align: usize,
    },
    /// A get/set-registers hypercall (or KVM ioctl) failed.
    #[error("{op} failed")]
    Backend {
        /// Which operation.
        op: &'static str,
        /// The backend's error.
        #[source]
        source: BackendError,
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
}

impl Error {
    /// Wraps a backend error.
    pub fn backend<E>(op: &'static str, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error::Backend {
            op,
            source: Box::new(source),
        }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
