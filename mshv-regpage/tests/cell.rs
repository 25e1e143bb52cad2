// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `RegisterCell` (the facade behind `&self`), owned and shared backends, errno-keeping
//! errors.
#![cfg(target_arch = "x86_64")]

use std::io;
use std::sync::mpsc;
use std::sync::Arc;

use mshv_bindings::hv_register_assoc;
use mshv_regpage::sim::{SimHypercalls, SimHypervisor};
use mshv_regpage::{
    Error, ExitRegisters, Gpr, RegisterCell, RegisterHypercalls, RegisterPage, VcpuRegisters,
};

fn assert_send<T: Send>() {}
fn assert_sync<T: Sync>() {}

#[test]
fn cell_is_send_and_sync_over_owned_and_shared_vcpu_fds() {
    use mshv_ioctls::VcpuFd;
    assert_send::<VcpuRegisters<VcpuFd>>();
    assert_send::<VcpuRegisters<Arc<VcpuFd>>>();
    assert_sync::<RegisterCell<VcpuRegisters<VcpuFd>>>();
    assert_sync::<RegisterCell<VcpuRegisters<Arc<VcpuFd>>>>();
    assert_send::<RegisterCell<VcpuRegisters<Arc<VcpuFd>>>>();
    assert_sync::<RegisterCell<VcpuRegisters<SimHypercalls>>>();
    #[cfg(feature = "kvm")]
    assert_sync::<RegisterCell<mshv_regpage::kvm::KvmVcpuRegisters>>();

    // The facade itself is not `Sync` (its page is not): the call below is ambiguous, and
    // does not compile, if it were.
    trait AmbiguousIfSync<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfSync<()> for T {}
    #[allow(dead_code)]
    struct Invalid;
    impl<T: ?Sized + Sync> AmbiguousIfSync<Invalid> for T {}
    <VcpuRegisters<Arc<VcpuFd>> as AmbiguousIfSync<_>>::check();

    // `for_vcpu` takes the fd by value, by `Arc`, by `Box` or by reference.
    #[allow(dead_code)]
    fn owning_variants(fd: VcpuFd, shared: Arc<VcpuFd>, boxed: Box<VcpuFd>, borrowed: &VcpuFd) {
        let _: mshv_regpage::Result<VcpuRegisters<VcpuFd>> = VcpuRegisters::for_vcpu(fd);
        let _: mshv_regpage::Result<VcpuRegisters<Arc<VcpuFd>>> = VcpuRegisters::for_vcpu(shared);
        let _: mshv_regpage::Result<VcpuRegisters<Box<VcpuFd>>> = VcpuRegisters::for_vcpu(boxed);
        let _: mshv_regpage::Result<VcpuRegisters<&VcpuFd>> = VcpuRegisters::for_vcpu(borrowed);
    }
}

#[test]
fn a_claim_from_another_thread_is_refused_while_one_is_held() {
    let (mut hv, page) = SimHypervisor::new();
    hv.state_mut().set_gpr(Gpr::Rbx, 0xb);
    let mut regs = VcpuRegisters::new(Some(page), hv.hypercalls());
    hv.exit(&mut regs).unwrap();
    let cell = Arc::new(RegisterCell::new(regs));

    let (claimed_tx, claimed_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let holder = {
        let cell = Arc::clone(&cell);
        std::thread::spawn(move || {
            cell.with(|regs| {
                claimed_tx.send(()).unwrap();
                // Stands for "inside the run ioctl": hold the claim until told.
                release_rx.recv().unwrap();
                regs.set_gpr(Gpr::Rax, 0xa)
            })
        })
    };
    claimed_rx.recv().unwrap();
    assert!(cell.is_busy());
    let refused = cell.with(|regs| regs.gpr(Gpr::Rbx));
    assert!(matches!(refused, Err(Error::Busy)), "{refused:?}");
    release_tx.send(()).unwrap();
    holder.join().unwrap().unwrap();

    // Released: the other thread's write is visible, and the facade's page still serves it.
    assert!(!cell.is_busy());
    let (rax, rbx, hypercalls) = cell
        .with(|regs| Ok::<_, Error>((regs.gpr(Gpr::Rax)?, regs.gpr(Gpr::Rbx)?, regs.stats())))
        .unwrap();
    assert_eq!((rax, rbx), (0xa, 0xb));
    assert_eq!(hypercalls.hypercalls(), 0);
    let mut regs = Arc::try_unwrap(cell).unwrap().into_inner();
    hv.dispatch(&mut regs).unwrap();
    assert_eq!(hv.state().gpr(Gpr::Rax), 0xa);
}

#[test]
fn the_facade_can_own_or_share_its_backend() {
    let (mut hv, page) = SimHypervisor::new();
    hv.state_mut().rip = 0x100;
    // The VMM keeps one handle, the facade another.
    let shared = Arc::new(hv.hypercalls());
    let mut regs = VcpuRegisters::new(Some(page), Arc::clone(&shared));
    hv.exit(&mut regs).unwrap();
    hv.set_page_valid(&mut regs, false).unwrap();
    regs.set_rip(0x102).unwrap();
    assert_eq!(
        hv.state().rip,
        0x102,
        "written by hypercall through the Arc"
    );
    assert_eq!(regs.stats().hypercall_sets, 1);
    assert_eq!(Arc::strong_count(&shared), 2);
    let (page, backend) = regs.into_parts();
    drop(backend);
    assert_eq!(Arc::strong_count(&shared), 1);

    let mut boxed = VcpuRegisters::new(page, Box::new(hv.hypercalls()));
    assert_eq!(boxed.rip().unwrap(), 0x102);
}

/// A backend whose hypercalls fail like a filtered system call.
struct Denied;

impl RegisterHypercalls for Denied {
    fn get_registers(&self, _: &mut [hv_register_assoc]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn set_registers(&self, _: &[hv_register_assoc]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EACCES))
    }
}

#[test]
fn backend_errors_keep_their_errno() {
    let mut regs = VcpuRegisters::<Denied>::new(None::<RegisterPage>, Denied);
    let err = regs.gpr(Gpr::Rax).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EPERM), "{err}");
    let source = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<io::Error>())
        .expect("the io::Error is the source");
    assert_eq!(source.raw_os_error(), Some(libc::EPERM));
    assert!(err.to_string().contains("get vp registers"), "{err}");
    let err = regs.set_rip(1).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EACCES), "{err}");

    // Errors that are not system calls have none.
    let (_hv, page) = SimHypervisor::new();
    let mut regs = VcpuRegisters::new(Some(page), Denied);
    regs.set_gpr(Gpr::Rax, 1).unwrap();
    let mixed = regs
        .set_hv_registers(&[hv_register_assoc {
            name: Gpr::Rbx.hv_name(),
            ..Default::default()
        }])
        .unwrap_err();
    assert!(matches!(mixed, Error::MixedWrite { .. }), "{mixed}");
    assert_eq!(mixed.errno(), None);
}
