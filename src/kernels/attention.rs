//! Attention arithmetic over an f32, f16 or int8 KV cache: the online softmax update of a tile of queries by one
//! page of keys and values (flash-attention's update, exact up to rounding), and the merge of partial results
//! over disjoint key ranges (flash-decoding).
//!
//! A page stores keys and values in blocks laid out in the order the kernels read them, as `engine::kv` writes
//! them. Keys come in blocks of [`KEY_BLOCK`] positions: f32 and f16 keys dimension-major inside a block
//! ([`key_index`], `[head_dim][16]`), so that sixteen scores are sixteen lanes of f32 products; int8 keys in
//! groups of [`KEY_GROUP`] dimensions ([`key_index_i8`], `[head_dim / 4][16][4]`), so that one integer
//! dot-product instruction (`vpdpbusd`, `sdot`) takes four dimensions of a key at once against the query,
//! quantized to int8 too ([`Queries`]). Values come in blocks of [`DIM_BLOCK`] dimensions, each position-major
//! ([`value_index`], `[stride][16]`). Each key and value is then loaded (and converted) once for the whole tile
//! of queries, nothing needs a horizontal sum in the inner loops, and every pass over a page is one sequential
//! stream.
//!
//! Paths, chosen by the [`Kernel`] the linears use: on x86_64, AVX2 + FMA + F16C for f32 and f16 keys and for
//! the values (an AVX-512 version measured slower on a Xeon whose clock drops under 512-bit FMA), and
//! `vpdpbusd` (AVX-512 VNNI, 256-bit) or `vpmaddwd` (AVX2) for int8 keys; on aarch64, NEON (f16 through
//! `fcvtl`) and `sdot` (dotprod, Pi 5) or `smull`/`sadalp` (Pi 4) for int8 keys; and a portable path, the
//! reference. Each path runs the whole update under its own target features, so the softmax step between the
//! two passes is vectorized at its width too. Float paths agree up to the order of additions; int8 scores are
//! exact integer sums, so every path gives the same bits.

use crate::kernels::Kernel;

mod query;

pub use query::{Queries, Query};

/// A query tile: up to this many queries share each key and value load.
pub const QUERY_TILE: usize = 4;
/// Keys scored together (and so the granularity of a page's key columns).
pub const KEY_BLOCK: usize = 16;
/// Head dimensions handled per pass over the values (and so the width of a value block).
pub const DIM_BLOCK: usize = 16;
/// The most keys one update takes (a KV cache page).
pub const MAX_KEYS: usize = 64;
/// Dimensions of an int8 key stored together ([`key_index_i8`]): one lane of an integer dot product.
pub const KEY_GROUP: usize = 4;
/// The largest head the SIMD int8 paths take (wider ones take the portable path).
const MAX_SIMD_HEAD_DIM: usize = 256;

/// Scores (then softmax weights) of a tile of queries over one page.
type Scores = [[f32; MAX_KEYS]; QUERY_TILE];

/// Stored keys or values: f32, f16 bit patterns, or int8 with one scale per position.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    /// `q` at the usual index; the value is `q * scales[position]` (the page's positions, in order). The
    /// kernels load `q` as it is and apply the scales to the scores (keys) or the weights (values).
    I8 {
        q: &'a [i8],
        scales: &'a [f32],
    },
}

impl Rows<'_> {
    fn len(&self) -> usize {
        match self {
            Rows::F32(v) => v.len(),
            Rows::F16(v) => v.len(),
            Rows::I8 { q, .. } => q.len(),
        }
    }

    /// The per-position scales of int8 rows.
    fn scales(&self) -> Option<&[f32]> {
        match self {
            Rows::I8 { scales, .. } => Some(scales),
            _ => None,
        }
    }

    /// Where the stored values start, and how many bytes they take (for prefetching).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only the x86 path prefetches
    fn bytes(&self) -> (*const i8, usize) {
        match self {
            Rows::F32(v) => (v.as_ptr().cast(), v.len() * 4),
            Rows::F16(v) => (v.as_ptr().cast(), v.len() * 2),
            Rows::I8 { q, .. } => (q.as_ptr(), q.len()),
        }
    }
}

/// Running softmax state of one query over the keys seen so far: the largest score `m`, the sum `l` of
/// `exp(score - m)`, and `acc`, the sum of values weighted by `exp(score - m)` (`head_dim` values).
#[derive(Debug, Clone, PartialEq)]
pub struct Softmax {
    pub m: f32,
    pub l: f32,
    pub acc: Vec<f32>,
}

impl Softmax {
    pub fn new(head_dim: usize) -> Softmax {
        Softmax {
            m: f32::NEG_INFINITY,
            l: 0.0,
            acc: vec![0.0; head_dim],
        }
    }

    /// Clears the state for a new query.
    pub fn reset(&mut self) {
        self.m = f32::NEG_INFINITY;
        self.l = 0.0;
        self.acc.fill(0.0);
    }

