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
//! x86_64, NEON on aarch64 (f16 through `fcvtl`, in every ARMv8 core), and a portable one; all three give the
//! same results up to the order of additions.

/// A query tile: up to this many queries share each key and value load.
pub const QUERY_TILE: usize = 4;
/// Keys scored together (and so the granularity of a page's key columns).
pub const KEY_BLOCK: usize = 16;
/// Head dimensions handled per pass over the values (and so the width of a value block).
pub const DIM_BLOCK: usize = 16;
/// The most keys one update takes (a KV cache page).
pub const MAX_KEYS: usize = 64;

/// Stored keys or values: f32, or f16 bit patterns.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
}

impl Rows<'_> {
    fn len(&self) -> usize {
        match self {
            Rows::F32(v) => v.len(),
            Rows::F16(v) => v.len(),
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

mod portable {
    use super::*;

    fn key(r: Rows<'_>, i: usize) -> f32 {
        match r {
            Rows::F32(v) => v[i],
            Rows::F16(v) => half::f16::from_bits(v[i]).to_f32(),
        }
    }

    pub(super) fn update(
        queries: &[&[f32]],
        visible: &[usize],
        page: &Page<'_>,
        states: &mut [&mut Softmax],
    ) {
        let (n, hd) = (page.n, page.head_dim);
        let mut scores = [[0f32; MAX_KEYS]; QUERY_TILE];
        for (i, q) in queries.iter().enumerate() {
            for (j, score) in scores[i][..n].iter_mut().enumerate() {
                let mut s = 0f32;
                for (d, &qd) in q.iter().enumerate() {
                    s += qd * key(page.keys, key_index(j, d, hd));
                }
                *score = s * page.scale;
            }
        }
        softmax_step(&mut scores, n, visible, states);
        for (i, st) in states.iter_mut().enumerate() {
            for (j, &p) in scores[i][..visible[i]].iter().enumerate() {
                for (d, a) in st.acc.iter_mut().enumerate() {
                    *a += p * key(page.values, value_index(j, d, hd, page.stride));
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// Eight values from `p`, as f32.
    ///
    /// # Safety
    /// Eight values readable at `i`; F16C available.
    #[inline(always)]
    unsafe fn load8(r: Rows<'_>, i: usize) -> __m256 {
        unsafe {
            match r {
                Rows::F32(v) => _mm256_loadu_ps(v.as_ptr().add(i)),
                Rows::F16(v) => {
                    _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i))
                }
            }
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C available; the bounds `super::update` asserts.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn update(
        queries: &[&[f32]],
        visible: &[usize],
        page: &Page<'_>,
        states: &mut [&mut Softmax],
    ) {
        unsafe {
            match queries.len() {
                1 => tile::<1>(queries, visible, page, states),
                2 => tile::<2>(queries, visible, page, states),
                3 => tile::<3>(queries, visible, page, states),
                _ => tile::<4>(queries, visible, page, states),
            }
        }
    }

    #[inline(always)]
    unsafe fn tile<const Q: usize>(
        queries: &[&[f32]],
        visible: &[usize],
        page: &Page<'_>,
        states: &mut [&mut Softmax],
    ) {
        let (n, hd, stride) = (page.n, page.head_dim, page.stride);
        let mut scores = [[0f32; MAX_KEYS]; QUERY_TILE];
        unsafe {
            let scale = _mm256_set1_ps(page.scale);
            for j in (0..n).step_by(KEY_BLOCK) {
                let block = j * hd;
                let mut acc = [[_mm256_setzero_ps(); 2]; Q];
                for d in 0..hd {
                    let k0 = load8(page.keys, block + d * KEY_BLOCK);
                    let k1 = load8(page.keys, block + d * KEY_BLOCK + 8);
                    for q in 0..Q {
                        let b = _mm256_set1_ps(*queries[q].get_unchecked(d));
                        acc[q][0] = _mm256_fmadd_ps(b, k0, acc[q][0]);
                        acc[q][1] = _mm256_fmadd_ps(b, k1, acc[q][1]);
                    }
                }
                for q in 0..Q {
                    let s = scores[q].as_mut_ptr().add(j);
                    _mm256_storeu_ps(s, _mm256_mul_ps(acc[q][0], scale));
                    _mm256_storeu_ps(s.add(8), _mm256_mul_ps(acc[q][1], scale));
                }
            }
            softmax_step(&mut scores, n, visible, states);
            let most = visible.iter().copied().max().unwrap_or(0);
            for d0 in (0..hd).step_by(DIM_BLOCK) {
                let mut acc = [[_mm256_setzero_ps(); 2]; Q];
                for q in 0..Q {
                    let a = states[q].acc.as_ptr().add(d0);
                    acc[q] = [_mm256_loadu_ps(a), _mm256_loadu_ps(a.add(8))];
                }
                let block = d0 * stride;
                for j in 0..most {
                    let v0 = load8(page.values, block + j * DIM_BLOCK);
                    let v1 = load8(page.values, block + j * DIM_BLOCK + 8);
                    for q in 0..Q {
                        let p = _mm256_set1_ps(*scores[q].get_unchecked(j));
                        acc[q][0] = _mm256_fmadd_ps(p, v0, acc[q][0]);
                        acc[q][1] = _mm256_fmadd_ps(p, v1, acc[q][1]);
                    }
                }
                for q in 0..Q {
                    let a = states[q].acc.as_mut_ptr().add(d0);
                    _mm256_storeu_ps(a, acc[q][0]);
                    _mm256_storeu_ps(a.add(8), acc[q][1]);
                }
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use super::*;

    /// Eight values at `i`, as two f32 vectors.
    ///
    /// # Safety
    /// Eight values readable at `i`.
    #[inline(always)]
    unsafe fn load8(r: Rows<'_>, i: usize) -> (float32x4_t, float32x4_t) {
        unsafe {
            match r {
                Rows::F32(v) => (
                    vld1q_f32(v.as_ptr().add(i)),
                    vld1q_f32(v.as_ptr().add(i + 4)),
                ),
                Rows::F16(v) => crate::kernels::f16::arm::widen(vld1q_u16(v.as_ptr().add(i))),
            }
        }
    }

    /// # Safety
    /// The bounds `super::update` asserts.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn update(
        queries: &[&[f32]],
        visible: &[usize],
        page: &Page<'_>,
        states: &mut [&mut Softmax],
    ) {
        unsafe {
            match queries.len() {
                1 => tile::<1>(queries, visible, page, states),
                2 => tile::<2>(queries, visible, page, states),
                3 => tile::<3>(queries, visible, page, states),
                _ => tile::<4>(queries, visible, page, states),
            }
        }
    }

    #[inline(always)]
    unsafe fn tile<const Q: usize>(
        queries: &[&[f32]],
        visible: &[usize],
        page: &Page<'_>,
        states: &mut [&mut Softmax],
    ) {
        let (n, hd, stride) = (page.n, page.head_dim, page.stride);
        let mut scores = [[0f32; MAX_KEYS]; QUERY_TILE];
        unsafe {
            for j in (0..n).step_by(KEY_BLOCK) {
                let block = j * hd;
                let mut acc = [[vdupq_n_f32(0.0); 4]; Q];
                for d in 0..hd {
                    let (k0, k1) = load8(page.keys, block + d * KEY_BLOCK);
                    let (k2, k3) = load8(page.keys, block + d * KEY_BLOCK + 8);
                    for q in 0..Q {
                        let b = vdupq_n_f32(*queries[q].get_unchecked(d));
                        acc[q][0] = vfmaq_f32(acc[q][0], b, k0);
                        acc[q][1] = vfmaq_f32(acc[q][1], b, k1);
                        acc[q][2] = vfmaq_f32(acc[q][2], b, k2);
                        acc[q][3] = vfmaq_f32(acc[q][3], b, k3);
                    }
                }
                for q in 0..Q {
                    let s = scores[q].as_mut_ptr().add(j);
                    for (k, a) in acc[q].iter().enumerate() {
                        vst1q_f32(s.add(4 * k), vmulq_n_f32(*a, page.scale));
                    }
                }
            }
            softmax_step(&mut scores, n, visible, states);
            let most = visible.iter().copied().max().unwrap_or(0);
            for d0 in (0..hd).step_by(DIM_BLOCK) {
                let mut acc = [[vdupq_n_f32(0.0); 4]; Q];
                for q in 0..Q {
                    let a = states[q].acc.as_ptr().add(d0);
                    for (k, v) in acc[q].iter_mut().enumerate() {
                        *v = vld1q_f32(a.add(4 * k));
                    }
                }
                let block = d0 * stride;
                for j in 0..most {
                    let (v0, v1) = load8(page.values, block + j * DIM_BLOCK);
                    let (v2, v3) = load8(page.values, block + j * DIM_BLOCK + 8);
                    for q in 0..Q {
                        let p = vdupq_n_f32(*scores[q].get_unchecked(j));
                        acc[q][0] = vfmaq_f32(acc[q][0], p, v0);
                        acc[q][1] = vfmaq_f32(acc[q][1], p, v1);
                        acc[q][2] = vfmaq_f32(acc[q][2], p, v2);
                        acc[q][3] = vfmaq_f32(acc[q][3], p, v3);
                    }
                }
                for q in 0..Q {
                    let a = states[q].acc.as_mut_ptr().add(d0);
                    for (k, v) in acc[q].iter().enumerate() {
                        vst1q_f32(a.add(4 * k), *v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulps() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            let ulp = (want.to_bits() as i64 - got.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }

    /// Softmax attention computed directly, in f64, over row-major keys.
    fn reference(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        n: usize,
        hd: usize,
        scale: f32,
    ) -> Vec<f32> {
        let s: Vec<f64> = (0..n)
            .map(|j| {
                (0..hd)
                    .map(|d| q[d] as f64 * keys[j * hd + d] as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let l: f64 = p.iter().sum();
        (0..hd)
            .map(|d| {
                ((0..n)
                    .map(|j| p[j] * values[j * hd + d] as f64)
                    .sum::<f64>()
                    / l) as f32
            })
            .collect()
    }

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 % 2003) as f32 / 1001.0 - 1.0) * 2.0)
            .collect()
    }

    /// Keys and values in the page layout (`key_index`, `value_index`), f32 and f16 (rounded the same way for
    /// the reference).
    fn pages(
        keys: &[f32],
        values: &[f32],
        n: usize,
        hd: usize,
        stride: usize,
    ) -> (Vec<f32>, Vec<u16>, Vec<f32>, Vec<u16>) {
        let (mut kt, mut vt) = (vec![0f32; hd * stride], vec![0f32; hd * stride]);
        for j in 0..n {
            for d in 0..hd {
                kt[key_index(j, d, hd)] = keys[j * hd + d];
                vt[value_index(j, d, hd, stride)] = values[j * hd + d];
            }
        }
        let bits = |v: &[f32]| {
            v.iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect::<Vec<u16>>()
        };
        (kt.clone(), bits(&kt), vt.clone(), bits(&vt))
    }

    #[test]
    fn layout_indices_are_a_bijection() {
        for (hd, stride) in [(32usize, 64usize), (40, 32), (8, 16)] {
            let (mut keys, mut values) = (vec![false; hd * stride], vec![false; hd * stride]);
            for j in 0..stride {
                for d in 0..hd {
                    let (k, v) = (key_index(j, d, hd), value_index(j, d, hd, stride));
                    assert!(!keys[k] && !values[v], "({j}, {d}) of hd {hd}");
                    (keys[k], values[v]) = (true, true);
                }
            }
            assert!(keys.iter().chain(&values).all(|&s| s));
        }
    }

    fn round16(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
    }

    /// Every path (the one this CPU takes, and the portable one) against the reference: two pages of 16 and 21
    /// keys, three queries seeing 37, 20 and 1 keys, head dims that take the vector path (32) and that do not
    /// (40), f32 and f16 storage; and merging two key ranges computed apart.
    #[test]
    fn pages_and_merged_ranges_give_softmax_attention() {
        for hd in [32usize, 40] {
            let n = 37;
            let keys = data(n * hd, 1);
            let values = data(n * hd, 2);
            let qs: Vec<Vec<f32>> = (0..3).map(|i| data(hd, 10 + i)).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let total = [37usize, 20, 1];
            for f16 in [false, true] {
                for portable_path in [false, true] {
                    let mut states: Vec<Softmax> = (0..3).map(|_| Softmax::new(hd)).collect();
                    for (start, len) in [(0usize, 16usize), (16, 21)] {
                        let (kt, kt16, v, v16) =
                            pages(&keys[start * hd..], &values[start * hd..], len, hd, 32);
                        let page = Page {
                            keys: if f16 {
                                Rows::F16(&kt16)
                            } else {
                                Rows::F32(&kt)
                            },
                            values: if f16 { Rows::F16(&v16) } else { Rows::F32(&v) },
                            n: len,
                            stride: 32,
                            head_dim: hd,
                            scale,
                        };
                        let vis: Vec<usize> = total
                            .iter()
                            .map(|&t| t.saturating_sub(start).min(len))
                            .collect();
                        let q: Vec<&[f32]> = qs.iter().map(|q| &q[..]).collect();
                        let mut st: Vec<&mut Softmax> = states.iter_mut().collect();
                        if portable_path {
                            portable::update(&q, &vis, &page, &mut st);
                        } else {
                            update(&q, &vis, &page, &mut st);
                        }
                    }
                    let (k, v) = if f16 {
                        (round16(&keys), round16(&values))
                    } else {
                        (keys.clone(), values.clone())
                    };
                    for i in 0..3 {
                        let want = reference(&qs[i], &k, &v, total[i], hd, scale);
                        let mut got = vec![0f32; hd];
                        states[i].write_output(&mut got);
                        for d in 0..hd {
                            assert!(
                                (got[d] - want[d]).abs() < 1e-5,
                                "hd {hd} f16 {f16} portable {portable_path} query {i} dim {d}: {} vs {}",
                                got[d],
                                want[d]
                            );
                        }
                    }
                }
            }
            // Two key ranges computed apart, merged.
            let mut parts = vec![];
            for (start, len) in [(0usize, 16usize), (16, 21)] {
                let (kt, _, v, _) = pages(&keys[start * hd..], &values[start * hd..], len, hd, 32);
                let page = Page {
                    keys: Rows::F32(&kt),
                    values: Rows::F32(&v),
                    n: len,
                    stride: 32,
                    head_dim: hd,
                    scale,
                };
                let mut s = Softmax::new(hd);
                update(&[&qs[0]], &[len], &page, &mut [&mut s]);
                parts.push(s);
            }
            let b = parts.pop().unwrap();
            let mut a = parts.pop().unwrap();
            a.merge(b.m, b.l, &b.acc);
            let mut got = vec![0f32; hd];
            a.write_output(&mut got);
            let want = reference(&qs[0], &keys, &values, n, hd, scale);
            for d in 0..hd {
                assert!((got[d] - want[d]).abs() < 1e-5);
            }
        }
    }
}
