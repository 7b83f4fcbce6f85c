/*
 * Proves that the sanitizers see bugs inside emulated kernels (scripts/sanitize-emulated.sh).
 *
 *     sanitizer_selftest synchronised   a correct broadcast through shared memory: must run
 *                                       clean under ThreadSanitizer and AddressSanitizer (the
 *                                       barrier emulation gives TSan its happens-before edge)
 *     sanitizer_selftest racy           the same without the __syncthreads() between the write
 *                                       and the reads: ThreadSanitizer must report a data race
 *     sanitizer_selftest out_of_bounds  every thread writes one slot past its own, the last one
 *                                       past the shared array: AddressSanitizer must report it
 */
#include <stdio.h>
#include <string.h>

#include "cuda_emu_runtime.h"

namespace {

constexpr unsigned kBlockThreads = 64;
constexpr unsigned kBlocks = 2;

enum class Bug { kNone, kMissingBarrier, kOutOfBounds };

/* Thread 0 publishes a value in shared memory; every thread copies it to `output`.
 * (Internal linkage, like the real kernels, so that the shared array gets ASan redzones.) */
template <Bug kBug>
void broadcast(const void* output) {
    __shared__ float values[kBlockThreads];
    const unsigned slot = kBug == Bug::kOutOfBounds ? threadIdx.x + 1 : threadIdx.x;
    values[slot] = threadIdx.x == 0 ? 42.0f + static_cast<float>(blockIdx.x) : 0.0f;
    if (kBug != Bug::kMissingBarrier) __syncthreads();
    static_cast<float*>(const_cast<void*>(output))[blockIdx.x * kBlockThreads + threadIdx.x] = values[0];
}

} // namespace

int main(int argc, char** argv) {
    const char* mode = argc == 2 ? argv[1] : "";
    supcon_emu::Kernel kernel = nullptr;
    if (strcmp(mode, "synchronised") == 0) kernel = broadcast<Bug::kNone>;
    if (strcmp(mode, "racy") == 0) kernel = broadcast<Bug::kMissingBarrier>;
    if (strcmp(mode, "out_of_bounds") == 0) kernel = broadcast<Bug::kOutOfBounds>;
    if (kernel == nullptr) {
        fprintf(stderr, "usage: %s synchronised|racy|out_of_bounds\n", argv[0]);
        return 2;
    }
    static float output[kBlocks * kBlockThreads];
    const int status = supcon_emu::launch(kernel, dim3{kBlocks, 1, 1}, dim3{kBlockThreads, 1, 1}, 0, output);
    if (status != SUPCON_EMU_OK) {
        fprintf(stderr, "launch failed: %d\n", status);
        return 1;
    }
    printf("broadcast (%s) ran\n", mode);
    return 0;
}
