//! The aarch64 attention update (NEON; f16 through `fcvtl`).

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
        per_position(&mut scores, Q, n, page.keys);
        softmax_step(&mut scores, n, visible, states);
        per_position(&mut scores, Q, n, page.values);
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
