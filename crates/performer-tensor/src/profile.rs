//! An off-by-default op timer: where the wall time of a training step goes, by category of op
//! and by phase (forward, backward, optimizer). `cargo xtask bench --profile WORKLOAD` turns
//! its [`Report`] into the per-op table of the README.
//!
//! It is always compiled and costs one relaxed atomic load per op when off. When on
//! ([`start`]), it partitions the wall time of the thread that called [`start`] (the thread that
//! drives the model; rayon's workers run the parallel parts while it waits, so its wall time
//! is the step's): every op records, when it hands its result to the graph, the time since the
//! previous op finished ([`Tensor::from_op`](crate::Tensor::from_op) and the backward of each
//! graph node report themselves), minus what nested exclusive scopes (the GEMM kernels, the
//! allocator) have already taken. Time between a node's backward and the next is the autograd
//! engine's own (graph walk, gradient accumulation). Nothing is sampled, so the rows add up to
//! the step's time exactly.
//!
//! Threads other than the profiled one record nothing but GEMM FLOPs (so the report counts all
//! matrix products, those inside fused kernels' parallel loops included).

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Whether some thread is profiling.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// FLOPs of every GEMM on any thread while profiling.
static GEMM_FLOPS_ALL_THREADS: AtomicU64 = AtomicU64::new(0);

/// Part of a training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// The model's forward and its loss.
    Forward,
    /// `loss.backward()` (reversible layers' recomputation included) and dropping the graph.
    Backward,
    /// The optimizer's update.
    Optimizer,
}

impl Phase {
    /// Every phase, in step order.
    pub const ALL: [Phase; 3] = [Phase::Forward, Phase::Backward, Phase::Optimizer];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Optimizer => "optimizer",
        }
    }

    /// Where time that no op claims goes in this phase.
    fn residual(self) -> Category {
        match self {
            Phase::Forward => Category::Other,
            Phase::Backward => Category::Autograd,
            Phase::Optimizer => Category::Optimizer,
        }
    }
}

/// What kind of work a stretch of time was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// Matrix products (time inside the GEMM kernels on the profiled thread, and the `matmul`
    /// op around them).
    Gemm,
    /// FAVOR+ feature maps and linear attention (their internal GEMMs included: they run in
    /// the kernels' own parallel loops).
    Favor,
    /// Local (windowed softmax) attention, its GEMMs included.
    LocalAttention,
    /// Rotary position embedding.
    Rotary,
    /// Element-wise arithmetic, activations, dropout, reductions.
    Elementwise,
    /// Copies and views: reshape, permute, contiguous, narrow, pad, cat, broadcast.
    Layout,
    /// Embedding lookups and gathers.
    Embedding,
    /// LayerNorm and ScaleNorm.
    Norm,
    /// Softmax, log-softmax and cross-entropy.
    Loss,
    /// Reversible and chunked sequences' own work outside the ops they run.
    Sequence,
    /// The optimizer's update (all of the optimizer phase).
    Optimizer,
    /// malloc / free / realloc (where the allocator reports to [`time_allocator`]).
    Allocator,
    /// The autograd engine: recording nodes, the graph walk, gradient accumulation, freeing
    /// the graph.
    Autograd,
    /// Glue between ops and ops of unknown kinds.
    Other,
}

impl Category {
    /// Every category, in table order.
    pub const ALL: [Category; 14] = [
        Category::Gemm,
        Category::Favor,
        Category::LocalAttention,
        Category::Rotary,
        Category::Elementwise,
        Category::Layout,
        Category::Embedding,
        Category::Norm,
        Category::Loss,
        Category::Sequence,
        Category::Optimizer,
        Category::Allocator,
        Category::Autograd,
        Category::Other,
    ];

