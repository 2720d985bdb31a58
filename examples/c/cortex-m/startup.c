/* Minimal Cortex-M startup for running examples/c/main.c under qemu-system-arm with semihosting:
 *
 *   arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 --specs=rdimon.specs \
 *       -DSTACK_TOP=0x00400000 startup.c ../main.c libmodel.a -Wl,--section-start=.vectors=0x0 -o fw.elf
 *   qemu-system-arm -M mps2-an386 -cpu cortex-m4 -nographic -semihosting-config enable=on,target=native -kernel fw.elf
 *
 * The vector table sits at address 0 (where the MPS2/MPS3 boards boot); the reset handler turns on the FPU, which
 * the generated code uses, then enters newlib's semihosting C runtime (which sets up the stack and calls main).
 * Real firmware has its own startup file: only the FPU enable matters to edgecc's code. */
#ifndef STACK_TOP
#define STACK_TOP 0x00400000u
#endif

extern void _start(void);

void reset_handler(void) {
    *(volatile unsigned *)0xE000ED88u |= 0xFu << 20; /* CPACR: full access to CP10/CP11 (the FPU) */
    __asm volatile("dsb\n\tisb");
    _start();
}

__attribute__((section(".vectors"), used)) const void *const vectors[2] = {(const void *)STACK_TOP,
                                                                           (const void *)reset_handler};
