//! The aarch64 attention path: NEON for f32 and f16 keys (f16 through `fcvtl`) and for the values; int8 keys with
//! `sdot` by element (dotprod, Cortex-A76 / Pi 5, through `asm!` as in `kernels::neon`) or `smull`/`sadalp`
//! (Cortex-A72 / Pi 4).

use std::arch::aarch64::*;
use std::arch::asm;

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
            Rows::I8 { q, .. } => {
                let w = vmovl_s8(vld1_s8(q.as_ptr().add(i)));
                (
                    vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))),
                    vcvtq_f32_s32(vmovl_high_s16(w)),
                )
            }
        }
    }
}

/// Runs `$tile::<Q>($args)` for the number of queries `$q`.
macro_rules! by_queries {
    ($q:expr, $tile:ident, $($args:expr),*) => {
        match $q {
            1 => $tile::<1>($($args),*),
            2 => $tile::<2>($($args),*),
            3 => $tile::<3>($($args),*),
            _ => $tile::<4>($($args),*),
        }
    };
}

/// The update on this path, with `sdot` for int8 keys when `dot`.
///
/// # Safety
/// The bounds `super::update` asserts; dotprod available when `dot`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn update(
    dot: bool,
    queries: &[Query<'_>],
    visible: &[usize],
    page: &Page<'_>,
    states: &mut [Softmax],
) {
    let mut scores: Scores = [[0f32; MAX_KEYS]; QUERY_TILE];
    unsafe {
        match (page.keys, dot) {
            (Rows::I8 { .. }, true) => scores_i8_sdot(queries, page, &mut scores),
            (Rows::I8 { .. }, false) => scores_i8(queries, page, &mut scores),
            _ => scores_float(queries, page, &mut scores),
        }
        between(&mut scores, visible, page, states);
        accumulate(&scores, visible, page, states);
    }
}

/// Scores over f32 or f16 keys.
///
/// # Safety
/// The bounds `super::update` asserts; keys not int8.
#[target_feature(enable = "neon")]
pub(super) unsafe fn scores_float(queries: &[Query<'_>], page: &Page<'_>, out: &mut Scores) {
    unsafe { by_queries!(queries.len(), float_tile, queries, page, out) }
}

#[inline(always)]
unsafe fn float_tile<const Q: usize>(queries: &[Query<'_>], page: &Page<'_>, out: &mut Scores) {
    let (n, hd) = (page.n, page.head_dim);
    let q: [*const f32; Q] = std::array::from_fn(|i| queries[i].values.as_ptr());
    unsafe {
        for j in (0..n).step_by(KEY_BLOCK) {
            let block = j * hd;
            let mut acc = [[vdupq_n_f32(0.0); 4]; Q];
            for d in 0..hd {
                let (k0, k1) = load8(page.keys, block + d * KEY_BLOCK);
                let (k2, k3) = load8(page.keys, block + d * KEY_BLOCK + 8);
                for i in 0..Q {
                    let b = vdupq_n_f32(*q[i].add(d));
                    acc[i][0] = vfmaq_f32(acc[i][0], b, k0);
                    acc[i][1] = vfmaq_f32(acc[i][1], b, k1);
                    acc[i][2] = vfmaq_f32(acc[i][2], b, k2);
                    acc[i][3] = vfmaq_f32(acc[i][3], b, k3);
                }
            }
            for i in 0..Q {
                let s = out[i].as_mut_ptr().add(j);
                for (k, a) in acc[i].iter().enumerate() {
                    vst1q_f32(s.add(4 * k), vmulq_n_f32(*a, page.scale));
                }
            }
        }
    }
}

/// `acc += a · b[L]` over groups of four bytes: `sdot` by element.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot_lane<const L: i32>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register-only instruction; `dotprod` is enabled for this function.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.4b[{l}]",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            l = const L,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// Scores over int8 keys with `sdot`: a vector of four keys' groups against one group of the query, picked by
/// lane from sixteen of its codes.
///
/// # Safety
/// NEON and dotprod available; the bounds `super::update` asserts; int8 keys and quantized queries.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn scores_i8_sdot(queries: &[Query<'_>], page: &Page<'_>, out: &mut Scores) {
    unsafe { by_queries!(queries.len(), sdot_tile, queries, page, out) }
}

/// One group (`G` of the sixteen codes in `qv`) of a key block into `acc`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot_group<const Q: usize, const G: i32>(
    acc: &mut [[int32x4_t; 4]; Q],
    keys: *const i8,
    qv: &[int8x16_t; Q],
) {
    unsafe {
        let k = [0, 16, 32, 48].map(|o| vld1q_s8(keys.add(o)));
        for i in 0..Q {
            for (a, &kv) in acc[i].iter_mut().zip(&k) {
                *a = sdot_lane::<G>(*a, kv, qv[i]);
            }
        }
    }
}