    /// Row label.
    pub fn name(self) -> &'static str {
        match self {
            Category::Gemm => "GEMM",
            Category::Favor => "FAVOR+ kernels",
            Category::LocalAttention => "local attention",
            Category::Rotary => "rotary",
            Category::Elementwise => "element-wise",
            Category::Layout => "copies/layout",
            Category::Embedding => "embedding",
            Category::Norm => "norms",
            Category::Loss => "softmax/loss",
            Category::Sequence => "reversible/chunk",
            Category::Optimizer => "optimizer",
            Category::Allocator => "allocator",
            Category::Autograd => "autograd bookkeeping",
            Category::Other => "other",
        }
    }

    /// The category of an op by the name it records in the graph.
    pub fn of_op(name: &str) -> Category {
        match name {
            "matmul" | "matmul_add" | "linear" => Category::Gemm,
            "softmax_kernel"
            | "generalized_kernel"
            | "favor_attention"
            | "favor_attention_cuda"
            | "causal_linear_attention"
            | "linear_attention" => Category::Favor,
            "local_attention" => Category::LocalAttention,
            "apply_rotary_pos_emb" => Category::Rotary,
            "reshape" | "permute" | "narrow" | "contiguous" | "pad" | "cat" | "broadcast_to"
            | "token_shift" => Category::Layout,
            "index_select" | "gather" => Category::Embedding,
            "layer_norm" | "norm" | "scale_norm" => Category::Norm,
            "softmax" | "log_softmax" | "cross_entropy" => Category::Loss,
            "ReversibleSequence" | "Chunk" => Category::Sequence,
            "add" | "sub" | "mul" | "div" | "maximum" | "minimum" | "pow" | "relu" | "gelu"
            | "elu" | "softplus" | "sigmoid" | "tanh" | "silu" | "leaky_relu" | "abs"
            | "add_scalar" | "div_scalar" | "exp" | "log" | "mul_scalar" | "neg" | "recip"
            | "rsub_scalar" | "sqrt" | "square" | "sub_scalar" | "dropout" | "where"
            | "masked_fill" | "sum" | "amax" | "scaled" => Category::Elementwise,
            _ => Category::Other,
        }
    }

    fn index(self) -> usize {
        Category::ALL
            .iter()
            .position(|&c| c == self)
            .expect("listed")
    }
}

const PHASES: usize = Phase::ALL.len();
const CATS: usize = Category::ALL.len();

/// Accumulators of one category in one phase.
struct Cells {
    ns: Cell<u64>,
    calls: Cell<u64>,
    bytes: Cell<u64>,
    flops: Cell<u64>,
}

impl Cells {
    const fn new() -> Self {
        Cells {
            ns: Cell::new(0),
            calls: Cell::new(0),
            bytes: Cell::new(0),
            flops: Cell::new(0),
        }
    }
}

/// The profiled thread's state. Only `Cell`s, so the allocator hook can touch it from inside
/// an allocation made while the op table below is being updated.
struct Local {
    on: Cell<bool>,
    phase: Cell<Phase>,
    origin: Cell<Option<Instant>>,
    /// When the last op (or phase boundary) was accounted.
    mark_ns: Cell<u64>,
    /// Time attributed to some row so far, and its value at the last mark.
    attributed_ns: Cell<u64>,
    attributed_at_mark: Cell<u64>,
    rows: [[Cells; CATS]; PHASES],
}

thread_local! {
    static LOCAL: Local = const {
        Local {
            on: Cell::new(false),
            phase: Cell::new(Phase::Forward),
            origin: Cell::new(None),
            mark_ns: Cell::new(0),
            attributed_ns: Cell::new(0),
            attributed_at_mark: Cell::new(0),
            rows: [const { [const { Cells::new() }; CATS] }; PHASES],
        }
    };
    /// Per op name: (phase, name, ns, calls).
    static OPS: RefCell<Vec<OpRow>> = const { RefCell::new(Vec::new()) };
}

impl Local {
    fn now_ns(&self) -> u64 {
        self.origin
            .get()
            .map_or(0, |o| o.elapsed().as_nanos() as u64)
    }

    fn cells(&self, c: Category) -> &Cells {
        &self.rows[self.phase.get() as usize][c.index()]
    }

    /// Attributes the time since the last mark, less what nested scopes took meanwhile, to
    /// `c`; returns that time.
    fn close_gap(&self, c: Category, bytes: u64) -> u64 {
        let now = self.now_ns();
        let nested = self.attributed_ns.get() - self.attributed_at_mark.get();
        let own = now
            .saturating_sub(self.mark_ns.get())
            .saturating_sub(nested);
        let cells = self.cells(c);
        cells.ns.set(cells.ns.get() + own);
        cells.calls.set(cells.calls.get() + 1);
        cells.bytes.set(cells.bytes.get() + bytes);
        let total = self.attributed_ns.get() + own;
        self.attributed_ns.set(total);
        self.attributed_at_mark.set(total);
        self.mark_ns.set(now);
        own
    }
}

