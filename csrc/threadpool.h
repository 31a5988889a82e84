// Persistent thread pool running phased jobs.
// A job is a list of phases; the tasks of one phase run in any order on any thread, and a task of
// phase p starts only after every task of the phases before it finished. Threads claim tasks with one
// atomic counter, so a thread may join a job at any time (the caller joins when it waits).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace hmoe {

class Job {
public:
    static constexpr int MAX_PHASES = 6;
    virtual ~Job() = default;
    virtual void run_task(int phase, int index) = 0;

    // Must be called before the job is submitted; resets all progress counters.
    void set_phases(const int* counts, int n);
    int total_tasks() const { return start_[n_phases_]; }
    bool finished() const { return completed_.load(std::memory_order_acquire) >= total_tasks(); }

private:
    friend class ThreadPool;
    bool exhausted() const { return next_.load(std::memory_order_relaxed) >= total_tasks(); }
    int n_phases_ = 0;
    int count_[MAX_PHASES] = {};
    int start_[MAX_PHASES + 1] = {};
    std::atomic<int> next_{0};
    std::atomic<int> done_[MAX_PHASES];
    std::atomic<int> completed_{0};
    int users_ = 0;  // worker threads inside the job; guarded by the pool mutex
};

class ThreadPool {
public:
    static ThreadPool& instance();
    ~ThreadPool();

    // Total threads working on a job, the waiting caller included (so n - 1 workers).
    void set_threads(int n);
    int threads() const { return n_threads_; }

    // How long an idle worker polls for the next job before it sleeps. Decode issues small ops
    // back to back (a sleeping worker costs a wake-up per op); while other threads (torch's) want
    // the cores, a short poll leaves them free.
    void set_spin_us(int us) { spin_us_.store(us < 0 ? 0 : us, std::memory_order_relaxed); }
    int spin_us() const { return spin_us_.load(std::memory_order_relaxed); }

    void submit(Job* job);  // workers start at once
    void wait(Job* job);    // the caller helps, then returns once no thread touches the job
    void run(Job* job) {
        submit(job);
        wait(job);
    }

private:
    ThreadPool();
    static void after_fork_child();
    void start_workers(int n);
    void stop_workers();
    void worker_loop();
    void work_on(Job* job);
    Job* pick_locked();

    int n_threads_ = 1;
    std::vector<std::thread> workers_;
    std::mutex mu_;
    std::condition_variable work_cv_;  // workers wait for jobs
    std::condition_variable done_cv_;  // waiters wait for completion / workers leaving
    std::deque<Job*> queue_;
    std::atomic<uint64_t> submitted_{0};
    bool stop_ = false;
    std::atomic<int> spin_us_{200};
};

}  // namespace hmoe