    /// Folds in the state of the same query over other keys.
    pub fn merge(&mut self, other_m: f32, other_l: f32, other_acc: &[f32]) {
        if other_l == 0.0 {
            return;
        }
        let m = self.m.max(other_m);
        let (a, b) = (exp(self.m - m), exp(other_m - m));
        self.l = self.l * a + other_l * b;
        for (x, &y) in self.acc.iter_mut().zip(other_acc) {
            *x = *x * a + y * b;
        }
        self.m = m;
    }

    /// The attention output: `acc / l` (zero when no key was visible).
    pub fn write_output(&self, out: &mut [f32]) {
        let inv = if self.l > 0.0 { 1.0 / self.l } else { 0.0 };
        for (o, &a) in out.iter_mut().zip(&self.acc) {
            *o = a * inv;
        }
    }
}

/// `exp(x)`, within about one ulp of the exact value for `x` in `[-87, 88]` (Cephes' polynomial), branch-free so
/// loops over it vectorize; below the range it returns about `1e-38` instead of a subnormal or zero.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    let n = super::act::round_half_even(x * LOG2E);
    let r = x - n * C1 - n * C2;
    let z = r * r;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 5.0e-1)
        * z
        + r
        + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Where dimension `d` of the f32 or f16 key at position `j` of a page is stored: blocks of [`KEY_BLOCK`]
/// positions, each `[head_dim][KEY_BLOCK]`.
#[inline(always)]
pub fn key_index(j: usize, d: usize, head_dim: usize) -> usize {
    (j / KEY_BLOCK) * head_dim * KEY_BLOCK + d * KEY_BLOCK + j % KEY_BLOCK
}

/// Where dimension `d` of the int8 key at position `j` of a page is stored: blocks of [`KEY_BLOCK`] positions,
/// each `[head_dim / KEY_GROUP][KEY_BLOCK][KEY_GROUP]` (a last group narrower when `head_dim` is not a multiple
/// of [`KEY_GROUP`]).
#[inline(always)]
pub fn key_index_i8(j: usize, d: usize, head_dim: usize) -> usize {
    let g = d / KEY_GROUP;
    let width = KEY_GROUP.min(head_dim - g * KEY_GROUP);
    (j / KEY_BLOCK) * head_dim * KEY_BLOCK
        + g * KEY_GROUP * KEY_BLOCK
        + (j % KEY_BLOCK) * width
        + d % KEY_GROUP
}

/// Where dimension `d` of the value at position `j` of a page of `stride` positions is stored: blocks of
/// [`DIM_BLOCK`] dimensions, each `[stride][width]` (`width` is [`DIM_BLOCK`] but for a last, narrower block
/// when `head_dim` is not a multiple of it).
#[inline(always)]
pub fn value_index(j: usize, d: usize, head_dim: usize, stride: usize) -> usize {
    let b = d / DIM_BLOCK;
    let width = DIM_BLOCK.min(head_dim - b * DIM_BLOCK);
    b * DIM_BLOCK * stride + j * width + d % DIM_BLOCK
}

/// One page of keys and values of one KV head.
pub struct Page<'a> {
    /// Keys at [`key_index`] (int8 keys at [`key_index_i8`]); whole key blocks up to `n` must exist, zero past
    /// `n`.
    pub keys: Rows<'a>,
    /// Values at [`value_index`] for `stride` positions (`stride * head_dim` values).
    pub values: Rows<'a>,
    pub n: usize,
    /// Positions the page has room for (a multiple of [`KEY_BLOCK`]).
    pub stride: usize,
    pub head_dim: usize,
    /// Score multiplier (`1/sqrt(head_dim)`).
    pub scale: f32,
    /// The keys of the page read next, if any: fetched into the cache while this page's values are read, so
    /// that the next page starts on keys already on their way (a hint; no result depends on it).
    pub next_keys: Option<Rows<'a>>,
}

