//! Entry points and the ring-0 set-up (the only code that runs at CPL0).
//!
//! Two ways in, both ending at `guest_long_common` in 64-bit mode at CPL0:
//!
//! - `entry64` (the ELF entry point): Linux x86_64 boot protocol as vmm-ref
//!   sets it up: long mode, identity paging, `rsi` = `struct boot_params`.
//! - `pvh_entry`, published in the `XEN_ELFNOTE_PHYS32_ENTRY` note: 32-bit
//!   protected mode, paging off, `ebx` = `struct hvm_start_info`. It enables
//!   PAE, loads our page tables, sets EFER.LME, turns paging on and jumps to
//!   64-bit code.
//!
//! The common part loads our GDT, a null IDT (any exception is then a triple
//! fault, i.e. a visible VM shutdown rather than a jump into firmware), the TSS
//! and our page tables, makes sure SSE is usable, and IRETQs to CPL3 with
//! IF=0 (IOPL=3 requested; the TSS I/O bitmap makes port I/O work regardless).
//! Ring 3 zeroes `.bss` and calls [`crate::guest_main`] with `rdi` = boot kind
//! (0 = Linux boot params, 1 = PVH start info) and `rsi` = its address.
//!
//! 34 instructions run at CPL0 on the 64-bit path, 51 on the PVH path.

use core::arch::global_asm;

use crate::cpu;

/// `guest_main`'s first argument when entered through `entry64`.
pub const BOOT_LINUX: u64 = 0;
/// `guest_main`'s first argument when entered through the PVH note.
pub const BOOT_PVH: u64 = 1;

const CR0_MP: u32 = 1 << 1;
const CR0_EM: u32 = 1 << 2;
const CR0_TS: u32 = 1 << 3;
const CR0_NE: u32 = 1 << 5;
const CR0_PE: u32 = 1 << 0;
const CR0_PG: u32 = 1 << 31;
const CR4_PAE: u32 = 1 << 5;
const CR4_OSFXSR: u32 = 1 << 9;
const CR4_OSXMMEXCPT: u32 = 1 << 10;
const MSR_EFER: u32 = 0xc000_0080;
const EFER_LME: u32 = 1 << 8;
/// RFLAGS for ring 3: IOPL=3, reserved bit 1, IF=0.
const USER_RFLAGS: u32 = 0x3002;
/// `XEN_ELFNOTE_PHYS32_ENTRY`.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

global_asm!(
    r#"
    .section .text.boot, "ax"

    .code32
    .globl pvh_entry
pvh_entry:
    movl %ebx, %esi
    movl ${boot_pvh}, %edi
    lgdt guest_gdt_ptr
    movl %cr4, %eax
    orl ${cr4_bits}, %eax
    movl %eax, %cr4
    movl $guest_pml4, %eax
    movl %eax, %cr3
    movl ${msr_efer}, %ecx
    rdmsr
    orl ${efer_lme}, %eax
    wrmsr
    movl %cr0, %eax
    andl ${cr0_clear}, %eax
    orl ${cr0_pvh_set}, %eax
    movl %eax, %cr0
    ljmp ${kernel_code}, $guest_long_common

    .code64
    .globl entry64
entry64:
    movl ${boot_linux}, %edi
guest_long_common:
    cli
    movl %esi, %esi
    movl %edi, %edi
    lgdt guest_gdt_ptr(%rip)
    lidt guest_null_idt(%rip)
    leaq guest_kstack_top(%rip), %rsp
    movl $guest_tss, %eax
    movl %eax, %edx
    andl $0xffffff, %eax
    shlq $16, %rax
    shrl $24, %edx
    shlq $56, %rdx
    orq %rdx, %rax
    movabsq ${tss_fixed}, %rdx
    orq %rdx, %rax
    movq %rax, guest_gdt + {tss_sel}(%rip)
    movw ${tss_sel}, %ax
    ltr %ax
    movl $guest_pml4, %eax
    movq %rax, %cr3
    movq %cr0, %rax
    andl ${cr0_clear}, %eax
    orl ${cr0_set}, %eax
    movq %rax, %cr0
    movq %cr4, %rax
    orl ${cr4_bits}, %eax
    movq %rax, %cr4
    pushq ${user_data}
    pushq $guest_ustack_top
    pushq ${user_rflags}
    pushq ${user_code}
    pushq $guest_user_entry
    iretq

    .text
    .globl guest_user_entry
guest_user_entry:
    movq %rdi, %r8
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    cld
    rep stosb
    movq %r8, %rdi
    call {main}
    ud2

    .section .rodata
    .balign 16
guest_null_idt:
    .short 0
    .quad 0

    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long {xen_note_type}
    .asciz "Xen"
    .balign 4
    .quad pvh_entry
    .balign 4
"#,
    boot_pvh = const BOOT_PVH,
    boot_linux = const BOOT_LINUX,
    cr4_bits = const CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
    msr_efer = const MSR_EFER,
    efer_lme = const EFER_LME,
    cr0_clear = const !(CR0_EM | CR0_TS),
    cr0_set = const CR0_MP | CR0_NE,
    cr0_pvh_set = const CR0_PG | CR0_PE | CR0_MP | CR0_NE,
    kernel_code = const cpu::KERNEL_CODE,
    tss_fixed = const cpu::TSS_DESC_FIXED,
    tss_sel = const cpu::TSS,
    user_data = const cpu::USER_DATA,
    user_code = const cpu::USER_CODE,
    user_rflags = const USER_RFLAGS,
    xen_note_type = const XEN_ELFNOTE_PHYS32_ENTRY,
    main = sym crate::guest_main,
    options(att_syntax),
);
