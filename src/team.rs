//! A team of helper threads that share the parallel parts of a forward pass with the thread running it.
//!
//! A [`Job`] is cut into chunks that may run in any order on any thread; each chunk writes its own [`Region`] of
//! one output tensor. The caller publishes the job, and it and the helpers take chunks from a shared counter
//! (work is taken, not assigned), so a helper that the OS has descheduled simply takes none. A helper descheduled
//! *while* it holds a chunk would still hold up the end of the job, so once the caller has nothing left to take,
//! it recomputes any chunk that has been held longer than a few chunk times into a buffer of its own, and
//! whichever copy finishes first is kept. That is what makes more threads never slower on a board whose cores are
//! busy with other work: the late copy is thrown away.
//!
//! Soundness: a helper writes only into the region of the chunk it claimed, in the job's own output; the caller
//! reads a region only after the chunk is marked done, and never reads the region of a chunk it took over (a late
//! helper may still be writing there). A job owns its inputs (or holds them by `Arc`) and its output, and helpers
//! hold the job by `Arc`, so nothing a late helper touches is freed or reused under it. When a chunk was taken
//! over, the caller returns a fresh copy of the output instead of the job's own.
//!
//! Helpers run at a lower priority than the thread running the pass ([`HELPER_NICE`]). On a board whose cores
//! are busy with other work, the scheduler then shares a core between a helper and the other work before it
//! shares one between the pass's own thread and that work: the thread that cannot be replaced keeps a core, and
//! the helper adds what it gets of another.
//!
//! Between jobs the helpers spin for a short while (yielding the core to other processes as they do), then
//! sleep until the next job. One job runs at a time: a caller that finds the team busy (another engine slot)
//! runs its job alone.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tract_onnx::prelude::{Datum, Tensor};

/// Where one chunk writes: `count` runs of `len` values, run `i` starting at `offset + i * stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: usize,
    pub len: usize,
    pub stride: usize,
    pub count: usize,
}

impl Region {
    /// `len` values from `offset`.
    pub fn contiguous(offset: usize, len: usize) -> Region {
        Region {
            offset,
            len,
            stride: len,
            count: 1,
        }
    }

    /// Values in the region.
    pub fn size(&self) -> usize {
        self.len * self.count
    }

    /// One past the last value it covers.
    fn end(&self) -> usize {
        if self.count == 0 || self.len == 0 {
            self.offset
        } else {
            self.offset + (self.count - 1) * self.stride + self.len
        }
    }

    fn run_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.count).map(move |i| self.offset + i * self.stride)
    }
}

/// The output of one chunk, seen as its runs.
pub struct RegionMut<'a, T> {
    ptr: *mut T,
    len: usize,
    stride: usize,
    count: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<T> RegionMut<'_, T> {
    /// Run `i` of the region (panics if `i` is out of range).
    pub fn run(&mut self, i: usize) -> &mut [T] {
        assert!(i < self.count, "run {i} of a region of {} runs", self.count);
        // SAFETY: `new` checked that every run lies in the buffer; `&mut self` keeps runs from aliasing.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.stride), self.len) }
    }

    /// Number of runs.
    pub fn runs(&self) -> usize {
        self.count
    }

    /// Values per run.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0 || self.count == 0
    }

    /// # Safety
    /// `buf` must hold `buf_len` values, `r.end() <= buf_len`, and nobody else may access `r` for `'a`.
    unsafe fn new(buf: *mut T, buf_len: usize, r: Region) -> Self {
        assert!(
            r.end() <= buf_len && (r.count <= 1 || r.stride >= r.len),
            "region {r:?} does not fit an output of {buf_len} values"
        );
        RegionMut {
            // SAFETY: in bounds (checked above).
            ptr: unsafe { buf.add(r.offset) },
            len: r.len,
            stride: r.stride,
            count: r.count,
            _borrow: PhantomData,
        }
    }
}