/// Whether profiling is on (one relaxed load: the whole cost when it is off).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// Starts profiling this thread from zero (earlier counts are dropped).
pub fn start() {
    LOCAL.with(|l| {
        for phase in &l.rows {
            for c in phase {
                c.ns.set(0);
                c.calls.set(0);
                c.bytes.set(0);
                c.flops.set(0);
            }
        }
        l.phase.set(Phase::Forward);
        l.origin.set(Some(Instant::now()));
        l.mark_ns.set(0);
        l.attributed_ns.set(0);
        l.attributed_at_mark.set(0);
        l.on.set(true);
    });
    OPS.with(|o| o.borrow_mut().clear());
    GEMM_FLOPS_ALL_THREADS.store(0, Relaxed);
    ENABLED.store(true, Relaxed);
}

/// Stops profiling and returns what was recorded since [`start`] on this thread. Time since
/// the last op goes to the current phase's residual row.
pub fn stop() -> Report {
    enter_phase(Phase::Forward);
    ENABLED.store(false, Relaxed);
    let rows = LOCAL.with(|l| {
        l.on.set(false);
        let mut rows = Vec::new();
        for phase in Phase::ALL {
            for c in Category::ALL {
                let cells = &l.rows[phase as usize][c.index()];
                if cells.ns.get() > 0 || cells.calls.get() > 0 {
                    rows.push(Row {
                        phase,
                        category: c,
                        ns: cells.ns.get(),
                        calls: cells.calls.get(),
                        bytes: cells.bytes.get(),
                        flops: cells.flops.get(),
                    });
                }
            }
        }
        rows
    });
    let ops = OPS.with(|o| std::mem::take(&mut *o.borrow_mut()));
    Report {
        rows,
        ops,
        gemm_flops_all_threads: GEMM_FLOPS_ALL_THREADS.load(Relaxed),
    }
}

/// Closes the current phase (time since its last op goes to its residual row: glue in the
/// forward, the engine in the backward, the optimizer's update) and enters `phase`. A no-op
/// unless this thread is profiling.
pub fn enter_phase(phase: Phase) {
    if !enabled() {
        return;
    }
    let _ = LOCAL.try_with(|l| {
        if l.on.get() {
            l.close_gap(l.phase.get().residual(), 0);
            l.phase.set(phase);
        }
    });
}

/// An op named `name` has finished: the time since the last mark is its own. `bytes` (its
/// inputs and outputs) is evaluated only when profiling. Ops that return without recording a
/// graph node (inference paths) call this themselves, so that their time is not left to the
/// next op.
#[inline]
pub fn op_done(name: &'static str, bytes: impl FnOnce() -> u64) {
    if enabled() {
        op_done_slow(name, bytes());
    }
}

#[cold]
fn op_done_slow(name: &'static str, bytes: u64) {
    let Ok(Some((phase, ns))) = LOCAL.try_with(|l| {
        l.on.get()
            .then(|| (l.phase.get(), l.close_gap(Category::of_op(name), bytes)))
    }) else {
        return;
    };
    OPS.with(|o| {
        let mut ops = o.borrow_mut();
        match ops.iter_mut().find(|r| r.name == name && r.phase == phase) {
            Some(r) => {
                r.ns += ns;
                r.calls += 1;
            }
            None => ops.push(OpRow {
                phase,
                name,
                ns,
                calls: 1,
            }),
        }
    });
}

/// The time since the last mark was the autograd engine's.
#[inline]
pub(crate) fn autograd_done() {
    if enabled() {
        let _ = LOCAL.try_with(|l| {
            if l.on.get() {
                l.close_gap(Category::Autograd, 0);
            }
        });
    }
}

