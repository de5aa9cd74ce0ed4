//! Attention arithmetic in f32: the online softmax over one block of keys and values for a tile of queries
//! (flash-attention's update, exact up to rounding), and the merge of partial results over disjoint key ranges
//! (flash-decoding). Keys and values arrive as f32 rows (an f16 cache converts a page at a time first).
//!
//! The loops are written for the compiler to vectorize; [`update`] is compiled twice on x86_64, once with AVX2
//! and FMA, and picks at run time.

/// A query tile: up to this many queries share each key and value load.
pub const QUERY_TILE: usize = 4;

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

/// One block of keys for a tile of queries.
pub struct Block<'a> {
    /// `[n][head_dim]` keys and values.
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub n: usize,
    pub head_dim: usize,
    /// Score multiplier (`1/sqrt(head_dim)`).
    pub scale: f32,
}

/// Folds `block` into the states of up to [`QUERY_TILE`] queries: query `i` (`head_dim` values at
/// `queries[i]`) sees the first `visible[i]` keys of the block. `scores` is scratch of `QUERY_TILE * block.n`.
pub fn update(
    queries: &[&[f32]],
    visible: &[usize],
    block: &Block<'_>,
    states: &mut [&mut Softmax],
    scores: &mut [f32],
) {
    assert!(queries.len() <= QUERY_TILE && queries.len() == visible.len());
    assert_eq!(states.len(), queries.len());
    assert!(scores.len() >= QUERY_TILE * block.n);
    assert!(block.keys.len() >= block.n * block.head_dim);
    assert!(block.values.len() >= block.n * block.head_dim);
    assert!(queries.iter().all(|q| q.len() == block.head_dim));
    assert!(visible.iter().all(|&v| v <= block.n));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: features detected; shapes checked above.
        return unsafe { update_avx2(queries, visible, block, states, scores) };
    }
    update_body(queries, visible, block, states, scores)
}

/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn update_avx2(
    queries: &[&[f32]],
    visible: &[usize],
    block: &Block<'_>,
    states: &mut [&mut Softmax],
    scores: &mut [f32],
) {
    update_body(queries, visible, block, states, scores)
}

#[inline(always)]
fn update_body(
    queries: &[&[f32]],
    visible: &[usize],
    block: &Block<'_>,
    states: &mut [&mut Softmax],
    scores: &mut [f32],
) {
    let (n, hd) = (block.n, block.head_dim);
    let nq = queries.len();
    let most = visible.iter().copied().max().unwrap_or(0);
    // Scores: each key row is loaded once for every query of the tile.
    for j in 0..most {
        let k = &block.keys[j * hd..(j + 1) * hd];
        for (i, q) in queries.iter().enumerate() {
            scores[i * n + j] = dot(q, k) * block.scale;
        }
    }
    for i in 0..nq {
        let vis = visible[i];
        if vis == 0 {
            continue;
        }
        let s = &mut scores[i * n..i * n + vis];
        let st = &mut *states[i];
        let m = s.iter().fold(st.m, |m, &v| m.max(v));
        let correction = exp(st.m - m);
        let mut sum = 0f32;
        for v in s.iter_mut() {
            *v = exp(*v - m);
            sum += *v;
        }
        st.l = st.l * correction + sum;
        st.m = m;
        if correction != 1.0 {
            for a in st.acc.iter_mut() {
                *a *= correction;
            }
        }
    }
    // Weighted values, sixteen dimensions at a time held in registers over the whole block.
    for d0 in (0..hd).step_by(16) {
        let w = (hd - d0).min(16);
        for i in 0..nq {
            let vis = visible[i];
            let mut acc = [0f32; 16];
            acc[..w].copy_from_slice(&states[i].acc[d0..d0 + w]);
            for j in 0..vis {
                let p = scores[i * n + j];
                let v = &block.values[j * hd + d0..j * hd + d0 + w];
                for (a, &x) in acc.iter_mut().zip(v) {
                    *a += p * x;
                }
            }
            states[i].acc[d0..d0 + w].copy_from_slice(&acc[..w]);
        }
    }
}

/// `Σ a[i] b[i]` over sixteen lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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

    /// Softmax attention computed directly, in f64.
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

    #[test]
    fn blocks_and_merged_ranges_give_softmax_attention() {
        let (hd, n) = (40, 37);
        let keys = data(n * hd, 1);
        let values = data(n * hd, 2);
        let qs: Vec<Vec<f32>> = (0..3).map(|i| data(hd, 10 + i)).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        // Query i sees the first 37, 20 and 1 keys, fed in two blocks of 16 and 21 keys.
        let visible_total = [37usize, 20, 1];
        let mut states: Vec<Softmax> = (0..3).map(|_| Softmax::new(hd)).collect();
        let mut scores = vec![0f32; QUERY_TILE * n];
        for (start, len) in [(0usize, 16usize), (16, 21)] {
            let block = Block {
                keys: &keys[start * hd..],
                values: &values[start * hd..],
                n: len,
                head_dim: hd,
                scale,
            };
            let vis: Vec<usize> = visible_total
                .iter()
                .map(|&v| v.saturating_sub(start).min(len))
                .collect();
            let q: Vec<&[f32]> = qs.iter().map(|q| &q[..]).collect();
            let mut st: Vec<&mut Softmax> = states.iter_mut().collect();
            update(&q, &vis, &block, &mut st, &mut scores);
        }
        for i in 0..3 {
            let want = reference(&qs[i], &keys, &values, visible_total[i], hd, scale);
            let mut got = vec![0f32; hd];
            states[i].write_output(&mut got);
            for d in 0..hd {
                assert!(
                    (got[d] - want[d]).abs() < 1e-5,
                    "query {i} dim {d}: {} vs {}",
                    got[d],
                    want[d]
                );
            }
        }
        // The same over two separately computed key ranges, merged.
        let block = |s: usize, len: usize| Block {
            keys: &keys[s * hd..],
            values: &values[s * hd..],
            n: len,
            head_dim: hd,
            scale,
        };
        let (mut a, mut b) = (Softmax::new(hd), Softmax::new(hd));
        update(&[&qs[0]], &[16], &block(0, 16), &mut [&mut a], &mut scores);
        update(&[&qs[0]], &[21], &block(16, 21), &mut [&mut b], &mut scores);
        a.merge(b.m, b.l, &b.acc);
        let mut got = vec![0f32; hd];
        a.write_output(&mut got);
        let want = reference(&qs[0], &keys, &values, n, hd, scale);
        for d in 0..hd {
            assert!((got[d] - want[d]).abs() < 1e-5);
        }
    }
}
