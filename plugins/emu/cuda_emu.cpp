// The CPU side of plugins/emu/cuda_emu.h: the block scheduler (one fiber per CUDA thread, switched
// only at barriers) and the few CUDA runtime calls the launchers, plugins and harness make.
// Single-threaded by design: one block runs at a time, so __shared__ statics and atomics need no
// locking. Errors are sticky until cudaGetLastError() reads them, as on a device.
// Fibers switch with _setjmp/_longjmp (no signal-mask system call, unlike swapcontext); ucontext
// only starts them. glibc's fortified longjmp refuses jumps between stacks, hence the #undef.
// AddressSanitizer builds (kernels_ext.load(sanitize="address")) need nothing special: the fiber
// switches are deliberately NOT announced to ASan (__sanitizer_start_switch_fiber), because its
// longjmp interceptor would then unpoison every live frame of the fiber at each switch and hide
// overflows of thread-local arrays. Unannounced, it ignores the jumps (one warning) and a reused
// fiber stack is cleaned by its swapcontext interceptor when the next fiber starts on it. Shared
// memory and cudaMalloc are exact-size heap blocks, so an overrun lands in ASan's red zone.
// ThreadSanitizer builds (sanitize="thread") make every CUDA thread a TSan fiber and switch
// without synchronization, so TSan sees the threads of a block as concurrent; the happens-before
// edges are exactly CUDA's: each barrier (__syncthreads*, and the warp-synchronous ops for their
// lanes) is a release by every arriving thread and an acquire by every leaving one, blocks and
// launches are ordered (as a stream orders launches; blocks of one launch are not ordered on a
// GPU, so races between blocks are not reported), and the emulator's own bookkeeping is hidden
// from TSan. Atomics are relaxed, as on a GPU: they order nothing.
#undef _FORTIFY_SOURCE
#include "cuda_emu.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#if !defined(__SANITIZE_THREAD__) && defined(__has_feature)
#if __has_feature(thread_sanitizer) // clang's spelling
#define __SANITIZE_THREAD__ 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateIgnoreReadsBegin(char const* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(char const* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(char const* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(char const* file, int line);
#endif

#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

