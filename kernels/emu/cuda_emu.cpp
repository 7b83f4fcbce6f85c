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

/* Everything the threads of one launch share. */
struct Launch {
    Launch(Kernel kernel, dim3 grid, dim3 block, const SupconParams& params, unsigned threads)
        : kernel(kernel), grid(grid), block(block), params(params), threads(threads), block_barrier(threads),
          exchange((threads + kWarpSize - 1) / kWarpSize * 2 * kWarpSize) {
        for (unsigned first = 0; first < threads; first += kWarpSize) {
            const unsigned lanes = threads - first < kWarpSize ? threads - first : kWarpSize;
            warp_barriers.push_back(std::make_unique<std::barrier<>>(lanes));
        }
    }

    Kernel kernel;
    dim3 grid;
    dim3 block;
    const SupconParams& params;
    unsigned threads;
    std::barrier<> block_barrier;
    std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
    /* Per warp, two alternating rounds of 32 slots: a shuffle writes its round's slots, waits on
     * the warp barrier, reads. The next shuffle uses the other round, and the one after that may
     * overwrite this round only after passing another warp barrier, which every lane reaches only
     * after its read: one barrier per shuffle suffices. */
    std::vector<uint64_t> exchange;
};

/* The launch and CUDA thread this OS thread is currently playing. */
thread_local Launch* current_launch = nullptr;
thread_local unsigned current_thread = 0;
thread_local unsigned shuffle_round = 0;

void run_thread(Launch& launch, unsigned thread) {
    current_launch = &launch;
    current_thread = thread;
    shuffle_round = 0;
    blockDim = launch.block;
    gridDim = launch.grid;
    threadIdx = uint3{thread % launch.block.x, thread / launch.block.x % launch.block.y,
                      thread / (launch.block.x * launch.block.y)};
    for (unsigned z = 0; z < launch.grid.z; ++z) {
        for (unsigned y = 0; y < launch.grid.y; ++y) {
            for (unsigned x = 0; x < launch.grid.x; ++x) {
                blockIdx = uint3{x, y, z};
                launch.kernel(launch.params);
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

} // namespace

void sync_block() {
    if (current_launch == nullptr) fail("__syncthreads() outside a kernel");
    current_launch->block_barrier.arrive_and_wait();
}

uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask) {
    if (current_launch == nullptr) fail("warp shuffle outside a kernel");
    Launch& launch = *current_launch;
    const unsigned warp = current_thread / kWarpSize;
    const unsigned lane = current_thread % kWarpSize;
    const unsigned lanes = launch.threads - warp * kWarpSize < kWarpSize ? launch.threads - warp * kWarpSize : kWarpSize;
    const unsigned all_lanes = lanes == kWarpSize ? 0xffffffffu : (1u << lanes) - 1u;
    if (mask != all_lanes) fail("only shuffles over all lanes of a warp are emulated");
    if (lane_mask < 0 || lane_mask >= static_cast<int>(kWarpSize)) fail("shuffle lane mask out of range");
    uint64_t* slots = &launch.exchange[(warp * 2 + shuffle_round % 2) * kWarpSize];
    ++shuffle_round;
    slots[lane] = bits;
    launch.warp_barriers[warp]->arrive_and_wait();
    const unsigned source = lane ^ static_cast<unsigned>(lane_mask);
    /* CUDA leaves a lane with no source (beyond a partial last warp) its own value. */
    return source < lanes ? slots[source] : bits;
}

int launch(Kernel kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes, const SupconParams& params) {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u) {
        return SUPCON_EMU_BAD_GRID;
    }
    if (block.x == 0 || block.y == 0 || block.z == 0 || block.z > 64u ||
        static_cast<uint64_t>(block.x) * block.y * block.z > kMaxBlockThreads) {
        return SUPCON_EMU_BAD_BLOCK;
    }
    if (dynamic_shared_bytes != 0) return SUPCON_EMU_DYNAMIC_SHARED;
    static WorkerPool pool;
    Launch state(kernel, grid, block, params, block.x * block.y * block.z);
    pool.run(state);
    return SUPCON_EMU_OK;
}

} // namespace supcon_emu