#[inline(always)]
unsafe fn sdot_tile<const Q: usize>(queries: &[Query<'_>], page: &Page<'_>, out: &mut Scores) {
    let Rows::I8 { q: keys, .. } = page.keys else {
        unreachable!("float keys take the float path")
    };
    let (n, hd) = (page.n, page.head_dim);
    const GROUP_BYTES: usize = KEY_GROUP * KEY_BLOCK;
    unsafe {
        for j in (0..n).step_by(KEY_BLOCK) {
            let block = keys.as_ptr().add(j * hd);
            let mut acc = [[vdupq_n_s32(0); 4]; Q];
            for c in (0..hd).step_by(16) {
                let qv: [int8x16_t; Q] =
                    std::array::from_fn(|i| vld1q_s8(queries[i].codes.as_ptr().add(c)));
                let at = block.add(c / KEY_GROUP * GROUP_BYTES);
                sdot_group::<Q, 0>(&mut acc, at, &qv);
                sdot_group::<Q, 1>(&mut acc, at.add(GROUP_BYTES), &qv);
                sdot_group::<Q, 2>(&mut acc, at.add(2 * GROUP_BYTES), &qv);
                sdot_group::<Q, 3>(&mut acc, at.add(3 * GROUP_BYTES), &qv);
            }
            store_i8_scores(&acc, queries, page.scale, out, j);
        }
    }
}

/// Sixteen integer scores per query (four vectors of four keys) as f32, times the query's factor.
#[inline(always)]
unsafe fn store_i8_scores<const Q: usize>(
    acc: &[[int32x4_t; 4]; Q],
    queries: &[Query<'_>],
    scale: f32,
    out: &mut Scores,
    j: usize,
) {
    for i in 0..Q {
        let f = scale * queries[i].scale;
        for (k, a) in acc[i].iter().enumerate() {
            // SAFETY: `j + 16 <= MAX_KEYS` (whole key blocks of a page of at most MAX_KEYS).
            unsafe {
                vst1q_f32(
                    out[i].as_mut_ptr().add(j + 4 * k),
                    vmulq_n_f32(vcvtq_f32_s32(*a), f),
                )
            };
        }
    }
}

/// Scores over int8 keys without dotprod: `smull` of two keys' groups by the query's group (repeated), `sadalp`
/// into sums of pairs of dimensions, and one `addp` per four keys at the end.
///
/// # Safety
/// NEON available; the bounds `super::update` asserts; int8 keys and quantized queries.
#[target_feature(enable = "neon")]
pub(super) unsafe fn scores_i8(queries: &[Query<'_>], page: &Page<'_>, out: &mut Scores) {
    unsafe { by_queries!(queries.len(), smull_tile, queries, page, out) }
}

#[inline(always)]
unsafe fn smull_tile<const Q: usize>(queries: &[Query<'_>], page: &Page<'_>, out: &mut Scores) {
    let Rows::I8 { q: keys, .. } = page.keys else {
        unreachable!("float keys take the float path")
    };
    let (n, hd) = (page.n, page.head_dim);
    let groups = hd / KEY_GROUP;
    unsafe {
        for j in (0..n).step_by(KEY_BLOCK) {
            let block = keys.as_ptr().add(j * hd);
            let mut sums = [[vdupq_n_s32(0); 4]; Q];
            // Half a block at a time (keys 8h..8h+8): the pair sums of sixteen keys would not fit the registers.
            for h in 0..2 {
                // Keys 8h + (0, 1), (2, 3), (4, 5), (6, 7): each lane a pair of dimensions of one key.
                let mut acc = [[vdupq_n_s32(0); 4]; Q];
                for g in 0..groups {
                    let at = block.add(g * KEY_GROUP * KEY_BLOCK + 32 * h);
                    let (a, b) = (vld1q_s8(at), vld1q_s8(at.add(16)));
                    for i in 0..Q {
                        let word = queries[i].codes.as_ptr().add(g * KEY_GROUP);
                        let w =
                            vreinterpretq_s8_s32(vdupq_n_s32(word.cast::<i32>().read_unaligned()));
                        let lo = vget_low_s8(w);
                        acc[i][0] = vpadalq_s16(acc[i][0], vmull_s8(vget_low_s8(a), lo));
                        acc[i][1] = vpadalq_s16(acc[i][1], vmull_high_s8(a, w));
                        acc[i][2] = vpadalq_s16(acc[i][2], vmull_s8(vget_low_s8(b), lo));
                        acc[i][3] = vpadalq_s16(acc[i][3], vmull_high_s8(b, w));
                    }
                }
                for i in 0..Q {
                    sums[i][2 * h] = vpaddq_s32(acc[i][0], acc[i][1]);
                    sums[i][2 * h + 1] = vpaddq_s32(acc[i][2], acc[i][3]);
                }
            }
            store_i8_scores(&sums, queries, page.scale, out, j);
        }
    }
}

/// Adds each query's weighted values (`weights[i][j]` for value `j`) to its state's accumulators.
///
/// # Safety
/// The bounds `super::update` asserts.
#[target_feature(enable = "neon")]
unsafe fn accumulate(weights: &Scores, visible: &[usize], page: &Page<'_>, states: &mut [Softmax]) {
    let most = visible.iter().copied().max().unwrap_or(0);
    unsafe { by_queries!(states.len(), value_tile, weights, most, page, states) }
}

#[inline(always)]
unsafe fn value_tile<const Q: usize>(
    weights: &Scores,
    most: usize,
    page: &Page<'_>,
    states: &mut [Softmax],
) {
    let (hd, stride) = (page.head_dim, page.stride);
    unsafe {
        for d0 in (0..hd).step_by(DIM_BLOCK) {
            let mut acc = [[vdupq_n_f32(0.0); 4]; Q];
            for (a, st) in acc.iter_mut().zip(states.iter()) {
                let p = st.acc.as_ptr().add(d0);
                for (k, v) in a.iter_mut().enumerate() {
                    *v = vld1q_f32(p.add(4 * k));
                }
            }
            let block = d0 * stride;
            for j in 0..most {
                let (v0, v1) = load8(page.values, block + j * DIM_BLOCK);
                let (v2, v3) = load8(page.values, block + j * DIM_BLOCK + 8);
                for i in 0..Q {
                    let p = vdupq_n_f32(*weights[i].get_unchecked(j));
                    acc[i][0] = vfmaq_f32(acc[i][0], p, v0);
                    acc[i][1] = vfmaq_f32(acc[i][1], p, v1);
                    acc[i][2] = vfmaq_f32(acc[i][2], p, v2);
                    acc[i][3] = vfmaq_f32(acc[i][3], p, v3);
                }
            }
            for (a, st) in acc.iter().zip(states.iter_mut()) {
                let p = st.acc.as_mut_ptr().add(d0);
                for (k, v) in a.iter().enumerate() {
                    vst1q_f32(p.add(4 * k), *v);
                }
            }
        }
    }
}
