//! Products of a range of weight rows against a few activation rows, on one thread: what one chunk of a fused
//! linear computes (the parallel split is the caller's, see `crate::team`).
//!
//! Weight rows are visited in panels: for several activation rows (prefill), each panel is read from memory once
//! and from cache for every further tile of [`M_TILE`] activation rows, and each unpacked block serves the whole
//! tile; kernels with the registers for it take two weight rows per tile ([`Kernel::ternary_dot2`]).

use std::ops::Range;

use super::pack::{TernaryWeights, BLOCK};
use super::{Kernel, M_TILE};

/// Runs `$call` (an expression over `$x`, an array of activation rows) on the tile `$t` as a fixed-size array,
/// so that each tile size is its own monomorphized kernel, and hands its result to `$store`.
macro_rules! tiled {
    ($t:expr, |$x:ident| $call:expr, |$r:ident| $store:expr) => {{
        let t = $t;
        match t.len() {
            1 => {
                let $x = [t[0]];
                let $r = $call;
                $store
            }
            2 => {
                let $x = [t[0], t[1]];
                let $r = $call;
                $store
            }
            3 => {
                let $x = [t[0], t[1], t[2]];
                let $r = $call;
                $store
            }
            _ => {
                let $x = [t[0], t[1], t[2], t[3]];
                let $r = $call;
                $store
            }
        }
    }};
}

/// Results of one tile: up to two weight rows × [`M_TILE`] activation rows.
type Tile = [[i32; M_TILE]; 2];

/// Weight rows visited together for every activation tile (64 rows of K = 6912 are 110 KiB packed).
const ROW_PANEL: usize = 64;

/// Errors of the whole-matrix products: shapes that do not agree, or a kernel this CPU lacks.
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

/// `put(row, i, Σ_k w[row, k] · xs[i][k])` for every row in `rows` and every activation row `i`. Each `xs[i]` is
/// padded with zeros to `w.blocks() * BLOCK` values and `xsum[i]` is its sum.
///
/// Panics if the kernel is not supported by this CPU or a slice is too short.
#[inline]
pub fn ternary_rows(
    kernel: Kernel,
    w: TernaryWeights<'_>,
    rows: Range<usize>,
    xs: &[&[i8]],
    xsum: &[i32],
    put: impl FnMut(usize, usize, i32),
) {
    assert!(
        kernel.is_supported(),
        "kernel {kernel} is not supported by this CPU"
    );
    assert!(rows.end <= w.rows() && xsum.len() == xs.len());
    let blocks = w.blocks();
    assert!(xs.iter().all(|x| x.len() >= blocks * BLOCK));
    let dot = |row: usize, pair: bool, t: &[&[i8]], i0: usize, out: &mut Tile| {
        // SAFETY (both calls): the kernel is supported and the slices are long enough (asserted above).
        if pair {
            let wr = [w.row(row), w.row(row + 1)];
            tiled!(t, |x| unsafe { kernel.ternary_dot2(wr, x, blocks) }, |r| {
                out[0][..r[0].len()].copy_from_slice(&r[0]);
                out[1][..r[1].len()].copy_from_slice(&r[1]);
            });
        } else {
            let wr = w.row(row);
            tiled!(t, |x| unsafe { kernel.ternary_dot(wr, x, blocks) }, |r| out
                [0][..r.len()]
                .copy_from_slice(&r));
        }
        for o in out.iter_mut().take(1 + usize::from(pair)) {
            for (i, v) in o.iter_mut().enumerate().take(t.len()) {
                *v -= xsum[i0 + i];
            }
        }
    };
    panels(rows, xs, kernel.pairs_rows(), dot, put);
}

/// `put(row, i, Σ_k w[row, k] · xs[i][k])` for int8 weights of `k` columns.
///
/// Panics if the kernel is not supported by this CPU or a slice is too short.
#[inline]
pub fn int8_rows(
    kernel: Kernel,
    w: &[i8],
    k: usize,
    rows: Range<usize>,
    xs: &[&[i8]],
    put: impl FnMut(usize, usize, i32),
) {
    assert!(
        kernel.is_supported(),
        "kernel {kernel} is not supported by this CPU"
    );
    assert!(rows.end * k <= w.len() && xs.iter().all(|x| x.len() >= k));
    let dot = |row: usize, _: bool, t: &[&[i8]], _: usize, out: &mut Tile| {
        let wr = &w[row * k..(row + 1) * k];
        // SAFETY: the kernel is supported; every tile row is cut to `k` values.
        tiled!(
            t,
            |x| unsafe { kernel.int8_dot(wr, x.map(|x| &x[..k])) },
            |r| out[0][..r.len()].copy_from_slice(&r)
        );
    };
    panels(rows, xs, false, dot, put);
}

