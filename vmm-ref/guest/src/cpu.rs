//! CPU tables of the guest: GDT, TSS and page tables, laid out as static data.
//!
//! Everything here is built at link time so that the ring-0 entry code
//! (see [`crate::boot`]) only has to load it: guest ring-0 code is emulated
//! instruction by instruction on this project's KVM hosts, so we keep the
//! ring-0 part down to a few dozen instructions.
//!
//! - GDT: null, kernel code (0x08), kernel data (0x10, unused in 64-bit mode), user data/code (DPL 3) and a 64-bit TSS
//!   descriptor whose base is patched in by the entry code (an address cannot
//!   be split into descriptor fields at assembly time).
//! - TSS: `rsp0` points at the ring-0 stack; the I/O permission bitmap is all
//!   zeros over all 65536 ports plus the terminating `0xff` byte, so port I/O
//!   works at CPL3 even where IRETQ does not keep IOPL=3.
//! - Page tables: identity map of the first 4 GiB with 2 MiB pages, all
//!   user-accessible (U bit), the top GiB (MMIO) uncached.

use core::arch::global_asm;

/// Ring-0 64-bit code selector.
pub const KERNEL_CODE: u16 = 0x08;
/// Ring-3 data selector (RPL 3 included).
pub const USER_DATA: u16 = 0x18 | 3;
/// Ring-3 64-bit code selector (RPL 3 included).
pub const USER_CODE: u16 = 0x20 | 3;
/// TSS selector.
pub const TSS: u16 = 0x28;

/// Size of the TSS including the I/O bitmap: 104-byte header, 8192 bitmap
/// bytes (65536 ports) and the terminating `0xff` byte.
pub const TSS_SIZE: u32 = 104 + 8192 + 1;

/// The constant part of the TSS descriptor's low quadword: limit, type 0x9
/// (available 64-bit TSS) and the present bit. The entry code ORs in the base.
pub const TSS_DESC_FIXED: u64 =
    ((TSS_SIZE - 1) as u64 & 0xffff) | (0x89 << 40) | ((((TSS_SIZE - 1) >> 16) as u64 & 0xf) << 48);

/// Page-table entry flags: present, writable, user.
const PTE_PWU: u64 = 0x7;
/// Page-directory entry flags for a 2 MiB page: present, writable, user, PS.
const PDE_2M: u64 = 0x87;
/// Extra flags for uncached MMIO pages: PWT | PCD.
const PTE_UNCACHED: u64 = 0x18;

global_asm!(
    r#"
    .section .data.pagetables, "aw"
    .balign 4096
    .globl guest_pml4
guest_pml4:
    .quad guest_pdpt + {pwu}
    .fill 511, 8, 0
guest_pdpt:
    .quad guest_pd + 0x0000 + {pwu}
    .quad guest_pd + 0x1000 + {pwu}
    .quad guest_pd + 0x2000 + {pwu}
    .quad guest_pd + 0x3000 + {pwu}
    .fill 508, 8, 0
guest_pd:
    .set guest_pde_addr, 0
    .rept 1536
    .quad guest_pde_addr + {pde}
    .set guest_pde_addr, guest_pde_addr + 0x200000
    .endr
    .rept 512
    .quad guest_pde_addr + {pde} + {uncached}
    .set guest_pde_addr, guest_pde_addr + 0x200000
    .endr

    .section .data.gdt, "aw"
    .balign 16
    .globl guest_gdt
guest_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
    .quad 0
    .quad 0
guest_gdt_end:
    .balign 16
    .globl guest_gdt_ptr
guest_gdt_ptr:
    .short guest_gdt_end - guest_gdt - 1
    .quad guest_gdt

    .section .data.tss, "aw"
    .balign 16
    .globl guest_tss
guest_tss:
    .long 0
    .quad guest_kstack_top
    .fill 88, 1, 0
    .short 0
    .short 104
    .fill 8192, 1, 0
    .byte 0xff

    .section .stack, "aw", @nobits
    .balign 4096
guest_kstack:
    .skip 4096
    .globl guest_kstack_top
guest_kstack_top:
    .skip 4096
guest_ustack:
    .skip 256 * 1024
    .globl guest_ustack_top
guest_ustack_top:
"#,
    pwu = const PTE_PWU,
    pde = const PDE_2M,
    uncached = const PTE_UNCACHED,
);