/// Folds `page` into the states of up to [`QUERY_TILE`] queries: query `i` sees the page's first `visible[i]`
/// keys. `kernel` must run on this CPU ([`Kernel::is_supported`]); it picks the path (see the module docs). For
/// int8 keys the queries must come from [`Queries`] made for int8.
pub fn update(
    kernel: Kernel,
    queries: &[Query<'_>],
    visible: &[usize],
    page: &Page<'_>,
    states: &mut [Softmax],
) {
    let (n, hd) = (page.n, page.head_dim);
    assert!(!queries.is_empty() && queries.len() <= QUERY_TILE);
    assert!(queries.len() == visible.len() && states.len() == queries.len());
    assert!(n <= MAX_KEYS && n <= page.stride && visible.iter().all(|&v| v <= n));
    assert!(
        queries.iter().all(|q| q.values.len() == hd) && states.iter().all(|s| s.acc.len() == hd)
    );
    assert!(page.stride.is_multiple_of(KEY_BLOCK) && n <= page.stride);
    assert!(page.keys.len() >= n.div_ceil(KEY_BLOCK) * KEY_BLOCK * hd);
    assert!(page.values.len() >= page.stride * hd);
    assert!([page.keys, page.values]
        .iter()
        .all(|r| r.scales().is_none_or(|s| s.len() >= n)));
    let int8 = matches!(page.keys, Rows::I8 { .. });
    assert!(!int8 || queries.iter().all(|q| q.codes.len() == hd));
    // SAFETY (all paths): `Path::choose` checked the CPU's features and the head's width; bounds asserted above.
    match Path::choose(kernel, hd) {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 { vnni } => unsafe { x86::update(vnni, queries, visible, page, states) },
        #[cfg(target_arch = "aarch64")]
        Path::Neon { dot } => unsafe { arm::update(dot, queries, visible, page, states) },
        Path::Portable => portable::update(queries, visible, page, states),
    }
}

/// What comes between the scores and the values, the same on every path (and compiled into each, with its
/// vector width): the keys' scales, the softmax step, the values' scales.
#[inline(always)]
fn between(scores: &mut Scores, visible: &[usize], page: &Page<'_>, states: &mut [Softmax]) {
    per_position(scores, states.len(), page.n, page.keys);
    softmax_step(scores, page.n, visible, states);
    per_position(scores, states.len(), page.n, page.values);
}

/// The code that runs an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Portable,
    /// AVX2 + FMA + F16C, and for int8 keys `vpdpbusd` when `vnni`.
    #[cfg(target_arch = "x86_64")]
    Avx2 {
        vnni: bool,
    },
    /// NEON, and for int8 keys `sdot` when `dot`.
    #[cfg(target_arch = "aarch64")]
    Neon {
        dot: bool,
    },
}

impl Path {
    /// The path for `kernel` and heads of `head_dim`: the SIMD paths take heads made of whole [`DIM_BLOCK`]s.
    fn choose(kernel: Kernel, head_dim: usize) -> Path {
        if !head_dim.is_multiple_of(DIM_BLOCK) || head_dim > MAX_SIMD_HEAD_DIM {
            return Path::Portable;
        }
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Avx512Vnni
                if std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c") =>
            {
                Path::Avx2 {
                    vnni: kernel == Kernel::Avx512Vnni,
                }
            }
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon | Kernel::NeonDot => Path::Neon {
                dot: kernel == Kernel::NeonDot,
            },
            _ => Path::Portable,
        }
    }
}

/// Quantizes one position's `head_dim` values to int8 with one scale, `max |x| / 127` (rounded to nearest):
/// returns the scale (0 for an all-zero row, whose codes are then 0).
pub fn quantize_i8(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        q.fill(0);
        return if amax.is_finite() { 0.0 } else { amax };
    }
    let inv = 127.0 / amax;
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    amax / 127.0
}

/// Multiplies each query's `scores[..n]` by the rows' per-position scales, when they have them: for keys, the
/// raw products become scores; for values, the softmax weights take the values' scales (after the softmax step,
/// so that its sum does not).
#[inline(always)]
fn per_position(scores: &mut Scores, queries: usize, n: usize, rows: Rows<'_>) {
    if let Some(scales) = rows.scales() {
        for s in scores.iter_mut().take(queries) {
            for (v, &k) in s[..n].iter_mut().zip(scales) {
                // Flushed to zero below the normal range: `exp` keeps masked weights at ~1e-38, and a scale
                // would take them subnormal, where every FMA over them costs a microcode assist (measured: the
                // int8 path at a third of its speed).
                let x = *v * k;
                *v = if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x };
            }
        }
    }
}

/// The softmax step between scores and values: turns `scores[i][..n]` into weights `exp(s - m)` (zero past
/// `visible[i]`) and updates each state's `m`, `l` and the scale of its `acc`.
#[inline(always)]
fn softmax_step(scores: &mut Scores, n: usize, visible: &[usize], states: &mut [Softmax]) {
    for (i, st) in states.iter_mut().enumerate() {
        let s = &mut scores[i];
        let vis = visible[i];
        if vis == 0 {
            s[..n].fill(0.0);
            continue;
        }
        // Lane-wise compare and select, which vectorizes (`f32::max`'s NaN rule does not): a NaN score is
        // passed over here and poisons the sums below, as it would anyway.
        let mut lanes = [st.m; 8];
        let (whole, rest) = s[..vis].split_at(vis / 8 * 8);
        for c in whole.chunks_exact(8) {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = if v > *l { v } else { *l };
            }
        }
        let m = lanes
            .iter()
            .chain(rest)
            .fold(st.m, |m, &v| if v > m { v } else { m });
        for v in s[..vis].iter_mut() {
            *v = exp(*v - m);
        }
        s[vis..n].fill(0.0);
        let mut sums = [0f32; 8];
        for c in s[..n].chunks(8) {
            for (l, &v) in sums.iter_mut().zip(c) {
                *l += v;
            }
        }
        let correction = exp(st.m - m);
        st.l = st.l * correction + sums.iter().sum::<f32>();
        st.m = m;
        if correction != 1.0 {
            for a in st.acc.iter_mut() {
                *a *= correction;
            }
        }
    }
}

mod portable;

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "aarch64")]
mod arm;

#[cfg(test)]
mod tests;