namespace hatrt
{
namespace emu
{

uint3 g_threadIdx{};
uint3 g_blockIdx{};
dim3 g_blockDim{};
dim3 g_gridDim{};

namespace
{

//! ThreadSanitizer hooks (no-ops in other builds).
namespace tsan
{
#if defined(__SANITIZE_THREAD__)
void* current()
{
    return __tsan_get_current_fiber();
}
void* create()
{
    return __tsan_create_fiber(0);
}
void switch_to(void* fiber)
{
    __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync);
}
void release(void* token)
{
    __tsan_release(token);
}
void acquire(void* token)
{
    __tsan_acquire(token);
}
//! The emulator's own bookkeeping (fiber states, exchange buffers, the scheduler) is not the
//! kernel's: its reads and writes are hidden from TSan while one of these lives.
struct Hidden
{
    Hidden()
    {
        AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
        AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
    }
    ~Hidden()
    {
        AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
        AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    }
    Hidden(Hidden const&) = delete;
    Hidden& operator=(Hidden const&) = delete;
};
#else
void* current()
{
    return nullptr;
}
void* create()
{
    return nullptr;
}
void switch_to(void*) {}
void release(void*) {}
void acquire(void*) {}
struct Hidden
{
};
#endif
char g_block_start = 0, g_block_end = 0; // sync tokens: scheduler -> a block's threads -> scheduler
void* g_scheduler = nullptr;             // the scheduler's TSan context
} // namespace tsan

// An H100/H200 (the limits a launch is checked against).
constexpr int kNumSms = 132;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kDefaultSmem = 48 * 1024;
constexpr int kSmemOptin = 227 * 1024;
constexpr size_t kStackBytes = size_t(256) << 10;

enum class State
{
    kRunnable,
    kBlockBarrier,
    kWarpBarrier,
    kDone,
};

struct Fiber
{
    ucontext_t ctx{}; // only to start the fiber
    jmp_buf env{};    // where it continues
    bool started = false;
    void* stack = nullptr;
    State state = State::kRunnable;
    uint3 tid{};
    int pred = 0;             // block barrier contribution
    unsigned mask = 0;        // warp barrier mask
    unsigned generation = 0;  // warp barrier generation the lane waits on
    struct Copy
    {
        void* dst;
        void const* src;
        size_t bytes;
    };
    std::vector<Copy> pending; // cp.async copies not waited for yet
    void* tsan = nullptr;      // its ThreadSanitizer context (TSan builds)
};

struct Warp
{
    unsigned char values[2][32 * kExchangeBytes] = {}; // double-buffered by generation parity
    unsigned generation = 0;
    char token[2] = {}; // TSan sync objects, by generation parity
};

//! Dynamic shared memory of the running block: exactly the launch's size, from the heap, so an
//! AddressSanitizer build reports an access past its end.
struct SharedMemory
{
    unsigned char* data = nullptr;
    explicit SharedMemory(size_t n)
    {
        void* p = nullptr;
        if (posix_memalign(&p, 128, n == 0 ? 1 : n) == 0)
            data = static_cast<unsigned char*>(p);
    }
    ~SharedMemory()
    {
        std::free(data);
    }
    SharedMemory(SharedMemory const&) = delete;
    SharedMemory& operator=(SharedMemory const&) = delete;
};

struct Block
{
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    SharedMemory* smem = nullptr;
    int barrier_result = 0;
    int reduce = 0;
    unsigned barrier_generation = 0; // completed block barriers
    char barrier_token[2] = {};      // TSan sync objects, by generation parity
    Fiber* current = nullptr;
    ucontext_t scheduler{}; // only for the first switch into a fiber
    jmp_buf sched_env{};
    std::function<void()> const* body = nullptr;
    std::string error;
    bool fault = false; // error is a device fault (misaligned access), not a deadlock
};

Block* g_block = nullptr;
cudaError_t g_sticky = cudaSuccess;
std::string g_message;
std::map<void const*, int> g_smem_attr;
unsigned g_launches = 0;

void fail(cudaError_t err, std::string msg)
{
    if (g_sticky == cudaSuccess)
    {
        g_sticky = err;
        g_message = std::move(msg);
    }
}

std::string where(Fiber const& f)
{
    char buf[96];
    std::snprintf(buf, sizeof(buf), "block (%u,%u,%u) thread (%u,%u,%u)", g_blockIdx.x, g_blockIdx.y, g_blockIdx.z,
        f.tid.x, f.tid.y, f.tid.z);
    return buf;
}

void fiber_main()
{
    tsan::acquire(&tsan::g_block_start);
    Block& b = *g_block;
    (*b.body)();
    async_wait_all(); // copies still in flight land anyway
    tsan::release(&tsan::g_block_end);
    {
        tsan::Hidden hidden;
        b.current->state = State::kDone;
    }
    tsan::switch_to(tsan::g_scheduler);
    _longjmp(b.sched_env, 1); // never returns through uc_link
}

void yield()
{
    Block& b = *g_block;
    if (_setjmp(b.current->env) == 0)
    {
        // everything the thread did so far happens before the scheduler's next block (which it
        // only acquires between blocks, so threads of one block stay unordered); also when the
        // launch is abandoned here (a deadlock or a fault)
        tsan::release(&tsan::g_block_end);
        tsan::switch_to(tsan::g_scheduler);
        _longjmp(b.sched_env, 1);
    }
}

//! The running thread waits at a barrier until the scheduler completes it. For TSan the barrier
//! is a release by every arriving thread and an acquire by every leaving one, on the sync object
//! of this barrier generation (`token`).
void park(State state, char* token)
{
    g_block->current->state = state;
    tsan::release(token);
    yield();
    tsan::acquire(token);
}

//! Run fiber f until it yields or finishes. Its own frame, so that no local of the scheduler loop
//! lives across the _setjmp.
__attribute__((noinline)) void resume(Block& b, Fiber& f)
{
    b.current = &f;
    g_threadIdx = f.tid;
    if (_setjmp(b.sched_env) != 0)
        return;
    tsan::switch_to(f.tsan);
    if (!f.started)
    {
        f.started = true;
        swapcontext(&b.scheduler, &f.ctx);
    }
    else
        _longjmp(f.env, 1);
}

unsigned linear(uint3 t)
{
    return t.x + g_blockDim.x * (t.y + g_blockDim.y * t.z);
}

//! Resolve every barrier that is complete; false when none is (and nothing is runnable).
bool release(Block& b)
{
    bool any = false;
    size_t const n = b.fibers.size();
    // warps: all live lanes of the mask parked at the same warp barrier
    for (size_t w = 0; w * 32 < n; ++w)
    {
        size_t const lo = w * 32, hi = std::min(n, lo + 32);
        bool waiting = false, complete = true;
        unsigned mask = 0;
        for (size_t i = lo; i < hi; ++i)
            if (b.fibers[i].state == State::kWarpBarrier)
            {
                waiting = true;
                mask = b.fibers[i].mask;
            }
        if (!waiting)
            continue;
        for (size_t i = lo; i < hi; ++i)
        {
            Fiber const& f = b.fibers[i];
            bool const in_mask = (mask >> (i - lo)) & 1U;
            if (in_mask && f.state != State::kWarpBarrier)
                complete = false;
        }
        if (!complete)
            continue;
        for (size_t i = lo; i < hi; ++i)
            if (b.fibers[i].state == State::kWarpBarrier)
                b.fibers[i].state = State::kRunnable;
        ++b.warps[w].generation;
        any = true;
    }
    if (any)
        return true;
    // block: every live thread parked at the block barrier
    int count = 0, live = 0;
    for (Fiber const& f : b.fibers)
    {
        if (f.state == State::kDone)
            continue;
        ++live;
        if (f.state != State::kBlockBarrier)
            return false;
        count += f.pred != 0;
    }
    if (live == 0)
        return false;
    b.barrier_result = b.reduce == 0 ? count : (b.reduce == 1 ? int(count == live) : int(count > 0));
    for (Fiber& f : b.fibers)
        if (f.state == State::kBlockBarrier)
            f.state = State::kRunnable;
    ++b.barrier_generation;
    return true;
}

std::string deadlock_report(Block const& b)
{
    std::string s = "deadlock: threads wait at barriers that can never complete (";
    int shown = 0;
    for (size_t i = 0; i < b.fibers.size() && shown < 4; ++i)
    {
        Fiber const& f = b.fibers[i];
        if (f.state == State::kDone)
            continue;
        s += shown ? "; " : "";
        s += where(f);
        s += f.state == State::kBlockBarrier ? " at __syncthreads" : " at a warp-synchronous op";
        ++shown;
    }
    return s + "). A lane that exited or sits at another barrier is missing from a *_sync mask or a __syncthreads.";
}

bool run_block(Block& b, bool reverse)
{
    size_t const n = b.fibers.size();
    for (size_t i = 0; i < n; ++i)
    {
        Fiber& f = b.fibers[i];
        f.state = State::kRunnable;
        f.pred = 0;
        f.started = false;
        f.pending.clear();
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = kStackBytes;
        f.ctx.uc_link = &b.scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;)
    {
        bool ran = false;
        for (size_t k = 0; k < n; ++k)
        {
            Fiber& f = b.fibers[reverse ? n - 1 - k : k];
            if (f.state != State::kRunnable)
                continue;
            resume(b, f);
            ran = true;
            if (!b.error.empty())
                return false;
        }
        bool done = true;
        for (Fiber const& f : b.fibers)
            done = done && f.state == State::kDone;
        if (done)
            return true;
        if (!release(b) && !ran)
        {
            b.error = deadlock_report(b);
            return false;
        }
    }
}

struct Stacks
{
    std::vector<void*> stacks;
    std::vector<void*> contexts; // TSan contexts, one per stack
    bool abandoned = false;      // a launch failed with fibers mid-way: fresh TSan contexts
    ~Stacks()
    {
        for (void* s : stacks)
            munmap(s, kStackBytes);
    }
    bool reserve(size_t n)
    {
        if (abandoned)
        {
            // fresh contexts; the old ones are left alone (destroying a context parked inside
            // the emulator's hidden bookkeeping is a TSan error, and it only happens after a
            // failed launch)
            for (void*& c : contexts)
                c = tsan::create();
            abandoned = false;
        }
        while (stacks.size() < n)
        {
            void* s = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (s == MAP_FAILED)
                return false;
            stacks.push_back(s);
            contexts.push_back(tsan::create());
        }
        return true;
    }
};

Stacks g_stacks;

} // namespace

int block_barrier(int pred, int reduce)
{
    tsan::Hidden hidden;
    Block& b = *g_block;
    Fiber& f = *b.current;
    unsigned const generation = b.barrier_generation;
    f.pred = pred;
    b.reduce = reduce;
    park(State::kBlockBarrier, &b.barrier_token[generation & 1U]);
    return b.barrier_result;
}

unsigned char const* warp_exchange(unsigned mask, void const* src, size_t bytes)
{
    tsan::Hidden hidden;
    Block& b = *g_block;
    Fiber& f = *b.current;
    unsigned const t = linear(f.tid);
    Warp& w = b.warps[t / 32];
    unsigned const lane = t % 32;
    if (((mask >> lane) & 1U) == 0)
    {
        b.error = where(f) + ": warp-synchronous op with a mask that excludes the calling lane";
        yield(); // never resumed: the launch is abandoned
    }
    if (bytes > kExchangeBytes)
    {
        b.error = where(f) + ": warp exchange of more than 64 bytes per lane";
        yield();
    }
    // A lane can run at most one exchange ahead of the slowest (the next one waits for every lane),
    // so two buffers alternate safely.
    unsigned const gen = w.generation;
    std::memcpy(w.values[gen & 1U] + lane * kExchangeBytes, src, bytes);
    f.mask = mask;
    f.generation = gen;
    park(State::kWarpBarrier, &w.token[gen & 1U]);
    return w.values[gen & 1U];
}

void fault(std::string const& what)
{
    tsan::Hidden hidden;
    Block& b = *g_block;
    b.error = where(*b.current) + ": " + what;
    b.fault = true;
    yield(); // never resumed: the launch is abandoned
    std::abort();
}

void async_copy(void* smem, void const* gmem, size_t bytes)
{
    if (reinterpret_cast<uintptr_t>(smem) % bytes != 0 || reinterpret_cast<uintptr_t>(gmem) % bytes != 0)
        fault("misaligned cp.async of " + std::to_string(bytes) + " bytes");
    tsan::Hidden hidden;
    g_block->current->pending.push_back(Fiber::Copy{smem, gmem, bytes});
}

void async_wait_all()
{
    Fiber& f = *g_block->current;
    for (Fiber::Copy const& c : f.pending)
        std::memcpy(c.dst, c.src, c.bytes);
    f.pending.clear();
}

void* dynamic_smem()
{
    return g_block->smem->data;
}

char const* last_error_message()
{
    return g_message.c_str();
}

cudaError_t run_grid(void const* func, dim3 grid, dim3 block, size_t dynamic_smem_bytes, std::function<void()> const& body)
{
    size_t const threads = size_t(block.x) * block.y * block.z;
    auto const attr = g_smem_attr.find(func);
    size_t const smem_limit = attr == g_smem_attr.end() ? kDefaultSmem : size_t(attr->second);
    if (threads == 0 || threads > size_t(kMaxThreadsPerBlock) || grid.x == 0 || grid.y == 0 || grid.z == 0
        || grid.y > 65535 || grid.z > 65535)
    {
        fail(cudaErrorInvalidConfiguration, "invalid launch configuration (grid or block size)");
        return cudaErrorInvalidConfiguration;
    }
    if (dynamic_smem_bytes > smem_limit)
    {
        fail(cudaErrorInvalidValue,
            "launch asks for " + std::to_string(dynamic_smem_bytes) + " bytes of dynamic shared memory; the function "
                + "allows " + std::to_string(smem_limit) + " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
        return cudaErrorInvalidValue;
    }
    if (g_block != nullptr)
    {
        fail(cudaErrorLaunchFailure, "kernel launched from inside a kernel");
        return cudaErrorLaunchFailure;
    }
    if (!g_stacks.reserve(threads))
    {
        fail(cudaErrorMemoryAllocation, "no memory for the fiber stacks");
        return cudaErrorMemoryAllocation;
    }
    tsan::Hidden hidden; // the scheduler's bookkeeping; the kernel's accesses are the fibers'
    tsan::g_scheduler = tsan::current();
    Block b;
    b.fibers.resize(threads);
    b.warps.resize((threads + 31) / 32);
    b.body = &body;
    for (size_t i = 0; i < threads; ++i)
    {
        b.fibers[i].stack = g_stacks.stacks[i];
        b.fibers[i].tsan = g_stacks.contexts[i];
        b.fibers[i].tid = uint3{unsigned(i % block.x), unsigned(i / block.x % block.y), unsigned(i / block.x / block.y)};
    }
    bool const reverse = (g_launches++ & 1U) != 0;
    g_gridDim = grid;
    g_blockDim = block;
    g_block = &b;
    bool ok = true;
    for (unsigned z = 0; z < grid.z && ok; ++z)
        for (unsigned y = 0; y < grid.y && ok; ++y)
            for (unsigned x = 0; x < grid.x && ok; ++x)
            {
                g_blockIdx = uint3{x, y, z};
                SharedMemory smem(dynamic_smem_bytes);
                if (smem.data == nullptr)
                {
                    b.error = "no memory for the dynamic shared memory";
                    ok = false;
                    break;
                }
                std::memset(smem.data, 0xFF, dynamic_smem_bytes); // NaN-poisoned, like uninitialized memory
                b.smem = &smem;
                tsan::release(&tsan::g_block_start); // the host's writes and the blocks before
                ok = run_block(b, reverse);
                tsan::acquire(&tsan::g_block_end);
                b.smem = nullptr;
            }
    g_block = nullptr;
    if (!ok)
    {
        g_stacks.abandoned = true;
        cudaError_t const err = b.fault ? cudaErrorMisalignedAddress : cudaErrorLaunchFailure;
        fail(err, b.error);
        return err;
    }
    return cudaSuccess;
}

} // namespace emu
} // namespace hatrt

