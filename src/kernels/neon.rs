//! aarch64 NEON kernels, with and without the dot-product extension.
//!
//! A block's 32 bytes are two 16-byte loads; shifting each by 0, 2, 4, 6 and masking gives eight vectors of codes
//! lined up with the eight 16-byte slices of the block's activations (see [`super::pack`]).
//!
//! - Without `dotprod` (Cortex-A72, Pi 4): `smull`/`smlal2` into i16, each lane summing 16 products of at most
//!   2·128 per block (≤ 4096), widened once per block with `sadalp`. The int8 kernel widens every product
//!   (`smull`, `smull2`, `sadalp`) since two -128·-128 products already overflow i16.
//! - With `dotprod` (Cortex-A76, Pi 5): `sdot`, through `asm!` because `vdotq_s32` is not stable Rust. Only the
//!   `*_sdot` functions contain it, and they are only called when `dotprod` was detected at run time.
//! - Int4 (`super::int4`): nibbles minus 8 are signed bytes in -8..=7; without `dotprod` each i16 lane sums the
//!   eight products of a group it takes (at most 8·8·128 = 8192), widened once per group.

use std::arch::aarch64::*;
use std::arch::asm;

use super::int4::{GROUP, GROUP_BYTES};
use super::pack::{BLOCK, BLOCK_BYTES};

/// The eight code vectors of the block at `p`, in activation order (16 columns each).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn unpack(p: *const u8) -> [int8x16_t; 8] {
    let mask = vdupq_n_u8(3);
    // SAFETY: the caller guarantees 32 readable bytes at `p`.
    let (lo, hi) = unsafe { (vld1q_u8(p), vld1q_u8(p.add(16))) };
    let c = |v: uint8x16_t| vreinterpretq_s8_u8(vandq_u8(v, mask));
    [
        c(lo),
        c(hi),
        c(vshrq_n_u8::<2>(lo)),
        c(vshrq_n_u8::<2>(hi)),
        c(vshrq_n_u8::<4>(lo)),
        c(vshrq_n_u8::<4>(hi)),
        vreinterpretq_s8_u8(vshrq_n_u8::<6>(lo)),
        vreinterpretq_s8_u8(vshrq_n_u8::<6>(hi)),
    ]
}

/// `acc += a · b` lane-wise over groups of four bytes.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register-only instruction; `dotprod` is enabled for this function.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// # Safety
/// `w` holds `blocks` blocks and every `x` at least `blocks * BLOCK` values.
#[target_feature(enable = "neon")]
pub(super) unsafe fn ternary_dot<const M: usize>(
    w: &[u8],
    xs: [&[i8]; M],
    blocks: usize,
) -> [i32; M] {
    let mut acc = [vdupq_n_s32(0); M];
    for b in 0..blocks {
        let codes = unsafe { unpack(w.as_ptr().add(b * BLOCK_BYTES)) };
        for m in 0..M {
            let xp = xs[m][b * BLOCK..].as_ptr();
            let mut s = vdupq_n_s16(0);
            for (i, c) in codes.iter().enumerate() {
                let x = unsafe { vld1q_s8(xp.add(16 * i)) };
                s = vmlal_s8(s, vget_low_s8(*c), vget_low_s8(x));
                s = vmlal_high_s8(s, *c, x);
            }
            acc[m] = vpadalq_s16(acc[m], s);
        }
    }
    acc.map(|a| vaddvq_s32(a))
}

/// # Safety
/// `dotprod` must be available; `w` holds `blocks` blocks and every `x` at least `blocks * BLOCK` values.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn ternary_dot_sdot<const M: usize>(
    w: &[u8],
    xs: [&[i8]; M],
    blocks: usize,
) -> [i32; M] {
    let mut acc = [vdupq_n_s32(0); M];
    for b in 0..blocks {
        let codes = unsafe { unpack(w.as_ptr().add(b * BLOCK_BYTES)) };
        for m in 0..M {
            let xp = xs[m][b * BLOCK..].as_ptr();
            for (i, c) in codes.iter().enumerate() {
                acc[m] = unsafe { sdot(acc[m], *c, vld1q_s8(xp.add(16 * i))) };
            }
        }
    }
    acc.map(|a| vaddvq_s32(a))
}

/// How far ahead of the block being read the single-row kernels fetch weights (bytes).
const PREFETCH: usize = 1024;

/// Asks for the cache line at `p` (a hint: it never faults, whatever `p` is).
#[inline(always)]
fn prefetch(p: *const u8) {
    // SAFETY: `prfm` only hints the memory system; it does not fault or write.
    unsafe {
        asm!("prfm pldl1keep, [{p}]", p = in(reg) p, options(nostack, readonly, preserves_flags))
    };
}

