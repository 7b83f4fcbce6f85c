/*
 * The execution engine of the CUDA emulation (see cuda_emu.h for the model).
 *
 * A pool of worker threads lives for the whole process. A launch hands every worker with an id
 * below the block size the same job; worker t plays CUDA thread t (threadIdx from t) in every
 * block of the grid, in order, and waits on the block barrier after each block so that no thread
 * starts block b + 1 (and reuses the static "__shared__" storage) while another is still in
 * block b. One dispatch per launch, not per block: the per-block cost is one barrier.
 */
#include "cuda_emu_runtime.h"

#include <barrier>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace supcon_emu {
namespace {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxBlockThreads = 1024;
/* Bytes one lane contributes to a warp exchange (a shuffle: 8; an mma's A and B fragments: 24). */
constexpr size_t kExchangeBytes = 32;

/* Everything the threads of one launch share. */
struct Launch {
    Launch(Kernel kernel, dim3 grid, dim3 block, const void* params, unsigned threads,
           size_t dynamic_shared_bytes)
        : kernel(kernel), grid(grid), block(block), params(params), threads(threads), block_barrier(threads),
          exchange((threads + kWarpSize - 1) / kWarpSize * 2 * kWarpSize * kExchangeBytes),
          dynamic_shared(dynamic_shared_bytes) {
        for (unsigned first = 0; first < threads; first += kWarpSize) {
            const unsigned lanes = threads - first < kWarpSize ? threads - first : kWarpSize;
            warp_barriers.push_back(std::make_unique<std::barrier<>>(lanes));
        }
    }

    Kernel kernel;
    dim3 grid;
    dim3 block;
    const void* params;
    unsigned threads;
    std::barrier<> block_barrier;
    std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
    /* Per warp, two alternating rounds of 32 slots of kExchangeBytes: an exchange (a shuffle, a
     * fragment gather) writes its round's slots, waits on the warp barrier, reads. The next
     * exchange uses the other round, and the one after that may overwrite this round only after
     * passing another warp barrier, which every lane reaches only after its read: one barrier
     * per exchange suffices. */
    std::vector<unsigned char> exchange;
    /* The block's dynamic shared memory: one buffer of exactly the launch's size (so that
     * AddressSanitizer sees an access past it), reused by the blocks in turn like the statics. */
    std::vector<unsigned char> dynamic_shared;
};

/* One cp.async copy, performed when a wait retires its group. */
struct AsyncCopy {
    void* destination;
    const void* source;
    size_t bytes;        /* written at destination */
    size_t source_bytes; /* read from source; the rest is zero-filled */
};

/* The launch and CUDA thread this OS thread is currently playing. */
thread_local Launch* current_launch = nullptr;
thread_local unsigned current_thread = 0;
thread_local unsigned exchange_round = 0;
/* This thread's committed cp.async groups, oldest first, and the copies not yet committed. */
thread_local std::deque<std::vector<AsyncCopy>> async_groups;
thread_local std::vector<AsyncCopy> async_uncommitted;

void run_thread(Launch& launch, unsigned thread) {
    current_launch = &launch;
    current_thread = thread;
    exchange_round = 0;
    blockDim = launch.block;
    gridDim = launch.grid;
    threadIdx = uint3{thread % launch.block.x, thread / launch.block.x % launch.block.y,
                      thread / (launch.block.x * launch.block.y)};
    for (unsigned z = 0; z < launch.grid.z; ++z) {
        for (unsigned y = 0; y < launch.grid.y; ++y) {
            for (unsigned x = 0; x < launch.grid.x; ++x) {
                blockIdx = uint3{x, y, z};
                launch.kernel(launch.params);
                /* Copies a kernel never waited for complete on the GPU into memory nobody reads;
                 * here they are dropped, never landing in the next block's shared memory. */
                async_groups.clear();
                async_uncommitted.clear();
                launch.block_barrier.arrive_and_wait();
            }
        }
    }
    current_launch = nullptr;
}

class WorkerPool {
  public:
    ~WorkerPool() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
        }
        wake_.notify_all();
        for (std::thread& worker : workers_) worker.join();
    }

    /* Runs `launch` on launch.threads workers and waits for them. One launch at a time. */
    void run(Launch& launch) {
        std::lock_guard<std::mutex> one_launch(launch_mutex_);
        std::unique_lock<std::mutex> lock(mutex_);
        while (workers_.size() < launch.threads) {
            const unsigned id = static_cast<unsigned>(workers_.size());
            workers_.emplace_back([this, id, seen = generation_] { work(id, seen); });
        }
        job_ = &launch;
        job_threads_ = launch.threads;
        pending_ = launch.threads;
        ++generation_;
        wake_.notify_all();
        done_.wait(lock, [this] { return pending_ == 0; });
        job_ = nullptr;
    }

  private:
    void work(unsigned id, uint64_t seen) {
        for (;;) {
            Launch* launch;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
                /* Decided under the lock, without touching the Launch: a worker outside the block
                 * is not counted in pending_, so its launch may be over (job_ reset) or over and
                 * replaced by another at the same address by the time it looks. */
                if (job_ == nullptr || id >= job_threads_) continue;
                launch = job_;
            }
            run_thread(*launch, id);
            std::lock_guard<std::mutex> lock(mutex_);
            if (--pending_ == 0) done_.notify_one();
        }
    }

    std::mutex launch_mutex_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::condition_variable done_;
    std::vector<std::thread> workers_;
    Launch* job_ = nullptr;
    /* job_->threads, readable under mutex_ while job_ may be gone. */
    unsigned job_threads_ = 0;
    uint64_t generation_ = 0;
    unsigned pending_ = 0;
    bool stop_ = false;
};

