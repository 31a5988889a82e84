#include "threadpool.h"

#include <algorithm>
#include <chrono>
#include <new>

#include <pthread.h>

namespace hmoe {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
}

// Spin for up to `us` microseconds until pred() holds; true if it did.
template <class Pred>
bool spin_until(Pred pred, int us) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
    for (int i = 0;; ++i) {
        if (pred()) return true;
        if ((i & 63) == 63) {
            if (std::chrono::steady_clock::now() > until) return false;
            std::this_thread::yield();  // two cores are shared: let a preempted task holder run
        }
        cpu_relax();
    }
}

constexpr int kWaiterSpinUs = 2000;

}  // namespace

void Job::set_phases(const int* counts, int n) {
    n_phases_ = n;
    start_[0] = 0;
    for (int p = 0; p < n; ++p) {
        count_[p] = counts[p];
        start_[p + 1] = start_[p] + counts[p];
        done_[p].store(0, std::memory_order_relaxed);
    }
    next_.store(0, std::memory_order_relaxed);
    completed_.store(0, std::memory_order_release);
    users_ = 0;
}

ThreadPool& ThreadPool::instance() {
    static ThreadPool pool;
    return pool;
}

// A forked child has none of the parent's worker threads: forget them (never join) and run jobs on
// the calling thread until set_threads starts new ones.
void ThreadPool::after_fork_child() {
    ThreadPool& p = instance();
    new (&p.mu_) std::mutex();
    new (&p.work_cv_) std::condition_variable();
    new (&p.done_cv_) std::condition_variable();
    for (auto& t : p.workers_) t.detach();
    p.workers_.clear();
    p.queue_.clear();
    p.n_threads_ = 1;
    p.stop_ = false;
}

ThreadPool::ThreadPool() { pthread_atfork(nullptr, nullptr, &ThreadPool::after_fork_child); }

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::start_workers(int n) {
    stop_ = false;
    for (int i = 0; i < n; ++i) workers_.emplace_back([this] { worker_loop(); });
}

void ThreadPool::stop_workers() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
}

void ThreadPool::set_threads(int n) {
    n = std::max(1, n);
    if (n == n_threads_ && (int)workers_.size() == n - 1) return;
    stop_workers();  // jobs in flight keep running on their waiting callers
    n_threads_ = n;
    start_workers(n - 1);
}

void ThreadPool::submit(Job* job) {
    if (job->total_tasks() == 0) return;
    {
        std::lock_guard<std::mutex> lk(mu_);
        queue_.push_back(job);
    }
    submitted_.fetch_add(1, std::memory_order_release);
    work_cv_.notify_all();
}

void ThreadPool::work_on(Job* job) {
    const int total = job->total_tasks();
    for (;;) {
        const int i = job->next_.fetch_add(1, std::memory_order_acq_rel);
        if (i >= total) return;
        int p = 0;
        while (i >= job->start_[p + 1]) ++p;
        for (int q = 0; q < p; ++q) {  // phase barrier: earlier phases must be complete
            if (job->done_[q].load(std::memory_order_acquire) < job->count_[q])
                spin_until([&] { return job->done_[q].load(std::memory_order_acquire) >= job->count_[q]; },
                           1 << 30);
        }
        job->run_task(p, i - job->start_[p]);
        job->done_[p].fetch_add(1, std::memory_order_acq_rel);
        if (job->completed_.fetch_add(1, std::memory_order_acq_rel) + 1 == total) {
            std::lock_guard<std::mutex> lk(mu_);
            done_cv_.notify_all();
        }
    }
}

Job* ThreadPool::pick_locked() {
    while (!queue_.empty() && queue_.front()->exhausted()) queue_.pop_front();
    for (Job* j : queue_)
        if (!j->exhausted()) return j;
    return nullptr;
}

void ThreadPool::worker_loop() {
    uint64_t seen = submitted_.load(std::memory_order_acquire);
    for (;;) {
        Job* job = nullptr;
        {
            std::unique_lock<std::mutex> lk(mu_);
            if (!stop_) job = pick_locked();
            if (!job && !stop_) {
                lk.unlock();
                spin_until([&] { return submitted_.load(std::memory_order_acquire) != seen; },
                           spin_us_.load(std::memory_order_relaxed));
                lk.lock();
                work_cv_.wait(lk, [&] { return stop_ || (job = pick_locked()) != nullptr; });
            }
            if (stop_) return;
            seen = submitted_.load(std::memory_order_acquire);
            ++job->users_;
        }
        work_on(job);
        {
            std::lock_guard<std::mutex> lk(mu_);
            if (--job->users_ == 0) done_cv_.notify_all();
        }
    }
}

void ThreadPool::wait(Job* job) {
    if (job->total_tasks() == 0) return;
    work_on(job);
    if (!job->finished()) spin_until([&] { return job->finished(); }, kWaiterSpinUs);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return job->finished() && job->users_ == 0; });
    auto it = std::find(queue_.begin(), queue_.end(), job);
    if (it != queue_.end()) queue_.erase(it);
}

}  // namespace hmoe
