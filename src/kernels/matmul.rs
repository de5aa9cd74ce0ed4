//! Whole matrix products: activations `[m, k]` (int8) times weights `[n, k]` (rows = output features) into `[m, n]`
//! (int32), output rows split across tract's current executor.

use rayon::prelude::*;
use tract_linalg::multithread::{current_tract_executor, Executor};

use super::pack::{TernaryWeights, BLOCK};
use super::{Kernel, M_TILE};

/// Weight rows handed to one task at least (below this, splitting costs more than it saves).
const MIN_ROWS_PER_TASK: usize = 32;
/// Weight rows visited together for every activation tile, so that for prefill they are read from cache, not
/// memory, for all but the first tile (64 rows of K = 6912 are 110 KiB packed).
const ROW_PANEL: usize = 64;

/// Errors of [`ternary_matmul`] and [`int8_matmul`]: shapes that do not agree, or a kernel this CPU lacks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MatmulError {
    #[error("activations have {len} values, not {m} rows of {k}")]
    Activations { len: usize, m: usize, k: usize },
    #[error("int8 weights have {len} values, not {n} rows of {k}")]
    Weights { len: usize, n: usize, k: usize },
    #[error("output has {len} values, not {m} rows of {n}")]
    Output { len: usize, m: usize, n: usize },
    #[error("kernel {0} is not supported by this CPU")]
    Unsupported(&'static str),
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]` for packed ternary `w`; `x` is `m` rows of `w.cols()` values.
pub fn ternary_matmul(
    kernel: Kernel,
    w: TernaryWeights<'_>,
    x: &[i8],
    m: usize,
    out: &mut [i32],
) -> Result<(), MatmulError> {
    let (n, k) = (w.rows(), w.cols());
    check(kernel, x.len(), m, k, out.len(), n)?;
    let padded = w.blocks() * BLOCK;
    // The kernels read whole blocks: give them zero-padded rows, and the row sums that turn codes into weights.
    let mut xp = vec![0i8; m * padded];
    let mut xsum = vec![0i32; m];
    for r in 0..m {
        let src = &x[r * k..(r + 1) * k];
        xp[r * padded..r * padded + k].copy_from_slice(src);
        xsum[r] = src.iter().map(|&v| v as i32).sum();
    }
    let rows: Vec<&[i8]> = xp.chunks(padded.max(1)).take(m).collect();
    let dot = TernaryRows {
        kernel,
        w,
        blocks: w.blocks(),
        xsum: &xsum,
    };
    run(&dot, n, &rows, out);
    Ok(())
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]` for int8 `w` of `n` rows of `k` values.
pub fn int8_matmul(
    kernel: Kernel,
    w: &[i8],
    n: usize,
    k: usize,
    x: &[i8],
    m: usize,
    out: &mut [i32],
) -> Result<(), MatmulError> {
    if w.len() != n * k {
        return Err(MatmulError::Weights { len: w.len(), n, k });
    }
    check(kernel, x.len(), m, k, out.len(), n)?;
    let rows: Vec<&[i8]> = (0..m).map(|r| &x[r * k..(r + 1) * k]).collect();
    run(&Int8Rows { kernel, w, k }, n, &rows, out);
    Ok(())
}

fn check(
    kernel: Kernel,
    x: usize,
    m: usize,
    k: usize,
    out: usize,
    n: usize,
) -> Result<(), MatmulError> {
    if !kernel.is_supported() {
        return Err(MatmulError::Unsupported(kernel.name()));
    }
    if x != m * k {
        return Err(MatmulError::Activations { len: x, m, k });
    }
    if out != m * n {
        return Err(MatmulError::Output { len: out, m, n });
    }
    Ok(())
}

/// One weight row against a tile of activation rows.
trait RowDot: Sync {
    fn dot<const M: usize>(&self, row: usize, xs: [&[i8]; M]) -> [i32; M];
}

/// Invariant: `kernel.is_supported()` (checked by `check` before construction).
struct TernaryRows<'a> {
    kernel: Kernel,
    w: TernaryWeights<'a>,
    blocks: usize,
    xsum: &'a [i32],
}