[[noreturn]] void fail(const char* message) {
    std::fprintf(stderr, "supcon CUDA emulation: %s\n", message);
    std::abort();
}

/* Lanes of the current thread's warp, and the mask naming them all. */
unsigned warp_lanes(const Launch& launch, unsigned warp) {
    const unsigned first = warp * kWarpSize;
    return launch.threads - first < kWarpSize ? launch.threads - first : kWarpSize;
}

/* Every lane of the warp contributes `bytes` at `mine`; returns the warp's contributions, lane
 * by lane, kExchangeBytes apart (valid until this thread's exchange after next). */
const unsigned char* exchange(const void* mine, size_t bytes, const char* what) {
    if (current_launch == nullptr) fail(what);
    if (bytes > kExchangeBytes) fail("a warp exchange of more than kExchangeBytes per lane");
    Launch& launch = *current_launch;
    const unsigned warp = current_thread / kWarpSize;
    unsigned char* slots = &launch.exchange[(warp * 2 + exchange_round % 2) * kWarpSize * kExchangeBytes];
    ++exchange_round;
    memcpy(slots + (current_thread % kWarpSize) * kExchangeBytes, mine, bytes);
    launch.warp_barriers[warp]->arrive_and_wait();
    return slots;
}

} // namespace

void sync_block() {
    if (current_launch == nullptr) fail("__syncthreads() outside a kernel");
    current_launch->block_barrier.arrive_and_wait();
}

uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask) {
    if (current_launch == nullptr) fail("warp shuffle outside a kernel");
    const unsigned lanes = warp_lanes(*current_launch, current_thread / kWarpSize);
    const unsigned all_lanes = lanes == kWarpSize ? 0xffffffffu : (1u << lanes) - 1u;
    if (mask != all_lanes) fail("only shuffles over all lanes of a warp are emulated");
    if (lane_mask < 0 || lane_mask >= static_cast<int>(kWarpSize)) fail("shuffle lane mask out of range");
    const unsigned char* slots = exchange(&bits, sizeof bits, "warp shuffle outside a kernel");
    const unsigned source = (current_thread % kWarpSize) ^ static_cast<unsigned>(lane_mask);
    /* CUDA leaves a lane with no source (beyond a partial last warp) its own value. */
    if (source >= lanes) return bits;
    uint64_t value;
    memcpy(&value, slots + source * kExchangeBytes, sizeof value);
    return value;
}

void warp_gather(const void* mine, size_t bytes, void* all) {
    if (current_launch == nullptr) fail("warp-wide instruction outside a kernel");
    if (warp_lanes(*current_launch, current_thread / kWarpSize) != kWarpSize) {
        fail("warp-wide instructions (mma, ldmatrix) need a full warp");
    }
    const unsigned char* slots = exchange(mine, bytes, "warp-wide instruction outside a kernel");
    for (unsigned lane = 0; lane < kWarpSize; ++lane) {
        memcpy(static_cast<unsigned char*>(all) + lane * bytes, slots + lane * kExchangeBytes, bytes);
    }
}

unsigned char* dynamic_shared() {
    if (current_launch == nullptr) fail("dynamic shared memory outside a kernel");
    if (current_launch->dynamic_shared.empty()) fail("dynamic shared memory used by a launch that asked for none");
    return current_launch->dynamic_shared.data();
}

void async_copy(void* destination, const void* source, size_t bytes, size_t source_bytes) {
    if (current_launch == nullptr) fail("cp.async outside a kernel");
    async_uncommitted.push_back(AsyncCopy{destination, source, bytes, source_bytes});
}

void async_commit() {
    async_groups.push_back(std::move(async_uncommitted));
    async_uncommitted.clear();
}

void async_wait(unsigned pending) {
    while (async_groups.size() > pending) {
        for (const AsyncCopy& copy : async_groups.front()) {
            memcpy(copy.destination, copy.source, copy.source_bytes);
            memset(static_cast<unsigned char*>(copy.destination) + copy.source_bytes, 0,
                   copy.bytes - copy.source_bytes);
        }
        async_groups.pop_front();
    }
}

int launch(Kernel kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes, const void* params) {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u) {
        return SUPCON_EMU_BAD_GRID;
    }
    if (block.x == 0 || block.y == 0 || block.z == 0 || block.z > 64u ||
        static_cast<uint64_t>(block.x) * block.y * block.z > kMaxBlockThreads) {
        return SUPCON_EMU_BAD_BLOCK;
    }
    if (dynamic_shared_bytes > kMaxDynamicSharedBytes) return SUPCON_EMU_DYNAMIC_SHARED;
    static WorkerPool pool;
    Launch state(kernel, grid, block, params, block.x * block.y * block.z, dynamic_shared_bytes);
    pool.run(state);
    return SUPCON_EMU_OK;
}

} // namespace supcon_emu
