/*
 * The host side of the CUDA emulation (cuda_emu.h describes the execution model): launching a
 * kernel function on a grid.
 */
#ifndef SUPCON_CUDA_EMU_RUNTIME_H
#define SUPCON_CUDA_EMU_RUNTIME_H

#include <stddef.h>

#include "../supcon_params.h"
#include "cuda_emu.h"

/* Results of a launch (also returned by supcon_emu_launch). */
#define SUPCON_EMU_OK 0
#define SUPCON_EMU_UNKNOWN_KERNEL 1
#define SUPCON_EMU_BAD_GRID 2          /* a grid dimension is 0 or above CUDA's limit */
#define SUPCON_EMU_BAD_BLOCK 3         /* a block dimension is 0, or more than 1024 threads */
#define SUPCON_EMU_DYNAMIC_SHARED 4    /* more dynamic shared memory than a block gets on sm_90 */
#define SUPCON_EMU_NULL_ARGUMENT 5
#define SUPCON_EMU_BAD_PARAMS 6        /* a parameter block of another size than the kernel's */

namespace supcon_emu {

/* The most dynamic shared memory a block may have: sm_90's 227 KiB. */
constexpr size_t kMaxDynamicSharedBytes = 227 * 1024;

/* A kernel as the emulation calls it: with the address of its parameter block. */
using Kernel = void (*)(const void* params);

/* Runs `kernel` on every thread of every block of `grid` (blocks in order, one at a time) and
 * returns when all have finished. Launches from several host threads are serialised. */
int launch(Kernel kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes, const void* params);

/* The emulation's entry for a kernel `kernel(P)`: copies the block at `params` into a P. */
template <typename P, void (*kernel)(P)>
void entry(const void* params) {
    P copy;
    memcpy(&copy, params, sizeof copy);
    kernel(copy);
}

} // namespace supcon_emu

#endif /* SUPCON_CUDA_EMU_RUNTIME_H */