/// Runs `f` as an exclusive scope of category `c` on the profiled thread: its time is taken
/// out of whichever op encloses it.
#[inline]
fn scoped<R>(c: Category, flops: u64, f: impl FnOnce() -> R) -> R {
    let started = LOCAL
        .try_with(|l| l.on.get().then(|| (l.now_ns(), l.attributed_ns.get())))
        .ok()
        .flatten();
    let r = f();
    if let Some((t0, attributed0)) = started {
        let _ = LOCAL.try_with(|l| {
            let nested = l.attributed_ns.get() - attributed0;
            let own = l.now_ns().saturating_sub(t0).saturating_sub(nested);
            let cells = l.cells(c);
            cells.ns.set(cells.ns.get() + own);
            cells.calls.set(cells.calls.get() + 1);
            cells.flops.set(cells.flops.get() + flops);
            l.attributed_ns.set(l.attributed_ns.get() + own);
        });
    }
    r
}

/// Runs a GEMM of `m x k @ k x n`: counted on every thread, timed on the profiled one.
#[inline]
pub(crate) fn gemm<R>(m: usize, n: usize, k: usize, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let flops = 2 * (m * n * k) as u64;
    GEMM_FLOPS_ALL_THREADS.fetch_add(flops, Relaxed);
    scoped(Category::Gemm, flops, f)
}

/// Runs an allocator call (a global allocator wraps each of its calls in this so that the
/// profile shows the allocator's own time). Touches only thread-local cells: safe to call
/// from inside `GlobalAlloc`.
#[inline]
pub fn time_allocator<R>(f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    scoped(Category::Allocator, 0, f)
}

/// One row of a [`Report`]: a category's totals in one phase.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The phase.
    pub phase: Phase,
    /// The category.
    pub category: Category,
    /// Wall time on the profiled thread, nanoseconds.
    pub ns: u64,
    /// Ops (or GEMM / allocator calls) counted.
    pub calls: u64,
    /// Bytes of the ops' inputs and outputs (element-wise traffic, roughly).
    pub bytes: u64,
    /// FLOPs (GEMM rows: 2mnk of the products timed on the profiled thread).
    pub flops: u64,
}

/// Time of one op name in one phase.
#[derive(Clone, Debug, PartialEq)]
pub struct OpRow {
    /// The phase.
    pub phase: Phase,
    /// The op's name in the graph.
    pub name: &'static str,
    /// Its own wall time (nested GEMM and allocator time excluded), nanoseconds.
    pub ns: u64,
    /// How many times it ran.
    pub calls: u64,
}

/// What [`stop`] returns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Non-empty (phase, category) rows.
    pub rows: Vec<Row>,
    /// Per op name and phase.
    pub ops: Vec<OpRow>,
    /// FLOPs of all GEMMs on all threads (fused kernels' included).
    pub gemm_flops_all_threads: u64,
}

impl Report {
    /// Total profiled time, nanoseconds.
    pub fn total_ns(&self) -> u64 {
        self.rows.iter().map(|r| r.ns).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_partition_the_wall_time_and_gemm_time_is_taken_out_of_its_op() {
        let t0 = Instant::now();
        start();
        let a = crate::Tensor::var(crate::Tensor::randn(&[64, 64]).to_array());
        let y = a.matmul(&a).unwrap().relu();
        enter_phase(Phase::Backward);
        let g = y.sum_all().backward().unwrap();
        drop(g);
        let report = stop();
        let wall = t0.elapsed().as_nanos() as u64;
        assert!(report.total_ns() <= wall, "{} > {wall}", report.total_ns());
        let ns = |p, c| {
            report
                .rows
                .iter()
                .find(|r| r.phase == p && r.category == c)
                .map_or(0, |r| r.ns)
        };
        let gemm = report
            .rows
            .iter()
            .find(|r| r.phase == Phase::Forward && r.category == Category::Gemm)
            .expect("a forward GEMM row");
        assert_eq!(gemm.flops, 2 * 64 * 64 * 64);
        assert!(gemm.calls >= 2, "the GEMM scope and the matmul op");
        assert!(ns(Phase::Backward, Category::Gemm) > 0);
        assert!(ns(Phase::Forward, Category::Elementwise) > 0);
        // forward one product, backward two (other tests' products may add to the count)
        assert!(report.gemm_flops_all_threads >= 3 * 2 * 64 * 64 * 64);
        assert!(report.ops.iter().any(|o| o.name == "relu"));
        assert!(!enabled());
    }
}