// ----------------------------------------------------------------------------- CUDA runtime subset
using hatrt::emu::g_message;
using hatrt::emu::g_sticky;

extern "C"
{

cudaError_t CUDARTAPI cudaGetLastError(void)
{
    cudaError_t const e = g_sticky;
    g_sticky = cudaSuccess;
    return e;
}

cudaError_t CUDARTAPI cudaPeekAtLastError(void)
{
    return g_sticky;
}

char const* CUDARTAPI cudaGetErrorName(cudaError_t error)
{
    switch (error)
    {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    default: return "cudaError (emulated)";
    }
}

char const* CUDARTAPI cudaGetErrorString(cudaError_t error)
{
    // The emulator's own text (which barrier deadlocked, which limit a launch broke) says more
    // than the generic one; it stays readable after cudaGetLastError cleared the sticky error.
    static thread_local std::string text;
    text = std::string(cudaGetErrorName(error)) + " [CUDA emulator]";
    if (error != cudaSuccess && !g_message.empty())
        text += ": " + g_message;
    return text.c_str();
}

cudaError_t CUDARTAPI cudaFuncSetAttribute(void const* func, enum cudaFuncAttribute attr, int value)
{
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    {
        if (value < 0 || value > hatrt::emu::kSmemOptin)
            return cudaErrorInvalidValue;
        hatrt::emu::g_smem_attr[func] = value;
    }
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetDeviceCount(int* count)
{
    *count = 1;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetDevice(int* device)
{
    *device = 0;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaSetDevice(int device)
{
    return device == 0 ? cudaSuccess : cudaErrorInvalidDevice;
}

cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device)
{
    if (device != 0)
        return cudaErrorInvalidDevice;
    switch (attr)
    {
    case cudaDevAttrMultiProcessorCount: *value = hatrt::emu::kNumSms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = hatrt::emu::kSmemOptin; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = hatrt::emu::kMaxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t CUDARTAPI cudaMalloc(void** ptr, size_t size)
{
    // exactly `size` bytes (256-aligned, as cudaMalloc), so ASan builds see an overrun
    *ptr = nullptr;
    return posix_memalign(ptr, 256, size == 0 ? 1 : size) == 0 ? cudaSuccess : cudaErrorMemoryAllocation;
}

cudaError_t CUDARTAPI cudaFree(void* ptr)
{
    std::free(ptr);
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemcpy(void* dst, void const* src, size_t count, enum cudaMemcpyKind)
{
    std::memcpy(dst, src, count);
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemcpyAsync(void* dst, void const* src, size_t count, enum cudaMemcpyKind, cudaStream_t)
{
    std::memcpy(dst, src, count);
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemset(void* ptr, int value, size_t count)
{
    std::memset(ptr, value, count);
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t)
{
    std::memset(ptr, value, count);
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceSynchronize(void)
{
    return g_sticky;
}

cudaError_t CUDARTAPI cudaStreamSynchronize(cudaStream_t)
{
    return g_sticky;
}

cudaError_t CUDARTAPI cudaStreamCreate(cudaStream_t* stream)
{
    *stream = nullptr;
    return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamDestroy(cudaStream_t)
{
    return cudaSuccess;
}

} // extern "C"
