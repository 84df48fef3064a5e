//! Fork-join for the small parallel loops of a decoding step (a few hundred matrix-vector
//! products a token, tens of microseconds each). rayon parks idle workers and wakes them with a
//! futex on every call, which costs as much as the work here; these helpers instead spin while
//! work keeps coming and park only after a quiet millisecond.
//!
//! One caller at a time uses the helpers; a second concurrent caller runs its parts itself.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_millis(1);

type Job = *const (dyn Fn(usize) + Sync);

struct Helper {
    /// Jobs posted to this helper so far; it runs one whenever this moves past `done`.
    posted: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    parked: AtomicBool,
    job: UnsafeCell<Job>,
    thread: OnceLock<Thread>,
}

// SAFETY: `job` is written by the one caller holding `Pool::busy` before it bumps `posted`
// (release) and read by the helper after it sees the bump (acquire); the caller waits for
// `done` before the job's borrow ends.
unsafe impl Sync for Helper {}

struct Pool {
    helpers: Vec<&'static Helper>,
    busy: AtomicBool,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let helpers = (1..n)
            .filter_map(|part| {
                let h: &'static Helper = Box::leak(Box::new(Helper {
                    posted: AtomicUsize::new(0),
                    done: AtomicUsize::new(0),
                    panicked: AtomicBool::new(false),
                    parked: AtomicBool::new(false),
                    job: UnsafeCell::new(std::ptr::null::<fn(usize)>() as Job),
                    thread: OnceLock::new(),
                }));
                let t = std::thread::Builder::new()
                    .name(format!("supra-spin-{part}"))
                    .spawn(move || run(h, part))
                    .ok()?;
                h.thread.set(t.thread().clone()).ok()?;
                Some(h)
            })
            .collect();
        Pool {
            helpers,
            busy: AtomicBool::new(false),
        }
    })
}

fn run(h: &'static Helper, part: usize) {
    loop {
        let seen = h.done.load(Ordering::Relaxed);
        let mut since = Instant::now();
        let mut spins = 0u32;
        let target = loop {
            let p = h.posted.load(Ordering::Acquire);
            if p != seen {
                break p;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && since.elapsed() > SPIN {
                h.parked.store(true, Ordering::SeqCst);
                if h.posted.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                h.parked.store(false, Ordering::SeqCst);
                since = Instant::now();
            }
            std::hint::spin_loop();
        };
        // SAFETY: see `impl Sync for Helper`.
        let job = unsafe { &**h.job.get() };
        if catch_unwind(AssertUnwindSafe(|| job(part))).is_err() {
            h.panicked.store(true, Ordering::Relaxed);
        }
        h.done.store(target, Ordering::Release);
    }
}

/// How many parts [`for_each_part`] runs at once: the cores.
pub fn parts() -> usize {
    pool().helpers.len() + 1
}

/// Runs `f(0)`, …, `f(parts() − 1)`, part 0 on this thread and the others on the helpers, and
/// returns when all are done. Falls back to running every part here when another thread is
/// using the helpers.
pub fn for_each_part(f: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    let n = pool.helpers.len() + 1;
    if n == 1
        || pool
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
    {
        (0..n).for_each(f);
        return;
    }
    // SAFETY: the helpers only use this pointer until they mark the job done, and this
    // function waits for that before `f`'s borrow ends.
    let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
    for h in &pool.helpers {
        unsafe { *h.job.get() = job };
        h.posted.fetch_add(1, Ordering::SeqCst);
        if h.parked.load(Ordering::SeqCst) {
            if let Some(t) = h.thread.get() {
                t.unpark();
            }
        }
    }
    let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
    let mut panicked = false;
    for h in &pool.helpers {
        let want = h.posted.load(Ordering::Relaxed);
        while h.done.load(Ordering::Acquire) != want {
            std::hint::spin_loop();
        }
        panicked |= h.panicked.swap(false, Ordering::Relaxed);
    }
    pool.busy.store(false, Ordering::Release);
    if let Err(e) = mine {
        std::panic::resume_unwind(e);
    }
    assert!(!panicked, "a parallel part panicked on a helper thread");
}

/// `0..len` cut into `parts()` ranges whose boundaries are multiples of `align`.
pub fn split(len: usize, align: usize, part: usize) -> std::ops::Range<usize> {
    let per = len.div_ceil(parts()).next_multiple_of(align.max(1));
    (part * per).min(len)..((part + 1) * per).min(len)
}

/// `f(r, items[r])` for every r, the items split across the cores (a decoding step's
/// sequences: each one's attention on its own state); the results in order. Each call gets its
/// item alone, so what it computes does not depend on the split.
pub fn map_rows<S: Send, T: Send>(
    items: &mut [S],
    f: &(dyn Fn(usize, &mut S) -> T + Sync),
) -> Vec<T> {
    if items.len() < 2 {
        return items.iter_mut().enumerate().map(|(r, s)| f(r, s)).collect();
    }
    let n = items.len();
    // Uncontended locks hand each part its own items through the shared closure.
    let cells: Vec<std::sync::Mutex<(&mut S, Option<T>)>> = items
        .iter_mut()
        .map(|s| std::sync::Mutex::new((s, None)))
        .collect();
    for_each_part(&|part| {
        for r in split(n, 1, part) {
            let mut cell = cells[r].lock().unwrap_or_else(|e| e.into_inner());
            let y = f(r, cell.0);
            cell.1 = Some(y);
        }
    });
    cells
        .into_iter()
        .map(|c| {
            c.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .1
                .expect("every row ran")
        })
        .collect()
}

/// Where parallel parts write their disjoint pieces of one output buffer.
pub struct OutPtr(pub *mut f32);

// SAFETY: users write disjoint ranges only (see `write`).
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `at..at + y.len()` lies inside the buffer and no other thread writes it meanwhile.
    pub unsafe fn write(&self, at: usize, y: &[f32]) {
        std::ptr::copy_nonoverlapping(y.as_ptr(), self.0.add(at), y.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_part_runs_once_per_call_even_from_many_threads() {
        let total = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..500 {
                        let hits: Vec<AtomicU64> =
                            (0..parts()).map(|_| AtomicU64::new(0)).collect();
                        for_each_part(&|p| {
                            hits[p].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 2000);
        let covered: Vec<usize> = (0..parts()).flat_map(|p| split(70, 4, p)).collect();
        assert_eq!(covered, (0..70).collect::<Vec<_>>());
    }

    #[test]
    fn map_rows_gives_each_item_to_one_call_and_the_results_in_order() {
        for n in [0, 1, 2, 3, 17] {
            let mut items: Vec<usize> = (0..n).map(|i| 100 * i).collect();
            let out = map_rows(&mut items, &|r, x| {
                *x += 1;
                (r, *x)
            });
            assert_eq!(out, (0..n).map(|i| (i, 100 * i + 1)).collect::<Vec<_>>());
            assert_eq!(items, (0..n).map(|i| 100 * i + 1).collect::<Vec<_>>());
        }
    }
}