/// One activation row (decode) without `dotprod`: four i16 sums per block (each of 2 code vectors, ≤ 4·2·128 =
/// 1024 per lane) widened into four accumulators, so that no single chain of multiply-accumulates (four cycles
/// each on a Cortex-A72) paces the loop below the Pi 4's memory bandwidth.
///
/// # Safety
/// As [`ternary_dot`] for one row.
#[target_feature(enable = "neon")]
pub(super) unsafe fn ternary_dot1(w: &[u8], x: &[i8], blocks: usize) -> i32 {
    let mut acc = [vdupq_n_s32(0); 4];
    for b in 0..blocks {
        // Rows lie one after another and a chunk is a short run of them (see the x86 kernel).
        if b % 2 == 0 {
            prefetch(w.as_ptr().wrapping_add(b * BLOCK_BYTES + PREFETCH));
        }
        let codes = unsafe { unpack(w.as_ptr().add(b * BLOCK_BYTES)) };
        let xp = x[b * BLOCK..].as_ptr();
        let mut s = [vdupq_n_s16(0); 4];
        for (i, c) in codes.iter().enumerate() {
            let xv = unsafe { vld1q_s8(xp.add(16 * i)) };
            s[i % 4] = vmlal_s8(s[i % 4], vget_low_s8(*c), vget_low_s8(xv));
            s[i % 4] = vmlal_high_s8(s[i % 4], *c, xv);
        }
        for (a, s) in acc.iter_mut().zip(s) {
            *a = vpadalq_s16(*a, s);
        }
    }
    let [a, b, c, d] = acc;
    vaddvq_s32(vaddq_s32(vaddq_s32(a, b), vaddq_s32(c, d)))
}

/// One activation row with `sdot`: one accumulator per code vector, so that each takes one `sdot` per block.
///
/// # Safety
/// `dotprod` must be available; as [`ternary_dot`] for one row.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn ternary_dot1_sdot(w: &[u8], x: &[i8], blocks: usize) -> i32 {
    let mut acc = [vdupq_n_s32(0); 8];
    for b in 0..blocks {
        if b % 2 == 0 {
            prefetch(w.as_ptr().wrapping_add(b * BLOCK_BYTES + PREFETCH));
        }
        let codes = unsafe { unpack(w.as_ptr().add(b * BLOCK_BYTES)) };
        let xp = x[b * BLOCK..].as_ptr();
        for (i, (a, c)) in acc.iter_mut().zip(codes).enumerate() {
            *a = unsafe { sdot(*a, c, vld1q_s8(xp.add(16 * i))) };
        }
    }
    let mut sum = vdupq_n_s32(0);
    for a in acc {
        sum = vaddq_s32(sum, a);
    }
    vaddvq_s32(sum)
}

/// Two weight rows × `M` activation rows: both rows' codes stay in registers (16 of the 32) while each activation
/// vector is loaded once for both.
///
/// # Safety
/// As [`ternary_dot`], for both rows.
#[target_feature(enable = "neon")]
pub(super) unsafe fn ternary_dot2<const M: usize>(
    w: [&[u8]; 2],
    xs: [&[i8]; M],
    blocks: usize,
) -> [[i32; M]; 2] {
    let mut acc = [[vdupq_n_s32(0); M]; 2];
    for b in 0..blocks {
        // SAFETY: in bounds by the caller's contract.
        let c = unsafe {
            [
                unpack(w[0].as_ptr().add(b * BLOCK_BYTES)),
                unpack(w[1].as_ptr().add(b * BLOCK_BYTES)),
            ]
        };
        for m in 0..M {
            let xp = xs[m][b * BLOCK..].as_ptr();
            let (mut s0, mut s1) = (vdupq_n_s16(0), vdupq_n_s16(0));
            for (i, (&c0, &c1)) in c[0].iter().zip(&c[1]).enumerate() {
                let x = unsafe { vld1q_s8(xp.add(16 * i)) };
                s0 = vmlal_s8(s0, vget_low_s8(c0), vget_low_s8(x));
                s0 = vmlal_high_s8(s0, c0, x);
                s1 = vmlal_s8(s1, vget_low_s8(c1), vget_low_s8(x));
                s1 = vmlal_high_s8(s1, c1, x);
            }
            acc[0][m] = vpadalq_s16(acc[0][m], s0);
            acc[1][m] = vpadalq_s16(acc[1][m], s1);
        }
    }
    acc.map(|row| row.map(|a| vaddvq_s32(a)))
}

