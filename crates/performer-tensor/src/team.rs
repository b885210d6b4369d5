//! A parallel region for work that is too fine for rayon's fork-join: the phases of one
//! decoding step (a matrix-vector product, the FAVOR+ heads, the next product) each take
//! microseconds, and waking a sleeping rayon worker for every phase cost more than the phase.
//!
//! [`with_team`] runs a closure on the calling thread; when it publishes a phase with
//! [`Team::for_each_chunk`], rayon is asked for one helper per other thread (unless they are
//! already there). A helper spins, taking chunks of whatever phase is current, until the region
//! ends or no phase has come for [`LINGER`]; the caller takes chunks too, so a helper that
//! starts late (or never, when the pool is busy) only means less help, never a wait. Nothing
//! outside a region spins, and inside one a helper leaves rayon's pool to other work after
//! [`LINGER`] without phases.
//!
//! Regions nest: [`with_team`] inside a region on the same thread joins it, so a loop of
//! decoding steps wrapped in one region keeps its helpers between steps instead of waking a
//! rayon worker for each.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

/// How long a helper waits for the next phase before it returns to rayon's pool.
pub const LINGER: Duration = Duration::from_micros(200);

/// Most chunks one phase may have (they are counted in 16 bits of the shared word).
pub const MAX_CHUNKS: usize = u16::MAX as usize;

/// One phase: the closure and how many of its chunks are finished. Lives on the caller's
/// stack for the duration of [`Team::for_each_chunk`].
struct Phase<'a> {
    work: &'a (dyn Fn(usize) + Sync),
    finished: AtomicUsize,
    panicked: AtomicBool,
}

/// State shared by the caller and the helpers of one region.
struct Shared {
    /// `generation << 32 | chunks << 16 | next chunk`: a helper claims chunk `i` of the
    /// current phase by moving `next` from `i` to `i + 1`, so a claim can only succeed while
    /// that phase is unfinished (the caller publishes the next phase only after every chunk
    /// of this one is finished, and every chunk below `chunks` is claimed by then).
    word: AtomicU64,
    /// The current phase (type-erased `Phase`), valid while a claimed chunk of it is running.
    phase: AtomicPtr<()>,
    /// Set when the region ends: helpers return.
    closed: AtomicBool,
    /// Helpers spawned and not yet returned.
    active: AtomicUsize,
}

impl Shared {
    /// Claims the next chunk of the current phase (its index), if one is left.
    fn claim(&self) -> Option<u32> {
        let mut w = self.word.load(SeqCst);
        loop {
            let (chunks, next) = ((w >> 16) & 0xffff, w & 0xffff);
            if next >= chunks {
                return None;
            }
            match self.word.compare_exchange_weak(w, w + 1, SeqCst, SeqCst) {
                Ok(_) => return Some(next as u32),
                Err(now) => w = now,
            }
        }
    }