/// Work cut into chunks that can run in any order, on any thread, more than once.
///
/// # Safety
/// Implementors guarantee that every `region(c)` lies within the output handed to [`Team::run`], that the
/// regions of different chunks do not overlap, that together they cover the whole output, and that
/// `compute(c, ..)` writes every value of its region. `compute` must give the same values whenever it runs for
/// the same chunk, and must not depend on anything outside the job that may change while the job is alive.
pub unsafe trait Job: Send + Sync + 'static {
    /// The output's element type.
    type Out: Datum + Copy + Default;
    /// Number of chunks.
    fn chunks(&self) -> usize;
    /// The values chunk `c` writes.
    fn region(&self, c: usize) -> Region;
    /// Computes chunk `c` into `out`, which is `region(c)` of the output or a private buffer of the same shape.
    fn compute(&self, c: usize, out: &mut RegionMut<'_, Self::Out>);
}

/// What happened in one [`Team::run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    pub chunks: usize,
    /// Chunks whose kept result a helper computed.
    pub by_helpers: usize,
    /// Chunks the caller recomputed because their helper was late.
    pub taken_over: usize,
}

/// Totals over a team's life (for benchmarks and `status`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeamTotals {
    pub jobs: u64,
    pub chunks: u64,
    pub by_helpers: u64,
    pub taken_over: u64,
    /// Jobs run by the caller alone because another caller had the team.
    pub ran_alone: u64,
}

const FREE: u8 = 0;
const CLAIMED: u8 = 1;
const DONE: u8 = 2;
const TAKEN_OVER: u8 = 3;

/// Type-erased view of a published job, for the helpers.
trait Help: Send + Sync {
    fn help(&self);
}

/// The output tensor, written through raw pointers by region.
struct Output<T> {
    tensor: UnsafeCell<Tensor>,
    ptr: *mut T,
    len: usize,
}

// SAFETY: access follows the protocol in the module docs (disjoint regions, read after DONE).
unsafe impl<T: Send> Send for Output<T> {}
unsafe impl<T: Send> Sync for Output<T> {}

struct Run<J: Job> {
    job: J,
    n: usize,
    next: AtomicUsize,
    state: Box<[AtomicU8]>,
    /// When each chunk was claimed, in µs since `start`.
    claimed_at: Box<[AtomicU32]>,
    done: AtomicUsize,
    by_helpers: AtomicUsize,
    out: Output<J::Out>,
    start: Instant,
}

impl<J: Job> Run<J> {
    fn micros(&self) -> u32 {
        self.start.elapsed().as_micros().min(u32::MAX as u128) as u32
    }

    /// Claims the next chunk, if any is left.
    fn claim(&self) -> Option<usize> {
        let c = self.next.fetch_add(1, Ordering::Relaxed);
        if c >= self.n {
            return None;
        }
        self.claimed_at[c].store(self.micros(), Ordering::Relaxed);
        self.state[c].store(CLAIMED, Ordering::Release);
        Some(c)
    }

    fn compute_in_place(&self, c: usize) {
        // SAFETY: chunk `c` was claimed by this thread alone, and regions do not overlap (the `Job` contract).
        let mut r = unsafe { RegionMut::new(self.out.ptr, self.out.len, self.job.region(c)) };
        self.job.compute(c, &mut r);
    }
}

impl<J: Job> Help for Run<J> {
    fn help(&self) {
        while let Some(c) = self.claim() {
            self.compute_in_place(c);
            if self.state[c]
                .compare_exchange(CLAIMED, DONE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.by_helpers.fetch_add(1, Ordering::Relaxed);
                self.done.fetch_add(1, Ordering::Release);
            }
            // Otherwise the caller took the chunk over: what was written here is never read.
        }
    }
}

struct Published {
    epoch: u64,
    /// Helpers `0..wanted` join.
    wanted: usize,
    work: Arc<dyn Help>,
}

struct Shared {
    slot: Mutex<Option<Published>>,
    epoch: AtomicU64,
    busy: AtomicBool,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    spin: Duration,
    totals: [AtomicU64; 5],
}

/// A persistent team of helper threads (see the module docs).
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

/// How long helpers spin for the next job before they sleep: longer than the gap between two forward passes
/// (sampling, streaming), short enough that an idle daemon does not burn a core.
pub const DEFAULT_SPIN: Duration = Duration::from_millis(2);