/// [`ternary_dot2`] with `sdot`.
///
/// # Safety
/// `dotprod` must be available; as [`ternary_dot`] for both rows.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn ternary_dot2_sdot<const M: usize>(
    w: [&[u8]; 2],
    xs: [&[i8]; M],
    blocks: usize,
) -> [[i32; M]; 2] {
    let mut acc = [[vdupq_n_s32(0); M]; 2];
    for b in 0..blocks {
        // SAFETY: in bounds by the caller's contract.
        let c = unsafe {
            [
                unpack(w[0].as_ptr().add(b * BLOCK_BYTES)),
                unpack(w[1].as_ptr().add(b * BLOCK_BYTES)),
            ]
        };
        for m in 0..M {
            let xp = xs[m][b * BLOCK..].as_ptr();
            for (i, (&c0, &c1)) in c[0].iter().zip(&c[1]).enumerate() {
                let x = unsafe { vld1q_s8(xp.add(16 * i)) };
                acc[0][m] = unsafe { sdot(acc[0][m], c0, x) };
                acc[1][m] = unsafe { sdot(acc[1][m], c1, x) };
            }
        }
    }
    acc.map(|row| row.map(|a| vaddvq_s32(a)))
}

/// Adds the scalar tail past the last full 16 values.
fn tail<const M: usize>(w: &[i8], xs: [&[i8]; M], from: usize, out: &mut [i32; M]) {
    for m in 0..M {
        out[m] += w[from..]
            .iter()
            .zip(&xs[m][from..])
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum::<i32>();
    }
}

/// # Safety
/// Every `x` has `w.len()` values.
#[target_feature(enable = "neon")]
pub(super) unsafe fn int8_dot<const M: usize>(w: &[i8], xs: [&[i8]; M]) -> [i32; M] {
    let full = w.len() / 16 * 16;
    let mut acc = [vdupq_n_s32(0); M];
    let mut i = 0;
    while i < full {
        let wv = unsafe { vld1q_s8(w.as_ptr().add(i)) };
        for m in 0..M {
            let x = unsafe { vld1q_s8(xs[m].as_ptr().add(i)) };
            acc[m] = vpadalq_s16(acc[m], vmull_s8(vget_low_s8(wv), vget_low_s8(x)));
            acc[m] = vpadalq_s16(acc[m], vmull_high_s8(wv, x));
        }
        i += 16;
    }
    let mut out = acc.map(|a| vaddvq_s32(a));
    tail(w, xs, full, &mut out);
    out
}

/// # Safety
/// `dotprod` must be available; every `x` has `w.len()` values.
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn int8_dot_sdot<const M: usize>(w: &[i8], xs: [&[i8]; M]) -> [i32; M] {
    let full = w.len() / 16 * 16;
    let mut acc = [vdupq_n_s32(0); M];
    let mut i = 0;
    while i < full {
        let wv = unsafe { vld1q_s8(w.as_ptr().add(i)) };
        for m in 0..M {
            acc[m] = unsafe { sdot(acc[m], wv, vld1q_s8(xs[m].as_ptr().add(i))) };
        }
        i += 16;
    }
    let mut out = acc.map(|a| vaddvq_s32(a));
    tail(w, xs, full, &mut out);
    out
}

/// One int4 group at `g`: four 16-byte loads of weights as eight signed weight vectors, each with the 16
/// activations it multiplies (low nibbles with `x[16c..]`, high nibbles with `x[64 + 16c..]`).
///
/// # Safety
/// Group `g` must be in bounds of `w` and `x`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn int4_group(w: &[u8], x: &[i8], g: usize) -> [(int8x16_t, int8x16_t); 8] {
    let (mask, eight) = (vdupq_n_u8(0x0F), vdupq_n_s8(8));
    let signed = |v: uint8x16_t| vsubq_s8(vreinterpretq_s8_u8(v), eight);
    // SAFETY: in bounds by the caller's contract.
    unsafe {
        let (wp, xp) = (w.as_ptr().add(g * GROUP_BYTES), x.as_ptr().add(g * GROUP));
        let mut out = [(vdupq_n_s8(0), vdupq_n_s8(0)); 8];
        for c in 0..4 {
            let b = vld1q_u8(wp.add(16 * c));
            out[2 * c] = (signed(vandq_u8(b, mask)), vld1q_s8(xp.add(16 * c)));
            out[2 * c + 1] = (signed(vshrq_n_u8::<4>(b)), vld1q_s8(xp.add(64 + 16 * c)));
        }
        out
    }
}

/// Int4 with `smull`/`smlal`, see the module docs and `super::Kernel::int4_dot`.
///
/// # Safety
/// The slices as `super::Kernel::int4_dot` checks them.
#[target_feature(enable = "neon")]
pub(super) unsafe fn int4_dot(w: &[u8], scales: &[f32], x: &[i8]) -> f32 {
    let mut acc = [vdupq_n_f32(0.0); 2];
    for (g, &scale) in scales.iter().enumerate() {
        // SAFETY: group g is in bounds.
        let v = unsafe { int4_group(w, x, g) };
        let (mut lo, mut hi) = (vdupq_n_s16(0), vdupq_n_s16(0));
        for (wv, xv) in v {
            lo = vmlal_s8(lo, vget_low_s8(wv), vget_low_s8(xv));
            hi = vmlal_high_s8(hi, wv, xv);
        }
        let s = vpadalq_s16(vpaddlq_s16(lo), hi);
        acc[g & 1] = vfmaq_n_f32(acc[g & 1], vcvtq_f32_s32(s), scale);
    }
    vaddvq_f32(vaddq_f32(acc[0], acc[1]))
}

