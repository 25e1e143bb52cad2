// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A cloud-hypervisor-shaped vCPU on mshv-regpage, run on the simulated hypervisor.
//!
//! cloud-hypervisor's `hypervisor` crate declares `trait Vcpu: Send + Sync` whose register
//! methods take `&self`; its MSHV vCPU owns its `VcpuFd`, the VM holds `Arc`s of the vCPUs,
//! and port I/O exits are completed inside `run()` by writing the register page by hand:
//! advance RIP by the instruction length, update RAX on `in`, set the dirty bits (a
//! forgotten dirty bit once lost those writes). Here the same vCPU type is built on
//! [`VcpuRegisters`] in a [`RegisterCell`]:
//!
//! * `run(&self)` claims the cell once, runs the vCPU and completes the PIO exit with the
//!   typed setters (which set the dirty bits); the register accesses are the facade's fast
//!   path, the page when it is valid, the hypercalls when it is not;
//! * `get_regs(&self)`/`set_regs(&self, ..)` claim the cell around one bulk access, from
//!   any thread, while the vCPU is not inside `run`.
//!
//! On `/dev/mshv` the facade would be `VcpuRegisters::for_vcpu(Arc<VcpuFd>)` and the run
//! line `regs.run()?` (decoding the returned `hv_message`); here a simulated hypervisor
//! stands in for the kernel and a few bytes of real x86 code for the guest.
//!
//! Run: `cargo run -p mshv-regpage --features sim --example vcpu_trait`

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("mshv-regpage is x86_64-only: nothing to run on this target");
}

#[cfg(target_arch = "x86_64")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    vmm::main()
}

#[cfg(target_arch = "x86_64")]
mod vmm {
    use std::sync::{Arc, Mutex, PoisonError};

    use mshv_bindings::StandardRegisters;
    use mshv_regpage::sim::{DispatchReport, SimError, SimHypercalls, SimHypervisor};
    use mshv_regpage::{
        AccessStats, ExitRegisters, Gpr, PageRegisters, RegisterCell, RegisterClass, VcpuRegisters,
    };

    // ---- the hypervisor-agnostic interface (cloud-hypervisor's `hypervisor` crate) ------