impl Team {
    /// Starts `helpers` helper threads named `{name}-{i}`.
    pub fn new(helpers: usize, name: &str) -> std::io::Result<Team> {
        Team::with_spin(helpers, name, DEFAULT_SPIN)
    }

    /// As [`Team::new`], with helpers spinning for `spin` before they sleep.
    pub fn with_spin(helpers: usize, name: &str, spin: Duration) -> std::io::Result<Team> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(None),
            epoch: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            spin,
            totals: Default::default(),
        });
        let mut team = Team {
            shared,
            helpers: Vec::with_capacity(helpers),
        };
        for i in 0..helpers {
            let sh = team.shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || helper_loop(&sh, i))?;
            team.helpers.push(h);
        }
        Ok(team)
    }

    /// Helper threads (the caller of [`Team::run`] makes one more).
    pub fn helpers(&self) -> usize {
        self.helpers.len()
    }

    /// Totals since the team started.
    pub fn totals(&self) -> TeamTotals {
        let t = |i: usize| self.shared.totals[i].load(Ordering::Relaxed);
        TeamTotals {
            jobs: t(0),
            chunks: t(1),
            by_helpers: t(2),
            taken_over: t(3),
            ran_alone: t(4),
        }
    }

    /// Runs `job` into `out` (a tensor of the job's element type, which its regions cover) on the calling thread and up to `helpers` helpers,
    /// and returns the output with what happened.
    pub fn run<J: Job>(&self, job: J, out: Tensor, helpers: usize) -> (Tensor, RunStats) {
        let helpers = helpers.min(self.helpers.len());
        let alone = helpers == 0
            || job.chunks() <= 1
            || self
                .shared
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err();
        let totals = &self.shared.totals;
        if alone {
            if helpers > 0 && job.chunks() > 1 {
                totals[4].fetch_add(1, Ordering::Relaxed);
            }
            let r = run_alone(job, out);
            totals[0].fetch_add(1, Ordering::Relaxed);
            totals[1].fetch_add(r.1.chunks as u64, Ordering::Relaxed);
            return r;
        }
        struct Release<'a>(&'a AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let release = Release(&self.shared.busy);
        let r = self.run_with_helpers(job, out, helpers);
        drop(release);
        totals[0].fetch_add(1, Ordering::Relaxed);
        totals[1].fetch_add(r.1.chunks as u64, Ordering::Relaxed);
        totals[2].fetch_add(r.1.by_helpers as u64, Ordering::Relaxed);
        totals[3].fetch_add(r.1.taken_over as u64, Ordering::Relaxed);
        r
    }

    fn run_with_helpers<J: Job>(&self, job: J, out: Tensor, helpers: usize) -> (Tensor, RunStats) {
        let run = Arc::new(new_run(job, out));
        let sh = &self.shared;
        let epoch = {
            let mut slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
            let epoch = sh.epoch.load(Ordering::Relaxed) + 1;
            *slot = Some(Published {
                epoch,
                wanted: helpers,
                work: run.clone(),
            });
            sh.epoch.store(epoch, Ordering::SeqCst);
            epoch
        };
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = sh.sleep.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        // The caller's own chunks: nobody else ever writes them.
        let mut own = 0u32;
        let mut own_time = Duration::ZERO;
        while let Some(c) = run.claim() {
            let t = Instant::now();
            run.compute_in_place(c);
            own_time += t.elapsed();
            own += 1;
            run.state[c].store(DONE, Ordering::Release);
            run.done.fetch_add(1, Ordering::Release);
        }
        // A helper is late once it has held a chunk for a few of the caller's chunk times.
        let patience = match own {
            0 => Duration::from_micros(100),
            n => own_time * 3 / n + Duration::from_micros(20),
        };
        let mut taken = Vec::new();
        while run.done.load(Ordering::Acquire) < run.n {
            let now = run.micros();
            let late = (0..run.n).find(|&c| {
                run.state[c].load(Ordering::Acquire) == CLAIMED
                    && Duration::from_micros(
                        now.saturating_sub(run.claimed_at[c].load(Ordering::Relaxed)) as u64,
                    ) >= patience
            });
            match late {
                Some(c) => {
                    let r = run.job.region(c);
                    let mut buf = vec![J::Out::default(); r.size()];
                    let compact = Region {
                        offset: 0,
                        stride: r.len,
                        ..r
                    };
                    // SAFETY: a private buffer of exactly the compact region's size.
                    let mut rm = unsafe { RegionMut::new(buf.as_mut_ptr(), buf.len(), compact) };
                    run.job.compute(c, &mut rm);
                    if run.state[c]
                        .compare_exchange(CLAIMED, TAKEN_OVER, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        taken.push((c, buf));
                        run.done.fetch_add(1, Ordering::Release);
                    }
                }
                None => std::hint::spin_loop(),
            }
        }
        {
            let mut slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_some_and(|p| p.epoch == epoch) {
                *slot = None;
            }
        }
        let stats = RunStats {
            chunks: run.n,
            by_helpers: run.by_helpers.load(Ordering::Relaxed),
            taken_over: taken.len(),
        };
        (finish(run, taken), stats)
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _g = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

fn new_run<J: Job>(job: J, mut out: Tensor) -> Run<J> {
    let n = job.chunks();
    let (ptr, len) = {
        let mut plain = out
            .try_as_plain_ram_mut()
            .expect("the output of a team job is a plain tensor");
        let view = plain
            .as_slice_mut::<J::Out>()
            .expect("the output tensor has the job's element type");
        (view.as_mut_ptr(), view.len())
    };
    debug_assert!(
        regions_partition(&job, len),
        "job regions must partition the output"
    );
    Run {
        job,
        n,
        next: AtomicUsize::new(0),
        state: (0..n).map(|_| AtomicU8::new(FREE)).collect(),
        claimed_at: (0..n).map(|_| AtomicU32::new(0)).collect(),
        done: AtomicUsize::new(0),
        by_helpers: AtomicUsize::new(0),
        out: Output {
            tensor: UnsafeCell::new(out),
            ptr,
            len,
        },
        start: Instant::now(),
    }
}

fn run_alone<J: Job>(job: J, out: Tensor) -> (Tensor, RunStats) {
    let run = new_run(job, out);
    for c in 0..run.n {
        run.compute_in_place(c);
    }
    let stats = RunStats {
        chunks: run.n,
        ..Default::default()
    };
    (run.out.tensor.into_inner(), stats)
}

/// The output of a finished run: the job's own tensor when nobody else holds the run any more and nothing was
/// taken over, else a copy assembled from done regions and the caller's buffers.
fn finish<J: Job>(run: Arc<Run<J>>, taken: Vec<(usize, Vec<J::Out>)>) -> Tensor {
    let mut run = run;
    if taken.is_empty() {
        // Helpers drop their handle right after their last chunk; wait a moment for that, not for a late one.
        for _ in 0..256 {
            match Arc::try_unwrap(run) {
                Ok(r) => return r.out.tensor.into_inner(),
                Err(r) => {
                    run = r;
                    std::hint::spin_loop();
                }
            }
        }
    }
    // SAFETY: the shape is only read; the tensor's values are read below region by region, each after its DONE.
    let shape: Vec<usize> = unsafe { (*run.out.tensor.get()).shape().to_vec() };
    // SAFETY: every value is written below (the regions cover the output).
    let mut copy = unsafe { Tensor::uninitialized::<J::Out>(&shape) }.expect("plain tensor");
    let mut plain = copy.try_as_plain_ram_mut().expect("plain tensor");
    let dst = plain
        .as_slice_mut::<J::Out>()
        .expect("the job's element type");
    for c in 0..run.n {
        let r = run.job.region(c);
        if let Some((_, buf)) = taken.iter().find(|(t, _)| *t == c) {
            for (i, off) in r.run_offsets().enumerate() {
                dst[off..off + r.len].copy_from_slice(&buf[i * r.len..(i + 1) * r.len]);
            }
        } else {
            for off in r.run_offsets() {
                // SAFETY: chunk `c` is DONE (Acquire on `done`), so its writer has finished this region.
                let src = unsafe { std::slice::from_raw_parts(run.out.ptr.add(off), r.len) };
                dst[off..off + r.len].copy_from_slice(src);
            }
        }
    }
    copy
}

/// Whether the job's regions lie in the output, do not overlap and cover it (checked in debug builds).
fn regions_partition<J: Job>(job: &J, len: usize) -> bool {
    let mut seen = vec![false; len];
    for c in 0..job.chunks() {
        let r = job.region(c);
        if r.end() > len {
            return false;
        }
        for off in r.run_offsets() {
            for s in &mut seen[off..off + r.len] {
                if *s {
                    return false;
                }
                *s = true;
            }
        }
    }
    seen.iter().all(|&s| s)
}

/// Nice steps a helper takes below the thread that started the team (see the module docs).
pub const HELPER_NICE: i32 = 5;

/// Lowers the calling thread's priority by [`HELPER_NICE`] (on Linux the nice value is per thread). Failure
/// leaves it as it was: raising a nice value is always allowed, so only an unusual system refuses.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: `nice` has no memory effects; it changes this thread's scheduling weight.
    unsafe {
        libc::nice(HELPER_NICE);
    }
}