/// Int4 with `sdot`, see the module docs and `super::Kernel::int4_dot`.
///
/// # Safety
/// `dotprod` must be available; the slices as for [`int4_dot`].
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn int4_dot_sdot(w: &[u8], scales: &[f32], x: &[i8]) -> f32 {
    let mut acc = [vdupq_n_f32(0.0); 2];
    for (g, &scale) in scales.iter().enumerate() {
        // SAFETY: group g is in bounds; `dotprod` is enabled.
        let v = unsafe { int4_group(w, x, g) };
        let (mut a, mut b) = (vdupq_n_s32(0), vdupq_n_s32(0));
        for pair in v.chunks_exact(2) {
            a = unsafe { sdot(a, pair[0].0, pair[0].1) };
            b = unsafe { sdot(b, pair[1].0, pair[1].1) };
        }
        acc[g & 1] = vfmaq_n_f32(acc[g & 1], vcvtq_f32_s32(vaddq_s32(a, b)), scale);
    }
    vaddvq_f32(vaddq_f32(acc[0], acc[1]))
}

/// One group of a nibble row (`super::planes`) at `g`: eight unsigned code vectors (0..=15, so also valid signed
/// bytes), each with the 16 activations it multiplies, as [`int4_group`] lays them out.
///
/// # Safety
/// Group `g` must be in bounds of `w` and `x`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn nibble_group(w: &[u8], x: &[i8], g: usize) -> [(int8x16_t, int8x16_t); 8] {
    let mask = vdupq_n_u8(0x0F);
    // SAFETY: in bounds by the caller's contract.
    unsafe {
        let (wp, xp) = (w.as_ptr().add(g * GROUP_BYTES), x.as_ptr().add(g * GROUP));
        let mut out = [(vdupq_n_s8(0), vdupq_n_s8(0)); 8];
        for c in 0..4 {
            let b = vld1q_u8(wp.add(16 * c));
            out[2 * c] = (
                vreinterpretq_s8_u8(vandq_u8(b, mask)),
                vld1q_s8(xp.add(16 * c)),
            );
            out[2 * c + 1] = (
                vreinterpretq_s8_u8(vshrq_n_u8::<4>(b)),
                vld1q_s8(xp.add(64 + 16 * c)),
            );
        }
        out
    }
}

/// Nibble rows with `smull`/`smlal`: each i16 lane sums the four products of a group it takes (at most
/// 4·15·128 = 7680), widened once per group into one of two accumulators.
///
/// # Safety
/// The slices as `super::Kernel::nibble_dot` checks them.
#[target_feature(enable = "neon")]
pub(super) unsafe fn nibble_dot(w: &[u8], x: &[i8]) -> i32 {
    let mut acc = [vdupq_n_s32(0); 2];
    for g in 0..w.len() / GROUP_BYTES {
        prefetch(w.as_ptr().wrapping_add(g * GROUP_BYTES + PREFETCH));
        // SAFETY: group g is in bounds.
        let v = unsafe { nibble_group(w, x, g) };
        let (mut lo, mut hi) = (vdupq_n_s16(0), vdupq_n_s16(0));
        for (wv, xv) in v {
            lo = vmlal_s8(lo, vget_low_s8(wv), vget_low_s8(xv));
            hi = vmlal_high_s8(hi, wv, xv);
        }
        acc[g & 1] = vpadalq_s16(vpadalq_s16(acc[g & 1], lo), hi);
    }
    vaddvq_s32(vaddq_s32(acc[0], acc[1]))
}

/// Nibble rows with `sdot`: four accumulators, two `sdot` each per group.
///
/// # Safety
/// `dotprod` must be available; the slices as for [`nibble_dot`].
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn nibble_dot_sdot(w: &[u8], x: &[i8]) -> i32 {
    let mut acc = [vdupq_n_s32(0); 4];
    for g in 0..w.len() / GROUP_BYTES {
        prefetch(w.as_ptr().wrapping_add(g * GROUP_BYTES + PREFETCH));
        // SAFETY: group g is in bounds; `dotprod` is enabled.
        let v = unsafe { nibble_group(w, x, g) };
        for (i, (wv, xv)) in v.into_iter().enumerate() {
            acc[i % 4] = unsafe { sdot(acc[i % 4], wv, xv) };
        }
    }
    let [a, b, c, d] = acc;
    vaddvq_s32(vaddq_s32(vaddq_s32(a, b), vaddq_s32(c, d)))
}