    /// Errors of a vCPU operation (cloud-hypervisor: `HypervisorCpuError`).
    #[derive(Debug, thiserror::Error)]
    pub enum CpuError {
        /// A register access failed (also: the vCPU is busy in `run` on another thread).
        #[error("vCPU register access failed")]
        Registers(#[from] mshv_regpage::Error),
        /// The (simulated) run failed.
        #[error("running the vCPU failed")]
        Run(#[from] SimError),
        /// The guest did something this VMM does not emulate.
        #[error("unsupported guest instruction {opcode:#04x} at {rip:#x}")]
        Unsupported {
            /// Guest RIP.
            rip: u64,
            /// The first opcode byte.
            opcode: u8,
        },
        /// An I/O intercept with an access size other than 1, 2 or 4.
        #[error("invalid port I/O access size {0}")]
        AccessSize(u8),
    }

    /// Why `run` returned (cloud-hypervisor: `VmExit`; PIO is handled inside `run`).
    #[derive(Debug, PartialEq, Eq)]
    pub enum VmExit {
        /// Handled inside `run` (port I/O): run again.
        Ignore,
        /// The guest halted.
        Halt,
    }

    /// The vCPU interface: `Send + Sync`, every method takes `&self`.
    pub trait Vcpu: Send + Sync {
        /// The general purpose registers, RIP and RFLAGS.
        fn get_regs(&self) -> Result<StandardRegisters, CpuError>;
        /// Sets the general purpose registers, RIP and RFLAGS.
        fn set_regs(&self, regs: &StandardRegisters) -> Result<(), CpuError>;
        /// Runs the vCPU until an exit the VMM must see.
        fn run(&self) -> Result<VmExit, CpuError>;
    }

    /// The VM's device buses as the vCPU sees them (cloud-hypervisor: `VmOps`).
    pub trait VmOps: Send + Sync {
        /// A guest `in` from `port`: fill `data`.
        fn pio_read(&self, port: u16, data: &mut [u8]);
        /// A guest `out` to `port`.
        fn pio_write(&self, port: u16, data: &[u8]);
    }

    // ---- the MSHV backend -------------------------------------------------------------

    /// What the hypervisor reports at a port I/O intercept (the fields of
    /// `hv_x64_io_port_intercept_message` the fast path needs).
    #[derive(Clone, Copy, Debug)]
    pub struct IoPortIntercept {
        port: u16,
        access_size: u8,
        is_write: bool,
        instruction_length: u8,
    }

    /// Why the simulated guest stopped.
    #[derive(Clone, Copy, Debug)]
    enum Intercept {
        IoPort(IoPortIntercept),
        Halt,
    }

    /// The MSHV vCPU: owns its register facade (and through it the vCPU fd), shared by
    /// `Arc` between the vCPU thread and the VMM.
    pub struct MshvVcpu {
        regs: RegisterCell<VcpuRegisters<SimHypercalls>>,
        /// Stands for the kernel side of `MSHV_RUN_VP` (only `run` uses it).
        hypervisor: Mutex<SimKernel>,
        vm_ops: Arc<dyn VmOps>,
    }

    impl MshvVcpu {
        /// Register access counters of the facade.
        pub fn stats(&self) -> Result<AccessStats, CpuError> {
            self.regs.with(|regs| Ok(regs.stats()))
        }

        /// The PIO fast path: data to/from the device, RAX on `in`, RIP past the
        /// instruction. The typed setters set the GENERAL and IP dirty bits themselves.
        fn complete_pio(
            &self,
            regs: &mut VcpuRegisters<SimHypercalls>,
            io: IoPortIntercept,
        ) -> Result<(), CpuError> {
            let len = usize::from(io.access_size);
            if !matches!(len, 1 | 2 | 4) {
                return Err(CpuError::AccessSize(io.access_size));
            }
            let rax = regs.gpr(Gpr::Rax)?;
            let mut data = [0u8; 4];
            let bytes = data
                .get_mut(..len)
                .ok_or(CpuError::AccessSize(io.access_size))?;
            if io.is_write {
                for (d, s) in bytes.iter_mut().zip(rax.to_le_bytes()) {
                    *d = s;
                }
                self.vm_ops.pio_write(io.port, bytes);
            } else {
                self.vm_ops.pio_read(io.port, bytes);
                let value = u64::from(u32::from_le_bytes(data));
                let new_rax = if len == 4 {
                    // A 32-bit destination zero-extends into RAX.
                    value
                } else {
                    // `in al`/`in ax` leave the other bits of RAX alone.
                    let mask = (1u64 << (8 * len)) - 1;
                    (rax & !mask) | (value & mask)
                };
                regs.set_gpr(Gpr::Rax, new_rax)?;
            }
            let rip = regs.rip()?;
            regs.set_rip(rip.wrapping_add(u64::from(io.instruction_length)))?;
            Ok(())
        }
    }

    impl Vcpu for MshvVcpu {
        fn get_regs(&self) -> Result<StandardRegisters, CpuError> {
            self.regs.with(|regs| Ok(regs.standard_registers()?))
        }

        fn set_regs(&self, regs: &StandardRegisters) -> Result<(), CpuError> {
            self.regs
                .with(|facade| Ok(facade.set_standard_registers(regs)?))
        }

        fn run(&self) -> Result<VmExit, CpuError> {
            // One claim for the whole exit: the run and the fast path inside it.
            self.regs.with(|regs| {
                // On /dev/mshv: `let msg = regs.run()?;` and decode the `hv_message`.
                let intercept = self
                    .hypervisor
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .run(regs)?;
                match intercept {
                    Intercept::IoPort(io) => {
                        self.complete_pio(regs, io)?;
                        Ok(VmExit::Ignore)
                    }
                    Intercept::Halt => Ok(VmExit::Halt),
                }
            })
        }
    }

    // ---- the simulated kernel and guest -----------------------------------------------

    /// Where the guest code starts.
    const CODE: u64 = 0x1000;

    /// The guest: prints "hi" on the serial port, reads a byte from port 0x60, prints it
    /// plus one, then reads 32 bits from port 0x70 and 16 bits from port 0x71, and halts.
    const GUEST: &[u8] = &[
        0xb0, b'h', // 0x1000 mov al, 'h'
        0xee, //       0x1002 out dx, al
        0xb0, b'i', // 0x1003 mov al, 'i'
        0xee, //       0x1005 out dx, al
        0xe4, 0x60, // 0x1006 in al, 0x60
        0xfe, 0xc0, // 0x1008 inc al
        0xee, //       0x100a out dx, al
        0xe5, 0x70, // 0x100b in eax, 0x70
        0x66, 0xe5, 0x71, // 0x100d in ax, 0x71
        0xf4, //       0x1010 hlt
    ];
    const HLT_RIP: u64 = CODE + 0x10;
    /// The exit (0-based) at which the simulated hypervisor invalidates the page: the
    /// `in eax, 0x70`, which the same handler then completes with hypercalls.
    const INVALID_PAGE_EXIT: usize = 4;

    /// Executes guest code on the hypervisor's copy of the registers until the next
    /// instruction that exits to the VMM (RIP is left on it, as at an intercept).
    fn execute(state: &mut PageRegisters) -> Result<Intercept, CpuError> {
        loop {
            let rip = state.rip;
            let at = |i: u64| {
                rip.checked_sub(CODE)
                    .and_then(|off| usize::try_from(off + i).ok())
                    .and_then(|off| GUEST.get(off).copied())
            };
            let opcode = at(0).ok_or(CpuError::Unsupported { rip, opcode: 0 })?;
            let unsupported = CpuError::Unsupported { rip, opcode };
            let rax = state.gpr(Gpr::Rax);
            let io = |port: u16, access_size: u8, is_write: bool, instruction_length: u8| {
                Ok(Intercept::IoPort(IoPortIntercept {
                    port,
                    access_size,
                    is_write,
                    instruction_length,
                }))
            };
            match opcode {
                0xb0 => {
                    let imm = at(1).ok_or(unsupported)?;
                    state.set_gpr(Gpr::Rax, (rax & !0xff) | u64::from(imm));
                    state.rip += 2;
                }
                0xfe if at(1) == Some(0xc0) => {
                    let al = (rax as u8).wrapping_add(1);
                    state.set_gpr(Gpr::Rax, (rax & !0xff) | u64::from(al));
                    state.rip += 2;
                }
                0xee => return io(state.gpr(Gpr::Rdx) as u16, 1, true, 1),
                0xe4 => return io(u16::from(at(1).ok_or(unsupported)?), 1, false, 2),
                0xe5 => return io(u16::from(at(1).ok_or(unsupported)?), 4, false, 2),
                0x66 if at(1) == Some(0xe5) => {
                    return io(u16::from(at(2).ok_or(unsupported)?), 2, false, 3)
                }
                0xf4 => return Ok(Intercept::Halt),
                _ => return Err(unsupported),
            }
        }
    }

    /// Stands for `/dev/mshv`: dispatches the vCPU (applying the page's dirty classes),
    /// runs the guest to its next exit and fills the page; invalidates the page at one exit.
    pub struct SimKernel {
        hv: SimHypervisor,
        exits: usize,
        /// What each dispatch applied from the page.
        dispatches: Vec<DispatchReport>,
        /// RAX at each exit, as the hypervisor saw it.
        rax_at_exit: Vec<u64>,
    }

    impl SimKernel {
        fn run(&mut self, regs: &mut VcpuRegisters<SimHypercalls>) -> Result<Intercept, CpuError> {
            self.hv.set_page_valid(regs, true)?;
            let mut intercept = Ok(Intercept::Halt);
            let report = self.hv.run(regs, |state| intercept = execute(state))?;
            self.dispatches.push(report);
            self.rax_at_exit.push(self.hv.state().gpr(Gpr::Rax));
            if self.exits == INVALID_PAGE_EXIT {
                self.hv.set_page_valid(regs, false)?;
            }
            self.exits += 1;
            intercept
        }
    }

    // ---- the devices and the VMM ----------------------------------------------------------

    /// A serial port at 0x3f8 and three input ports.
    #[derive(Default)]
    struct Devices {
        serial: Mutex<Vec<u8>>,
    }

    impl VmOps for Devices {
        fn pio_read(&self, port: u16, data: &mut [u8]) {
            let value: u32 = match port {
                0x60 => u32::from(b'A'),
                0x70 => 0xdead_beef,
                0x71 => 0x1234,
                _ => u32::MAX,
            };
            for (d, s) in data.iter_mut().zip(value.to_le_bytes()) {
                *d = s;
            }
        }

        fn pio_write(&self, port: u16, data: &[u8]) {
            if port == 0x3f8 {
                self.serial
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(data);
            }
        }
    }

    pub fn main() -> Result<(), Box<dyn std::error::Error>> {
        let devices = Arc::new(Devices::default());
        let (hv, page) = SimHypervisor::new();
        let facade = VcpuRegisters::new(Some(page), hv.hypercalls());
        let mshv_vcpu = Arc::new(MshvVcpu {
            regs: RegisterCell::new(facade),
            hypervisor: Mutex::new(SimKernel {
                hv,
                exits: 0,
                dispatches: Vec::new(),
                rax_at_exit: Vec::new(),
            }),
            vm_ops: Arc::clone(&devices) as Arc<dyn VmOps>,
        });
        let vcpu: Arc<dyn Vcpu> = Arc::clone(&mshv_vcpu) as Arc<dyn Vcpu>;

        // Boot: the VMM thread sets the registers before starting the vCPU thread.
        vcpu.set_regs(&StandardRegisters {
            rip: CODE,
            rax: 0xffff_ffff_0000_0000,
            rdx: 0x3f8,
            rflags: 0x2,
            ..Default::default()
        })?;
        let before = mshv_vcpu.stats()?;

        // The vCPU thread.
        let thread_vcpu = Arc::clone(&vcpu);
        let io_exits = std::thread::spawn(move || -> Result<u32, CpuError> {
            let mut io_exits = 0;
            loop {
                match thread_vcpu.run()? {
                    VmExit::Ignore => io_exits += 1,
                    VmExit::Halt => return Ok(io_exits),
                }
            }
        })
        .join()
        .map_err(|_| "the vCPU thread panicked")??;

        let after = mshv_vcpu.stats()?;
        // The vCPU is stopped: any thread may read its registers through `&self`.
        let regs = vcpu.get_regs()?;
        let serial = devices
            .serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let kernel = mshv_vcpu
            .hypervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner);

        println!("serial output: {:?}", String::from_utf8_lossy(&serial));
        println!(
            "{io_exits} port I/O exits completed in run(); final RIP {:#x}, RAX {:#x}",
            regs.rip, regs.rax
        );
        let (page_reads, page_writes) = (
            after.page_reads - before.page_reads,
            after.page_writes - before.page_writes,
        );
        let (gets, sets) = (
            after.hypercall_gets - before.hypercall_gets,
            after.hypercall_sets - before.hypercall_sets,
        );
        println!(
            "exit handling: {page_reads} page reads, {page_writes} page writes, \
             {gets} get / {sets} set hypercalls (page invalid at exit {INVALID_PAGE_EXIT})"
        );
        for (i, report) in kernel.dispatches.iter().enumerate() {
            let classes: Vec<RegisterClass> = report.applied.iter().collect();
            println!("  dispatch {i}: the hypervisor applied dirty classes {classes:?}");
        }

        assert_eq!(serial, b"hiB", "serial output");
        assert_eq!(io_exits, 6);
        assert_eq!(regs.rip, HLT_RIP, "RIP advanced past every I/O instruction");
        // `in al` kept the upper bits (the 'B' out saw them); `in eax` zero-extended;
        // `in ax` merged into the low 16 bits.
        assert_eq!(kernel.rax_at_exit.get(3), Some(&0xffff_ffff_0000_0042));
        assert_eq!(regs.rax, 0xdead_1234);
        // Per page-handled exit: out = 2 reads + 1 write, in = 2 reads + 2 writes; the
        // `in eax` at the invalid page went by hypercall (2 gets + 2 sets).
        assert_eq!((page_reads, page_writes), (3 * 2 + 2 * 2, 3 + 2 * 2));
        assert_eq!((gets, sets), (2, 2));
        // The dirty bits the typed setters set are what the hypervisor applied: boot
        // registers first, then IP after each `out`, GENERAL + IP after each page-handled
        // `in`, nothing after the hypercall-handled one.
        let applied = |i: usize| kernel.dispatches.get(i).map(|r| r.applied);
        let ip = |set: Option<mshv_regpage::DirtyClasses>| {
            set.is_some_and(|s| s.contains(RegisterClass::Ip))
        };
        let general = |set: Option<mshv_regpage::DirtyClasses>| {
            set.is_some_and(|s| s.contains(RegisterClass::General))
        };
        assert!(general(applied(0)) && ip(applied(0)), "boot registers");
        for out_exit in [0, 1, 3] {
            assert!(ip(applied(out_exit + 1)) && !general(applied(out_exit + 1)));
        }
        assert!(ip(applied(3)) && general(applied(3)), "after `in al`");
        assert!(
            applied(5).is_some_and(|s| s.is_empty()),
            "hypercalls, no dirty bits"
        );
        assert!(ip(applied(6)) && general(applied(6)), "after `in ax`");
        println!("ok");
        Ok(())
    }
}
