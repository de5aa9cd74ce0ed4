//! Attention arithmetic in f32 over an f32 or f16 KV cache: the online softmax update of a tile of queries by one
//! page of keys and values (flash-attention's update, exact up to rounding), and the merge of partial results
//! over disjoint key ranges (flash-decoding).
//!
//! A page stores keys and values in blocks laid out in the order the kernels read them ([`key_index`],
//! [`value_index`]), as `engine::kv` writes them: keys in blocks of [`KEY_BLOCK`] positions, each dimension-major
//! (`[head_dim][16]`), values in blocks of [`DIM_BLOCK`] dimensions, each position-major (`[stride][16]`). Scores
//! for sixteen keys are then sixteen lanes of vector products, each key and value is loaded (and converted from
//! f16) once for the whole tile of queries, nothing needs a horizontal sum, and every pass over a page is one
//! sequential stream (the prefetchers see a plain run of addresses, not a stride). Paths: AVX2 + FMA + F16C on
//! x86_64 (an AVX-512 version measured slower on a Xeon whose clock drops under 512-bit FMA), NEON on aarch64 (f16 through `fcvtl`, in every ARMv8 core), and a portable one; all three give the
//! same results up to the order of additions.

/// A query tile: up to this many queries share each key and value load.
pub const QUERY_TILE: usize = 4;
/// Keys scored together (and so the granularity of a page's key columns).
pub const KEY_BLOCK: usize = 16;
/// Head dimensions handled per pass over the values (and so the width of a value block).
pub const DIM_BLOCK: usize = 16;
/// The most keys one update takes (a KV cache page).
pub const MAX_KEYS: usize = 64;

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

    /// Bytes of one stored value.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only the x86 path prefetches
    fn value_bytes(&self) -> usize {
        match self {
            Rows::F32(_) => 4,
            Rows::F16(_) => 2,
            Rows::I8 { .. } => 1,
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

/// Where dimension `d` of the key at position `j` of a page is stored: blocks of [`KEY_BLOCK`] positions, each
/// `[head_dim][KEY_BLOCK]`.
#[inline(always)]
pub fn key_index(j: usize, d: usize, head_dim: usize) -> usize {
    (j / KEY_BLOCK) * head_dim * KEY_BLOCK + d * KEY_BLOCK + j % KEY_BLOCK
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
    /// Keys at [`key_index`]; whole key blocks up to `n` must exist.
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

/// Folds `page` into the states of up to [`QUERY_TILE`] queries: query `i` (`head_dim` values at `queries[i]`)
/// sees the page's first `visible[i]` keys.
pub fn update(queries: &[&[f32]], visible: &[usize], page: &Page<'_>, states: &mut [&mut Softmax]) {
    let (n, hd) = (page.n, page.head_dim);
    assert!(!queries.is_empty() && queries.len() <= QUERY_TILE);
    assert!(queries.len() == visible.len() && states.len() == queries.len());
    assert!(n <= MAX_KEYS && n <= page.stride && visible.iter().all(|&v| v <= n));
    assert!(queries.iter().all(|q| q.len() == hd) && states.iter().all(|s| s.acc.len() == hd));
    assert!(page.stride.is_multiple_of(KEY_BLOCK) && n <= page.stride);
    assert!(page.keys.len() >= n.div_ceil(KEY_BLOCK) * KEY_BLOCK * hd);
    assert!(page.values.len() >= page.stride * hd);
    assert!([page.keys, page.values]
        .iter()
        .all(|r| r.scales().is_none_or(|s| s.len() >= n)));
    let simd = hd.is_multiple_of(DIM_BLOCK);
    #[cfg(target_arch = "x86_64")]
    if simd
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: features detected; bounds asserted above.
        return unsafe { x86::update(queries, visible, page, states) };
    }
    #[cfg(target_arch = "aarch64")]
    if simd {
        // SAFETY: NEON is part of every aarch64 CPU; bounds asserted above.
        return unsafe { arm::update(queries, visible, page, states) };
    }
    let _ = simd;
    portable::update(queries, visible, page, states)
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
fn per_position(
    scores: &mut [[f32; MAX_KEYS]; QUERY_TILE],
    queries: usize,
    n: usize,
    rows: Rows<'_>,
) {
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
fn softmax_step(
    scores: &mut [[f32; MAX_KEYS]; QUERY_TILE],
    n: usize,
    visible: &[usize],
    states: &mut [&mut Softmax],
) {
    for (i, st) in states.iter_mut().enumerate() {
        let s = &mut scores[i];
        let vis = visible[i];
        if vis == 0 {
            s[..n].fill(0.0);
            continue;
        }
        let m = s[..vis].iter().fold(st.m, |m, &v| m.max(v));
        for v in s[..vis].iter_mut() {
            *v = exp(*v - m);
        }
        s[vis..n].fill(0.0);
        let mut lanes = [0f32; 8];
        for c in s[..n].chunks(8) {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += v;
            }
        }
        let correction = exp(st.m - m);
        st.l = st.l * correction + lanes.iter().sum::<f32>();
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