fn helper_loop(sh: &Shared, index: usize) {
    lower_priority();
    // The epoch the team started at, not the current one: a helper thread may first run after jobs (or the
    // team's drop) were published.
    let mut seen = 0;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = sh.epoch.load(Ordering::Acquire);
            if e != seen || sh.stop.load(Ordering::Relaxed) {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
            } else if started.elapsed() < sh.spin {
                // Give the core to other processes that want it; the job waits at most one yield.
                std::thread::yield_now();
            } else {
                let mut g = sh.sleep.lock().unwrap_or_else(|e| e.into_inner());
                sh.sleepers.fetch_add(1, Ordering::SeqCst);
                while sh.epoch.load(Ordering::SeqCst) == seen && !sh.stop.load(Ordering::SeqCst) {
                    g = sh.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                sh.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        }
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let work = {
            let slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.as_ref()
                .filter(|p| p.epoch == seen && index < p.wanted)
                .map(|p| p.work.clone())
        };
        if let Some(w) = work {
            // A panicking chunk stays claimed; the caller takes it over (and panics itself if it panics again).
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.help()));
        }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<(Arc<Team>, usize)>> = const { RefCell::new(None) };
    static LAST: Cell<RunStats> = const { Cell::new(RunStats { chunks: 0, by_helpers: 0, taken_over: 0 }) };
}