impl RowDot for TernaryRows<'_> {
    fn dot<const M: usize>(&self, row: usize, xs: [&[i8]; M]) -> [i32; M] {
        // SAFETY: the kernel is supported (struct invariant).
        unsafe { self.kernel.ternary_dot(self.w.row(row), xs, self.blocks) }
    }
}

/// Invariant: `kernel.is_supported()` (checked by `check` before construction).
struct Int8Rows<'a> {
    kernel: Kernel,
    w: &'a [i8],
    k: usize,
}

impl RowDot for Int8Rows<'_> {
    fn dot<const M: usize>(&self, row: usize, xs: [&[i8]; M]) -> [i32; M] {
        // SAFETY: the kernel is supported (struct invariant).
        unsafe {
            self.kernel
                .int8_dot(&self.w[row * self.k..(row + 1) * self.k], xs)
        }
    }
}

/// Ternary products need `- sum(x)` per activation row; int8 products are final.
trait Finish {
    fn finish(&self, _m: usize, v: i32) -> i32 {
        v
    }
}

impl Finish for TernaryRows<'_> {
    fn finish(&self, m: usize, v: i32) -> i32 {
        v - self.xsum[m]
    }
}

impl Finish for Int8Rows<'_> {}

/// Computes all `n` output features for every activation row in `xs`, into `out` (`[xs.len(), n]`).
fn run<D: RowDot + Finish>(dot: &D, n: usize, xs: &[&[i8]], out: &mut [i32]) {
    let m = xs.len();
    if n == 0 || m == 0 {
        return;
    }
    let executor = current_tract_executor();
    let threads = match &executor {
        Executor::SingleThread => 1,
        Executor::MultiThread(pool) => pool.current_num_threads(),
        Executor::RayonGlobal => rayon::current_num_threads(),
    };
    // Two tasks per thread even out uneven cores (a Pi's cores throttle separately).
    let per_task = n.div_ceil(threads * 2).max(MIN_ROWS_PER_TASK);
    // Results are computed row-major by weight row (`[n, m]`), so each task writes one contiguous range, then
    // transposed; for decode (`m == 1`) that is the output itself.
    let mut by_row = if m == 1 {
        Vec::new()
    } else {
        vec![0i32; n * m]
    };
    let target: &mut [i32] = if m == 1 { &mut *out } else { &mut by_row };
    let task = |(t, chunk): (usize, &mut [i32])| {
        let first = t * per_task;
        compute(dot, first, chunk.len() / m, xs, chunk)
    };
    if threads == 1 || n <= per_task {
        target.chunks_mut(per_task * m).enumerate().for_each(task);
    } else {
        let mut par = || {
            target
                .par_chunks_mut(per_task * m)
                .enumerate()
                .for_each(task)
        };
        match &executor {
            Executor::MultiThread(pool) => pool.install(par),
            _ => par(),
        }
    }
    if m > 1 {
        for (r, vals) in by_row.chunks(m).enumerate() {
            for (i, &v) in vals.iter().enumerate() {
                out[i * n + r] = v;
            }
        }
    }
}

/// Weight rows `first..first + count`, every activation row, into `dst` (`[count, m]`).
fn compute<D: RowDot + Finish>(dot: &D, first: usize, count: usize, xs: &[&[i8]], dst: &mut [i32]) {
    let m = xs.len();
    for panel in (0..count).step_by(ROW_PANEL) {
        let panel_end = (panel + ROW_PANEL).min(count);
        for m0 in (0..m).step_by(M_TILE) {
            let t = &xs[m0..(m0 + M_TILE).min(m)];
            for r in panel..panel_end {
                let row = first + r;
                let put = |dst: &mut [i32], vals: &[i32]| {
                    for (i, &v) in vals.iter().enumerate() {
                        dst[r * m + m0 + i] = dot.finish(m0 + i, v);
                    }
                };
                match t.len() {
                    1 => put(dst, &dot.dot(row, [t[0]])),
                    2 => put(dst, &dot.dot(row, [t[0], t[1]])),
                    3 => put(dst, &dot.dot(row, [t[0], t[1], t[2]])),
                    _ => put(dst, &dot.dot(row, [t[0], t[1], t[2], t[3]])),
                }
            }
        }
    }
}
