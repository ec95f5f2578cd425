/* AMX's tile registers, for the kernels that multiply in them (native_attention.c,
 * native_expansion.c's tile_products): where the compiler targets AMX-BF16, tiles_granted() asks
 * Linux for them (it hands their state out only on request, once per process) and says whether it
 * did; configure_tiles() sets the eight tiles every such kernel uses, 16 rows x 64 bytes each: 0-3
 * a 32 x 32 block of fp32 sums, 4-5 the left operand's two 16-row halves, 6-7 the right operand's
 * two 16-column halves (pairs of bf16 rows side by side). A kernel releases them when it is done. */
#include <stdint.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int tiles_granted(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

void configure_tiles(void) {
    struct tile_config config = {0};
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.bytes_per_row[t] = 64;
        config.rows[t] = 16;
    }
    /* GCC's _tile_loadconfig tells the compiler it reads 8 bytes of the 64: without this, the stores
     * past them are dropped as dead (and the tiles then fault). */
    __asm__ __volatile__("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
}
#else
int tiles_granted(void) { return 0; }
#endif