    /// Runs chunk `i` of the current phase and marks it finished. Only called after a
    /// successful [`Shared::claim`], which keeps the phase alive until `finished` counts it.
    fn run_claimed(&self, i: u32) {
        // SAFETY: the caller stored a pointer to a `Phase` that outlives every claimed chunk:
        // `for_each_chunk` returns only once `finished` reaches the chunk count, and this
        // chunk is counted only below, after its last use of the phase.
        let phase = unsafe { &*(self.phase.load(SeqCst) as *const Phase<'_>) };
        if catch_unwind(AssertUnwindSafe(|| (phase.work)(i as usize))).is_err() {
            phase.panicked.store(true, SeqCst);
        }
        phase.finished.fetch_add(1, SeqCst);
    }

    fn helper_loop(&self) {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        while !self.closed.load(SeqCst) {
            match self.claim() {
                Some(i) => {
                    self.run_claimed(i);
                    (idle_since, spins) = (Instant::now(), 0);
                }
                None => {
                    std::hint::spin_loop();
                    spins += 1;
                    // Reading the clock costs more than a spin: look every so often.
                    if spins.is_multiple_of(256) && idle_since.elapsed() > LINGER {
                        break;
                    }
                }
            }
        }
        self.active.fetch_sub(1, SeqCst);
    }
}

/// Threads working on a region's phases (see the module docs).
pub struct Team {
    shared: Option<Arc<Shared>>,
    /// Helpers wanted: rayon's threads but the caller's.
    helpers: usize,
    generation: Cell<u64>,
}

impl Team {
    /// A team of the calling thread alone: phases run in order on it.
    pub fn single() -> Self {
        Team {
            shared: None,
            helpers: 0,
            generation: Cell::new(0),
        }
    }

    /// Whether helpers may take part.
    pub fn is_parallel(&self) -> bool {
        self.shared.is_some()
    }

    /// Runs `work(i)` for every `i` in `0..chunks`, on the caller and any helpers, and returns
    /// when all have finished. Chunks of one phase must be independent of each other.
    ///
    /// # Panics
    /// If `work` panicked on any thread of the team (once every chunk has finished, so no
    /// helper is left using the phase), or if `chunks` exceeds [`MAX_CHUNKS`].
    pub fn for_each_chunk(&self, chunks: usize, work: &(dyn Fn(usize) + Sync)) {
        let shared = match &self.shared {
            Some(s) if chunks > 1 => s,
            _ => {
                (0..chunks).for_each(work);
                return;
            }
        };
        assert!(chunks <= MAX_CHUNKS, "Team: {chunks} chunks in one phase");
        let missing = self.helpers.saturating_sub(shared.active.load(SeqCst));
        for _ in 0..missing {
            shared.active.fetch_add(1, SeqCst);
            let s = shared.clone();
            rayon::spawn(move || s.helper_loop());
        }
        let phase = Phase {
            work,
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        };
        let generation = self.generation.get() + 1;
        self.generation.set(generation);
        shared
            .phase
            .store(&phase as *const Phase<'_> as *mut (), SeqCst);
        shared
            .word
            .store(generation << 32 | (chunks as u64) << 16, SeqCst);
        while let Some(i) = shared.claim() {
            shared.run_claimed(i);
        }
        while phase.finished.load(SeqCst) < chunks {
            std::hint::spin_loop();
        }
        if phase.panicked.load(SeqCst) {
            panic!("Team: a chunk of this phase panicked");
        }
    }
}

thread_local! {
    /// The team of the region this thread is in, if any (for nested [`with_team`] calls).
    static CURRENT: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

/// Restores the thread's current team, and ends the region, when its caller leaves it (even
/// by unwinding).
struct RegionGuard {
    shared: Arc<Shared>,
    outer: *const Team,
}

impl Drop for RegionGuard {
    fn drop(&mut self) {
        self.shared.closed.store(true, SeqCst);
        CURRENT.with(|c| c.set(self.outer));
    }
}

/// Runs `f` with a [`Team`] of the calling thread and up to `rayon::current_num_threads() - 1`
/// helpers (none when rayon has one thread), or with the team of the region the thread is
/// already in. Helpers spin while phases keep coming, so a region suits bursts of
/// fine-grained phases (decoding steps); a region around heavy rayon work (a long prompt's
/// parallel pass) makes that work wait for its helpers to go idle for [`LINGER`].
pub fn with_team<R>(f: impl FnOnce(&Team) -> R) -> R {
    let current = CURRENT.with(Cell::get);
    if !current.is_null() {
        // SAFETY: CURRENT points at the team of a region further up this thread's stack; its
        // guard resets CURRENT before that team is dropped.
        return f(unsafe { &*current });
    }
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 {
        return f(&Team::single());
    }
    let shared = Arc::new(Shared {
        word: AtomicU64::new(0),
        phase: AtomicPtr::new(std::ptr::null_mut()),
        closed: AtomicBool::new(false),
        active: AtomicUsize::new(0),
    });
    let team = Team {
        shared: Some(shared.clone()),
        helpers,
        generation: Cell::new(0),
    };
    let _guard = RegionGuard {
        shared,
        outer: current,
    };
    CURRENT.with(|c| c.set(&team as *const Team));
    f(&team)
}

/// Runs `f` on one of rayon's threads: here, when this thread is one already; otherwise on a
/// worker while this thread waits, blocked. The worker runs `f` with this thread's context:
/// its global generator ([`crate::rng`]), gradient mode, autocast mode and bf16 products' mode
/// ([`crate::bf16_gemm::Bf16Products`]); the generator's
/// state after `f` comes back to this thread, so a seeded run draws the same numbers wherever
/// its steps ran. (The op timer, [`crate::profile`], stays per thread: start it inside.)
///
/// Wrap a whole generation, or a training step (forward, backward and the optimizer), in it
/// when the caller is not a rayon thread, such as a program's main thread. Rayon keeps one
/// worker per core, so an outside thread that works as well (it leads every [`with_team`]
/// phase and runs its own share of rayon's parallel loops) makes one more running thread than
/// there are cores: whenever an idle worker wakes up to look for work it takes a core from the
/// caller or its helper. And every parallel op called from outside the pool hands its whole
/// loop to the workers and sleeps until they finish, where a worker runs half itself and
/// shares the rest. Measured on 2 cores:
/// - 63 decoding steps after a 512-token prompt: medians 16.6-18.3 ms from the main thread,
///   14.8-15.1 ms on a worker, and no runs of 330-900 µs steps;
/// - lm-small-64's training step (`cargo xtask bench`, thousands of small ops): medians of 15
///   steps, three alternating rounds, 87.5 / 89.3 / 84.3 ms from the main thread and
///   70.4 / 69.9 / 74.5 ms on a worker.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let caller = ThreadContext::current();
    // `scope` runs its closure on a worker when called from outside the pool.
    let (result, after) = rayon::scope(|_| {
        let restore = ContextRestore(caller.install());
        let result = f();
        let after = ThreadContext::current();
        drop(restore);
        (result, after)
    });
    after.install();
    result
}

/// [`on_pool`] and [`keep_pool_warm`] at once: `f` on a rayon worker, with the pool's other
/// workers kept awake until it returns. For a training step or a generation called from
/// outside the pool.
pub fn on_warm_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    on_pool(|| keep_pool_warm(f))
}

/// How long a [`keep_pool_warm`] helper polls without finding work before it returns to
/// rayon (which then puts its thread to sleep as usual). Longer than the serial stretches of a
/// training step between its parallel ops (tens of microseconds), short enough that a helper
/// which ever held up a job (see [`keep_pool_warm`]: it should not) would delay it by no more
/// than this.
pub const WARM_LINGER: Duration = Duration::from_millis(1);

/// Helpers of [`keep_pool_warm`] spinning now, over all calls (for tests).
static WARM_HELPERS: AtomicUsize = AtomicUsize::new(0);

/// Helpers of [`keep_pool_warm`] that have started spinning, ever (for tests: a helper may come
/// and go while the thread that watches [`WARM_HELPERS`] is not running).
static WARM_STARTED: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` on this rayon worker while the pool's other workers stay awake: each polls rayon
/// for work ([`rayon::yield_now`]) and runs what it finds, instead of going to sleep after a
/// few dozen idle rounds. A training step of a small model is thousands of short ops, many
/// split over the threads, with serial work between them (the autograd engine, small
/// element-wise ops); every gap longer than rayon's idle rounds put the other worker to sleep,
/// and the next split waited for it to wake. lm-small-64 (`bench_workload`, 40 steps): 4356
/// context switches asleep, 836 awake; medians of 30 steps, five alternating pairs of
/// processes on the 2-core Zen 4: 37.5 / 37.0 / 37.2 / 37.2 / 38.0 ms asleep, 35.4 / 35.5 /
/// 35.7 / 36.0 / 36.2 ms awake (-4%). The 1k-token steps, whose ops are longer, gained 0-4% in
/// three of four pairs each, `train_lm`'s default run +1% (six 250-step pairs: within the
/// noise), with the same losses bit for bit. (Measured before helpers gave up after
/// [`WARM_LINGER`]; with it, in a noisier stretch: 5893 -> 967 context switches, four of five
/// lm-small-64 pairs faster.)
///
/// The other workers run at full speed while `f` keeps them busy, so wrap work that does (a
/// training step), not a loop that waits on I/O; and where other processes share the cores
/// (several ranks on one machine, each with a pool of more than one thread), the spinning
/// takes their time: leave it out there. From outside the pool, with one rayon thread, or with
/// more rayon threads than the machine has cores, `f` simply runs.
///
/// A helper returns when `f` does, or after [`WARM_LINGER`] without finding work. Why it
/// cannot hold up `f`: a helper's loop sits above whatever its worker was doing, and spinning
/// until `f` returned would never end if that worker were waiting inside a job `f` needs. The
/// helpers are spawned into this thread's deque before any of `f`'s jobs, and rayon steals the
/// oldest job of a deque first, so every helper is taken before any job of `f` can be stolen,
/// and none is left for a worker that waits inside one (this thread pops its own deque newest
/// first, and a helper it pops returns at once). The linger bounds the spinning anyway, should
/// rayon's order ever change, and lets an idle worker sleep. Nested calls are fine: each adds
/// its own helpers.
pub fn keep_pool_warm<R>(f: impl FnOnce() -> R) -> R {
    let Some(me) = rayon::current_thread_index() else {
        return f();
    };
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let threads = rayon::current_num_threads();
    if threads < 2 || threads > cores {
        return f();
    }
    let others = threads - 1;
    let done = Arc::new(AtomicBool::new(false));
    for _ in 0..others {
        let done = done.clone();
        rayon::spawn(move || {
            // On this thread the loop would spin above `f`'s own suspended frames.
            if rayon::current_thread_index() == Some(me) {
                return;
            }
            // A helper that rayon starts after `f` returned has nothing to keep warm.
            if done.load(SeqCst) {
                return;
            }
            WARM_HELPERS.fetch_add(1, SeqCst);
            WARM_STARTED.fetch_add(1, SeqCst);
            let (mut idle_since, mut idle_spins) = (Instant::now(), 0u32);
            while !done.load(SeqCst) {
                if rayon::yield_now() == Some(rayon::Yield::Executed) {
                    idle_spins = 0;
                    continue;
                }
                if idle_spins == 0 {
                    idle_since = Instant::now();
                }
                idle_spins += 1;
                std::hint::spin_loop();
                // Reading the clock costs more than a poll: look every so often.
                if idle_spins.is_multiple_of(64) && idle_since.elapsed() > WARM_LINGER {
                    break;
                }
            }
            WARM_HELPERS.fetch_sub(1, SeqCst);
        });
    }
    // Set on return and on unwinding alike.
    struct Release(Arc<AtomicBool>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }
    let _release = Release(done);
    f()
}

/// The per-thread state that ops read: what [`on_pool`] carries to the worker and back.
#[derive(Clone, Copy)]
struct ThreadContext {
    rng: crate::rng::RngState,
    grad_enabled: bool,
    autocast_bf16: bool,
    bf16_products: crate::bf16_gemm::Bf16Products,
}

impl ThreadContext {
    fn current() -> Self {
        ThreadContext {
            rng: crate::rng::get_state(),
            grad_enabled: crate::autograd::is_grad_enabled(),
            autocast_bf16: crate::autocast::is_autocast_bf16(),
            bf16_products: crate::bf16_gemm::bf16_products(),
        }
    }

    /// Makes this the calling thread's context; returns the one it replaced.
    fn install(self) -> Self {
        let previous = ThreadContext::current();
        crate::rng::set_state(self.rng);
        crate::autograd::set_grad_enabled(self.grad_enabled);
        crate::autocast::set_autocast_bf16(self.autocast_bf16);
        crate::bf16_gemm::set_bf16_products(self.bf16_products);
        previous
    }
}

/// Puts a worker's own context back when [`on_pool`]'s closure returns or unwinds.
struct ContextRestore(ThreadContext);

impl Drop for ContextRestore {
    fn drop(&mut self) {
        self.0.install();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Waits (up to 10 s) until no [`keep_pool_warm`] helper spins.
    fn helpers_stop() -> bool {
        let start = Instant::now();
        while WARM_HELPERS.load(SeqCst) > 0 {
            if start.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn a_warm_pool_runs_the_work_and_its_helpers_stop_after_it() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        // Outside the pool, and on a pool of one thread, the closure simply runs.
        assert_eq!(keep_pool_warm(|| 7), 7);
        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        assert_eq!(single.install(|| keep_pool_warm(|| 8)), 8);
        // Whether a helper starts within 5 s.
        let started_since = |before: usize| {
            let start = Instant::now();
            while WARM_STARTED.load(SeqCst) == before && start.elapsed() < Duration::from_secs(5) {
                std::thread::yield_now();
            }
            WARM_STARTED.load(SeqCst) > before
        };
        let (sum, seen_spinning) = pool.install(|| {
            let before = WARM_STARTED.load(SeqCst);
            keep_pool_warm(|| {
                // A helper spins while the work runs.
                let spinning = started_since(before);
                // Nested parallel work and a nested warm region.
                use rayon::prelude::*;
                let inner = keep_pool_warm(|| (0..10_000u64).into_par_iter().sum::<u64>());
                let (a, b) = rayon::join(|| inner, || (0..100u64).into_par_iter().sum::<u64>());
                (a + b, spinning)
            })
        });
        assert_eq!(sum, 49_995_000 + 4_950);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Two threads on one core: none spins.
        assert_eq!(seen_spinning, cores >= 2, "{cores} core(s)");
        assert!(helpers_stop(), "helpers still spinning after the work");
        // A panic in the work reaches the caller and stops the helpers too.
        let caught = pool.install(|| {
            catch_unwind(AssertUnwindSafe(|| {
                keep_pool_warm(|| panic!("step failed"))
            }))
        });
        assert!(caught.is_err());
        assert!(helpers_stop(), "helpers still spinning after a panic");
        // Work that gives the helpers nothing to do: they return after WARM_LINGER, before
        // it ends.
        let lingered = pool.install(|| {
            let before = WARM_STARTED.load(SeqCst);
            keep_pool_warm(|| {
                let started = started_since(before);
                std::thread::sleep(WARM_LINGER * 50);
                (started, WARM_HELPERS.load(SeqCst))
            })
        });
        assert_eq!(lingered, (cores >= 2, 0));
        // More threads than cores: the pool is shared with itself already; nothing spins.
        let crowded = rayon::ThreadPoolBuilder::new()
            .num_threads(cores + 1)
            .build()
            .unwrap();
        let spun = crowded.install(|| {
            let before = WARM_STARTED.load(SeqCst);
            keep_pool_warm(|| {
                std::thread::sleep(Duration::from_millis(50));
                WARM_STARTED.load(SeqCst) > before
            })
        });
        assert!(!spun);
    }

    #[test]
    fn every_chunk_runs_once_per_phase() {
        let counts: Vec<AtomicU32> = (0..37).map(|_| AtomicU32::new(0)).collect();
        with_team(|team| {
            for phase in 0..200 {
                team.for_each_chunk(37, &|i| {
                    // Each phase sees the previous one finished.
                    assert_eq!(counts[i].load(SeqCst), phase);
                    counts[i].fetch_add(1, SeqCst);
                });
            }
        });
        assert!(counts.iter().all(|c| c.load(SeqCst) == 200));
    }

    #[test]
    fn nested_regions_share_the_outer_team() {
        with_team(|outer| {
            with_team(|inner| assert!(std::ptr::eq(outer, inner)));
            // Phases still run after helpers went idle and left.
            std::thread::sleep(LINGER * 3);
            let sum = AtomicU32::new(0);
            outer.for_each_chunk(10, &|i| {
                sum.fetch_add(i as u32, SeqCst);
            });
            assert_eq!(sum.load(SeqCst), 45);
        });
        // Outside, a region of its own again.
        with_team(|t| assert_eq!(t.is_parallel(), rayon::current_num_threads() > 1));
    }

    #[test]
    fn on_pool_runs_on_a_rayon_thread_and_returns_its_value() {
        assert_eq!(rayon::current_thread_index(), None);
        let (index, value) = on_pool(|| (rayon::current_thread_index(), 7));
        assert!(index.is_some());
        assert_eq!(value, 7);
        // Already on a worker: runs in place.
        let nested = on_pool(|| {
            let outer = rayon::current_thread_index();
            on_pool(|| rayon::current_thread_index() == outer)
        });
        assert!(nested);
    }

    #[test]
    fn on_pool_carries_the_generator_and_modes_there_and_back() {
        use crate::{autocast, autograd, rng};
        rng::manual_seed(11);
        let expected: Vec<u64> = (0..6).map(|_| rng::with_rng(|g| g.next_u64())).collect();
        rng::manual_seed(11);
        let first: Vec<u64> = (0..3).map(|_| rng::with_rng(|g| g.next_u64())).collect();
        use crate::bf16_gemm::{Bf16Products, bf16_products, with_bf16_products};
        let (on_worker, grad, bf16, products) = autograd::no_grad(|| {
            autocast::autocast_bf16(true, || {
                with_bf16_products(Bf16Products::Widened, || {
                    on_pool(|| {
                        let draws: Vec<u64> =
                            (0..2).map(|_| rng::with_rng(|g| g.next_u64())).collect();
                        (
                            draws,
                            autograd::is_grad_enabled(),
                            autocast::is_autocast_bf16(),
                            bf16_products(),
                        )
                    })
                })
            })
        });
        assert_eq!(
            products,
            Bf16Products::Widened,
            "the worker lost the caller's bf16 products"
        );
        assert!(
            !grad,
            "the worker recorded the graph inside the caller's no_grad"
        );
        assert!(bf16, "the worker lost the caller's autocast");
        let last = rng::with_rng(|g| g.next_u64());
        let mut seen = first;
        seen.extend(on_worker);
        seen.push(last);
        assert_eq!(
            seen, expected,
            "the draws on the worker did not continue the caller's stream"
        );
        assert!(autograd::is_grad_enabled());
        // The worker got its own context back.
        let (worker_grad, worker_bf16, worker_products) = on_pool(|| {
            (
                autograd::is_grad_enabled(),
                autocast::is_autocast_bf16(),
                bf16_products(),
            )
        });
        assert!(worker_grad && !worker_bf16);
        assert_eq!(worker_products, Bf16Products::Native);
    }

    #[test]
    fn a_helper_panic_reaches_the_caller() {
        let caught = catch_unwind(|| {
            with_team(|team| {
                for _ in 0..100 {
                    team.for_each_chunk(64, &|i| assert!(i != 63, "chunk 63"));
                }
            })
        });
        assert!(caught.is_err());
    }
}
