/*
 * Godwit test guest: PVH entry and ring-0 setup.
 *
 * Everything the CPU needs (page tables, GDT, TSS with I/O bitmap, IDT) is
 * static data with link-time-constant addresses; the descriptor fields that
 * need a split address come from symbols computed in link.ld.  Ring 0 runs
 * only a few dozen integer instructions (on nested "PVM" KVM each one is
 * emulated), then iretq drops to ring 3 where the C workload runs natively.
 * See src/lib.rs for the behaviour of the guest.
 */

#define SEL_KCODE   0x08
#define SEL_KDATA   0x10
#define SEL_UDATA   0x1b            /* 0x18 | RPL 3 */
#define SEL_UCODE   0x23            /* 0x20 | RPL 3 */
#define SEL_TSS     0x28

#define CR0_PE      (1 << 0)
#define CR0_MP      (1 << 1)
#define CR0_NE      (1 << 5)
#define CR0_PG      (1 << 31)
#define CR4_PAE     (1 << 5)
#define CR4_OSFXSR  (1 << 9)
#define CR4_OSXMMEXCPT (1 << 10)
#define MSR_EFER    0xc0000080
#define EFER_LME    (1 << 8)

#define PTE_P       0x01
#define PTE_W       0x02
#define PTE_U       0x04
#define PTE_PS      0x80

/* ------------------------------------------------------------------ */
/* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen", desc = entry. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz: "Xen\0" */
    .long 8                         /* descsz: QEMU reads 8 bytes on ELF64 */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start
    .balign 4

/* ------------------------------------------------------------------ */
    .section .text.boot, "ax", @progbits
    .code32
    .globl pvh_start
pvh_start:
    /* 32-bit protected mode, paging off, %ebx = hvm_start_info. */
    cli
    cld
    movl %ebx, %esi
    lgdt gdt_ptr
    movl $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl $(CR0_PE | CR0_MP | CR0_NE | CR0_PG), %eax
    movl %eax, %cr0
    ljmp $SEL_KCODE, $long_mode

    .code64
long_mode:
    movl $SEL_KDATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movl $kstack_top, %esp
    movl $SEL_TSS, %eax
    ltr %ax
    lidt idt_ptr
    /*
     * TSC kHz from CPUID 0x40000010 if the hypervisor range reaches it.
     * Done here because on PVM CPUID at CPL3 executes natively and returns
     * the outer host's leaves, not the VMM's; at CPL0 it is emulated.
     */
    xorl %r12d, %r12d
    movl $0x40000000, %eax
    xorl %ecx, %ecx
    cpuid
    cmpl $0x40000010, %eax
    jb 1f
    cmpl $0x40010000, %eax
    jae 1f
    movl $0x40000010, %eax
    xorl %ecx, %ecx
    cpuid
    movl %eax, %r12d
1:
    movl %esi, %edi                 /* arg0 = start_info (zero-extended) */
    pushq $SEL_UDATA                /* SS */
    pushq $ustack_top               /* RSP */
    pushq $0x2                      /* RFLAGS: IF=0, IOPL=0 */
    pushq $SEL_UCODE                /* CS */
    pushq $user_start               /* RIP */
    iretq

/* Ring 3 from here on: user_main(start_info, cpuid_tsc_khz). */
user_start:
    movq %rdi, %rbx
    /* Zero .bss (natively, in ring 3): the loader may not have. */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movq %rbx, %rdi
    movq %r12, %rsi                 /* arg1 = CPUID TSC kHz or 0 */
    call user_main
1:  pause
    jmp 1b

/*
 * Exception stubs for vectors 0..31, 16 bytes each, the block aligned so
 * that the IDT can be built from link-time symbols.  Each pushes a dummy
 * error code if the CPU did not, then the vector number.
 */
    .balign 512
    .globl exc_stubs
