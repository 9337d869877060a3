//! Byte-range locks (src/device/rangelock.rs, `RangeLocks`), taken by every write on a mirrored
//! volume and by read repair: the uncontended lock/unlock pair, its growth with the number of
//! ranges already held (the lock scans a list), and many tokio tasks contending for overlapping and
//! for disjoint ranges.
//!
//! Run: `cargo bench --bench rangelock`. Results and their meaning: docs/PERFORMANCE.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use superdisk::device::RangeLocks;

const BLOCK: u64 = 4096;

fn uncontended(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let mut g = c.benchmark_group("rangelock_uncontended");
    // `held` other, disjoint ranges stay locked meanwhile, as the writes of a deep queue would:
    // the lock checks the new range against each of them.
    for held in [0u64, 32, 256] {
        g.bench_with_input(BenchmarkId::new("lock_unlock_4k", format!("{held}_held")), &held, |b, &held| {
            let locks = RangeLocks::default();
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut guards = Vec::new();
                    for i in 0..held {
                        guards.push(locks.lock((i + 1) * BLOCK, (i + 2) * BLOCK).await);
                    }
                    let t = Instant::now();
                    for _ in 0..iters {
                        let g = locks.lock(black_box(0), black_box(BLOCK)).await;
                        drop(g);
                    }
                    let elapsed = t.elapsed();
                    drop(guards);
                    elapsed
                })
            })
        });
    }
    g.finish();
}

/// `tasks` tasks on a multi-thread runtime each take and release a lock `per_task` times, holding
/// it across one yield (so others run while it is held, as they would during a device write).
/// `overlap`: all want the same 4 KiB; otherwise each its own. Returns the time for all of them.
async fn contend(locks: Arc<RangeLocks>, tasks: u64, per_task: u64, overlap: bool) -> Duration {
    let t = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let locks = locks.clone();
            tokio::spawn(async move {
                let start = if overlap { 0 } else { i * BLOCK };
                for _ in 0..per_task {
                    let g = locks.lock(start, start + BLOCK).await;
                    tokio::task::yield_now().await;
                    drop(g);
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("task");
    }
    t.elapsed()
}

fn contended(c: &mut Criterion) {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(4);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).build().expect("multi-thread runtime");
    let mut g = c.benchmark_group("rangelock_tasks");
    g.sample_size(10);
    const PER_TASK: u64 = 200;
    for tasks in [2u64, 8, 32] {
        g.throughput(Throughput::Elements(tasks * PER_TASK));
        for overlap in [false, true] {
            let name = if overlap { "same_range" } else { "disjoint" };
            g.bench_with_input(BenchmarkId::new(name, format!("{tasks}_tasks")), &tasks, |b, &tasks| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += contend(Arc::new(RangeLocks::default()), tasks, PER_TASK, overlap).await;
                        }
                        total
                    })
                })
            });
        }
    }
    g.finish();
}

fn config() -> Criterion {
    // Short runs: the whole `cargo bench` should finish in minutes on a 2-CPU machine.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! { name = benches; config = config(); targets = uncontended, contended }
criterion_main!(benches);