/// `put(row, i, Σ_k w[row, k] · xs[i][k])` for f32 weights of `k` columns.
pub fn f32_rows(
    w: &[f32],
    k: usize,
    rows: Range<usize>,
    xs: &[&[f32]],
    mut put: impl FnMut(usize, usize, f32),
) {
    assert!(rows.end * k <= w.len() && xs.iter().all(|x| x.len() == k));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: features detected.
        return unsafe { f32_rows_avx2(w, k, rows, xs, &mut put) };
    }
    f32_rows_body(w, k, rows, xs, &mut put)
}

/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_rows_avx2(
    w: &[f32],
    k: usize,
    rows: Range<usize>,
    xs: &[&[f32]],
    put: &mut dyn FnMut(usize, usize, f32),
) {
    f32_rows_body(w, k, rows, xs, put)
}

#[inline(always)]
fn f32_rows_body(
    w: &[f32],
    k: usize,
    rows: Range<usize>,
    xs: &[&[f32]],
    put: &mut dyn FnMut(usize, usize, f32),
) {
    for row in rows {
        let wr = &w[row * k..(row + 1) * k];
        for (i, x) in xs.iter().enumerate() {
            put(row, i, dot(wr, x));
        }
    }
}

/// `Σ a[i] b[i]` over sixteen lanes (the compiler vectorizes it for the target it is compiled for).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for i in 0..8 {
        s += acc[i] + acc[i + 8];
    }
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Visits `rows` in panels, and inside each panel every tile of `M_TILE` activation rows; with `pairs`, two weight
/// rows at a time for tiles of two or more activation rows (`dot`'s `pair` argument).
#[inline(always)]
fn panels(
    rows: Range<usize>,
    xs: &[&[i8]],
    pairs: bool,
    mut dot: impl FnMut(usize, bool, &[&[i8]], usize, &mut Tile),
    mut put: impl FnMut(usize, usize, i32),
) {
    let m = xs.len();
    let mut vals: Tile = [[0; M_TILE]; 2];
    for panel in rows.clone().step_by(ROW_PANEL) {
        let panel_end = (panel + ROW_PANEL).min(rows.end);
        for m0 in (0..m).step_by(M_TILE) {
            let t = &xs[m0..(m0 + M_TILE).min(m)];
            let mut row = panel;
            while row < panel_end {
                let pair = pairs && t.len() >= 2 && row + 1 < panel_end;
                dot(row, pair, t, m0, &mut vals);
                for (r, v) in vals.iter().enumerate().take(1 + usize::from(pair)) {
                    for (i, &v) in v.iter().enumerate().take(t.len()) {
                        put(row + r, m0 + i, v);
                    }
                }
                row += 1 + usize::from(pair);
            }
        }
    }
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]` for packed ternary `w`; `x` is `m` rows of `w.cols()` values. One thread;
/// for tests and benchmarks (the engine splits rows across its team).
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
    let mut xp = vec![0i8; m * padded];
    let mut xsum = vec![0i32; m];
    for r in 0..m {
        let src = &x[r * k..(r + 1) * k];
        xp[r * padded..r * padded + k].copy_from_slice(src);
        xsum[r] = src.iter().map(|&v| v as i32).sum();
    }
    let rows: Vec<&[i8]> = xp.chunks(padded.max(1)).take(m).collect();
    ternary_rows(kernel, w, 0..n, &rows, &xsum, |row, i, v| {
        out[i * n + row] = v
    });
    Ok(())
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]` for int8 `w` of `n` rows of `k` values. One thread, as
/// [`ternary_matmul`].
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
    int8_rows(kernel, w, k, 0..n, &rows, |row, i, v| out[i * n + row] = v);
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