exc_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\vec == 8) || (\vec >= 10 && \vec <= 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    pushq $0
    .endif
    pushq $\vec
    jmp exc_common
    .endr

exc_common:
    movq 0(%rsp), %rdi              /* vector */
    movq 8(%rsp), %rsi              /* error code */
    movq 16(%rsp), %rdx             /* rip */
    movq %cr2, %rcx
    andq $-16, %rsp
    call exc_report                 /* C, integer only: fine at CPL0 */
    movb $3, %al
    outb %al, $0xf4                 /* debug exit */
2:  hlt
    jmp 2b

/* ------------------------------------------------------------------ */
    .section .data.boot, "aw", @progbits

/* Identity map of 0..4 GiB with 2 MiB pages, everything P|W|U. */
    .balign 4096
pml4:
    .quad pdpt + (PTE_P | PTE_W | PTE_U)
    .fill 511, 8, 0
pdpt:
    .set i, 0
    .rept 4
    .quad pd + i * 4096 + (PTE_P | PTE_W | PTE_U)
    .set i, i + 1
    .endr
    .fill 508, 8, 0
pd:
    .set i, 0
    .rept 2048
    .quad (i << 21) | (PTE_P | PTE_W | PTE_U | PTE_PS)
    .set i, i + 1
    .endr

/* GDT: null, kcode64, kdata, udata, ucode64, TSS (16 bytes). */
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, L=1 */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cff2000000ffff        /* 0x18 user data, DPL 3 */
    .quad 0x00affa000000ffff        /* 0x20 user code, L=1, DPL 3 */
    .word tss_end - tss - 1         /* 0x28 TSS: limit 15:0 */
    .word __tss_b01                 /* base 15:0 */
    .byte __tss_b2                  /* base 23:16 */
    .byte 0x89                      /* P, DPL 0, available 64-bit TSS */
    .byte 0x00                      /* G=0, limit 19:16 = 0 */
    .byte __tss_b3                  /* base 31:24 */
    .long __tss_hi                  /* base 63:32 */
    .long 0
gdt_end:

    .balign 8
    .word 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

/* IDT: 32 interrupt gates (DPL 0) to exc_stubs + 16 * vector. */
    .balign 16
idt:
    .set i, 0
    .rept 32
    .word __exc_lo + i * 16
    .word SEL_KCODE
    .byte 0
    .byte 0x8e
    .word __exc_mid
    .long __exc_hi
    .long 0
    .set i, i + 1
    .endr
idt_end:

    .balign 8
    .word 0
idt_ptr:
    .word idt_end - idt - 1
    .quad idt

/*
 * 64-bit TSS: RSP0 = kernel stack, I/O bitmap right after the 104-byte
 * header.  All ports denied except 0xf4 (debug exit) and 0x3f8..0x3ff
 * (COM1); the trailing 0xff byte is required by the CPU.
 */
    .balign 16
    .globl tss
tss:
    .long 0
    .quad kstack_top                /* RSP0 */
    .quad 0                         /* RSP1 */
    .quad 0                         /* RSP2 */
    .quad 0
    .fill 7, 8, 0                   /* IST1..7 */
    .quad 0
    .word 0
    .word iobitmap - tss            /* I/O map base */
iobitmap:
    .fill 0xf4 / 8, 1, 0xff
    .byte 0xff & ~(1 << (0xf4 % 8)) /* port 0xf4 */
    .fill 0x3f8 / 8 - 0xf4 / 8 - 1, 1, 0xff
    .byte 0x00                      /* ports 0x3f8..0x3ff */
    .fill 8192 - 0x3f8 / 8 - 1, 1, 0xff
    .byte 0xff                      /* terminator */
tss_end:

/* ------------------------------------------------------------------ */
    .section .bss.boot, "aw", @nobits
    .balign 16
kstack:
    .skip 8192
kstack_top:
ustack:
    .skip 65536
ustack_top:

    .section .note.GNU-stack, "", @progbits