/// Runs `f` with `team` (using up to `helpers` helpers) as the team of this thread's [`run`] calls.
pub fn scope<R>(team: &Arc<Team>, helpers: usize, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<(Arc<Team>, usize)>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = prev);
        }
    }
    let prev = CURRENT.with(|c| c.borrow_mut().replace((team.clone(), helpers)));
    let _reset = Reset(prev);
    f()
}

/// Runs `job` on this thread's team (see [`scope`]), or alone outside a scope.
pub fn run<J: Job>(job: J, out: Tensor) -> Tensor {
    let current = CURRENT.with(|c| c.borrow().clone());
    let (t, stats) = match current {
        Some((team, helpers)) => team.run(job, out, helpers),
        None => run_alone(job, out),
    };
    LAST.with(|l| l.set(stats));
    t
}

/// Threads a [`run`] on this thread may use now: the caller and the scope's helpers (1 outside a scope).
pub fn threads() -> usize {
    CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .map_or(1, |(team, helpers)| 1 + (*helpers).min(team.helpers()))
    })
}

/// Threads this thread's team has in all: the caller and every helper (1 outside a scope). Unlike [`threads`], it
/// does not change when a step runs with fewer threads, so a split that must not move the results (the order of
/// a reduction) is cut by it.
pub fn capacity() -> usize {
    CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .map_or(1, |(team, _)| 1 + team.helpers())
    })
}

/// What the last [`run`] on this thread did.
pub fn last_stats() -> RunStats {
    LAST.with(|l| l.get())
}

#[cfg(test)]
mod tests;
