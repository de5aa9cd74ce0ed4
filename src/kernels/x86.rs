//! x86_64 AVX2 kernels.
//!
//! Ternary: `vpmaddubsw` multiplies the unsigned codes (0..=2) by the signed activations and adds pairs into i16
//! (at most 2·2·128 = 512 per pair, so never saturating); the four code vectors of a block are summed in i16
//! (≤ 2048) and widened once per block with `vpmaddwd` against ones.
//!
//! Int8: both operands are signed, and `vpmaddubsw` would saturate (255·128·2 > 32767), so bytes are widened to
//! i16 and multiplied with `vpmaddwd`, exact for every input including -128.
//!
//! Int4 (`super::int4`): the unsigned codes (0..=15) times the signed activations, by `vpmaddubsw` (at most
//! 2·15·128 = 3840 per pair, and the four vectors of a group sum to at most 15360 in i16) or `vpdpbusd`; the
//! code offset comes off lane 0 of each group's i32 lanes, and the lanes are scaled by the group's scale in f32.

use std::arch::x86_64::*;

use super::int4::{GROUP, GROUP_BYTES};
use super::pack::{BLOCK, BLOCK_BYTES};

#[inline]
#[target_feature(enable = "avx2")]
fn hsum(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b00_00_00_01));
    _mm_cvtsi128_si32(s)
}

/// The four code vectors of the block at `p`, each lined up with 32 consecutive activations (see
/// [`super::pack`]). `vpsrlw` shifts across byte boundaries, but the mask keeps only the two bits that came from
/// the same byte.
///
/// # Safety
/// 32 bytes must be readable at `p` (unaligned is fine).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack(p: *const u8) -> [__m256i; 4] {
    let mask = _mm256_set1_epi8(3);
    let v = unsafe { _mm256_loadu_si256(p as *const __m256i) };
    [
        _mm256_and_si256(v, mask),
        _mm256_and_si256(_mm256_srli_epi16(v, 2), mask),
        _mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
        _mm256_and_si256(_mm256_srli_epi16(v, 6), mask),
    ]
}

/// # Safety
/// AVX2 must be available; `w` holds `blocks` blocks and every `x` at least `blocks * BLOCK` values.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn ternary_dot_avx2<const M: usize>(
    w: &[u8],
    xs: [&[i8]; M],
    blocks: usize,
) -> [i32; M] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_si256(); M];
    for b in 0..blocks {
        // SAFETY: in bounds by the caller's contract.
        let codes = unsafe { unpack(w.as_ptr().add(b * BLOCK_BYTES)) };
        for m in 0..M {
            let xp = xs[m][b * BLOCK..].as_ptr();
            let mut s = _mm256_setzero_si256();
            for (i, c) in codes.iter().enumerate() {
                let x = unsafe { _mm256_loadu_si256(xp.add(32 * i) as *const __m256i) };
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(*c, x));
            }
            acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(s, ones));
        }
    }
    let mut out = [0i32; M];
    for m in 0..M {
        out[m] = hsum(acc[m]);
    }
    out
}

/// # Safety
/// AVX2 must be available; every `x` has `w.len()` values.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn int8_dot_avx2<const M: usize>(w: &[i8], xs: [&[i8]; M]) -> [i32; M] {
    let k = w.len();
    let full = k / 16 * 16;
    let mut acc = [_mm256_setzero_si256(); M];
    let mut i = 0;
    while i < full {
        // SAFETY: i + 16 <= k.
        let wv =
            unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(w.as_ptr().add(i) as *const __m128i)) };
        for m in 0..M {
            let xv = unsafe {
                _mm256_cvtepi8_epi16(_mm_loadu_si128(xs[m].as_ptr().add(i) as *const __m128i))
            };
            acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(wv, xv));
        }
        i += 16;
    }
    let mut out = [0i32; M];
    for m in 0..M {
        out[m] = hsum(acc[m])
            + w[full..]
                .iter()
                .zip(&xs[m][full..])
                .map(|(&a, &b)| a as i32 * b as i32)
                .sum::<i32>();
    }
    out
}

/// AVX-512 VNNI (256-bit form): `vpdpbusd` multiplies the unsigned codes by the signed activations and adds four
/// products into each i32 lane, so one instruction does what `vpmaddubsw` + `vpaddw` + `vpmaddwd` do above.
///
/// # Safety
/// `avx512vnni` and `avx512vl` must be available; as `ternary_dot_avx2` for the slices.
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
pub(super) unsafe fn ternary_dot_vnni<const M: usize>(
    w: &[u8],
    xs: [&[i8]; M],
    blocks: usize,
) -> [i32; M] {
    // One accumulator per code vector: `vpdpbusd` has a latency of several cycles, and a single chain per row
    // would serialize on it.
    let mut acc = [[_mm256_setzero_si256(); 4]; M];
    for b in 0..blocks {
        // SAFETY: in bounds by the caller's contract.
        let codes = unsafe { unpack(w.as_ptr().add(b * BLOCK_BYTES)) };
        for m in 0..M {
            let xp = xs[m][b * BLOCK..].as_ptr();
            for (i, c) in codes.iter().enumerate() {
                let x = unsafe { _mm256_loadu_si256(xp.add(32 * i) as *const __m256i) };
                acc[m][i] = _mm256_dpbusd_epi32(acc[m][i], *c, x);
            }
        }
    }
    let mut out = [0i32; M];
    for m in 0..M {
        let [a, b, c, d] = acc[m];
        out[m] = hsum(_mm256_add_epi32(
            _mm256_add_epi32(a, b),
            _mm256_add_epi32(c, d),
        ));
    }
    out
}

/// Two weight rows × `M` activation rows with 512-bit VNNI (prefill, which is compute-bound): a block's 32 code
/// bytes are broadcast to both halves of a register and shifted by 0 | 2 (and 4 | 6), so that one register holds
/// the codes of two planes, lined up with 64 consecutive activations; sixteen accumulators (2 rows × `M` tokens
/// × 2 plane pairs) keep more `vpdpbusd` in flight than their latency, and each activation vector is loaded
/// once for both rows. Measured against the 256-bit form on a Xeon (Emerald Rapids): prefill faster although
/// the core clocks down under 512-bit work; decode keeps its 256-bit kernel, which memory bounds anyway.
///
/// # Safety
/// As `ternary_dot_vnni`, for both rows; `avx512f` available.
#[target_feature(enable = "avx2,avx512f,avx512vnni,avx512vl")]
pub(super) unsafe fn ternary_dot2_vnni<const M: usize>(
    w: [&[u8]; 2],
    xs: [&[i8]; M],
    blocks: usize,
) -> [[i32; M]; 2] {
    let mask = _mm512_set1_epi8(3);
    // Per 32-bit lane: the low half (planes 0 and 2) shifted by 0 and 4, the high half (1 and 3) by 2 and 6.
    // A 32-bit shift moves bits across bytes, but the mask keeps only the two that came from the same byte.
    let (s01, s23) = (
        _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0),
        _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4),
    );
    let mut acc = [[[_mm512_setzero_si512(); 2]; M]; 2];
    for b in 0..blocks {
        // SAFETY: in bounds by the caller's contract (32 code bytes per block, BLOCK activations per block).
        let codes = w.map(|row| unsafe {
            let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                row.as_ptr().add(b * BLOCK_BYTES) as *const __m256i
            ));
            [
                _mm512_and_si512(_mm512_srlv_epi32(v, s01), mask),
                _mm512_and_si512(_mm512_srlv_epi32(v, s23), mask),
            ]
        });
        for m in 0..M {
            let xp = xs[m][b * BLOCK..].as_ptr();
            for half in 0..2 {
                let x = unsafe { _mm512_loadu_si512(xp.add(64 * half) as *const __m512i) };
                acc[0][m][half] = _mm512_dpbusd_epi32(acc[0][m][half], codes[0][half], x);
                acc[1][m][half] = _mm512_dpbusd_epi32(acc[1][m][half], codes[1][half], x);
            }
        }
    }
    acc.map(|row| row.map(|[a, b]| _mm512_reduce_add_epi32(_mm512_add_epi32(a, b))))
}

/// How far ahead of the block being read the single-row kernels fetch weights (bytes).
const PREFETCH: usize = 2048;

/// One activation row (decode) with VNNI: two blocks per iteration into eight accumulators, so that no chain of
/// `vpdpbusd` (several cycles of latency each) paces the loop; with a single row nothing else would hide that
/// latency, and the loop would fall short of the memory bandwidth it should be bound by.
///
/// # Safety
/// As `ternary_dot_vnni` for one row.
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
pub(super) unsafe fn ternary_dot1_vnni(w: &[u8], x: &[i8], blocks: usize) -> i32 {
    let mut acc = [[_mm256_setzero_si256(); 4]; 2];
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut b = 0;
    while b < blocks {
        // Rows lie one after another, and a chunk is a short run of them: fetching ahead from the first block
        // on keeps the loads in flight that the hardware prefetcher would only start after a few lines. Past
        // the row is the next row (or the next chunk's first; a prefetch never faults).
        _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(b * BLOCK_BYTES + PREFETCH) as *const i8);
        // The last, odd block goes to the first set alone.
        let pair = if b + 1 < blocks { 2 } else { 1 };
        for (h, set) in acc.iter_mut().enumerate().take(pair) {
            // SAFETY: block b + h exists (checked above), in bounds by the caller's contract.
            unsafe {
                let codes = unpack(wp.add((b + h) * BLOCK_BYTES));
                let xb = xp.add((b + h) * BLOCK);
                for (i, (a, c)) in set.iter_mut().zip(codes).enumerate() {
                    let xv = _mm256_loadu_si256(xb.add(32 * i) as *const __m256i);
                    *a = _mm256_dpbusd_epi32(*a, c, xv);
                }
            }
        }
        b += 2;
    }
    let [s0, s1] =
        acc.map(|[a, b, c, d]| _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)));
    hsum(_mm256_add_epi32(s0, s1))
}

/// The sum of an f32 vector's lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01)))
}

/// One int4 group at `g`: its two 32-byte weight vectors as four code vectors, each with the 32 activations it
/// multiplies: `(low nibbles of bytes 0..32, x[0..32])`, `(low of 32..64, x[32..64])`, `(high of 0..32,
/// x[64..96])`, `(high of 32..64, x[96..128])`.
///
/// # Safety
/// Group `g` must be in bounds of `w` and `x`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn int4_group(w: &[u8], x: &[i8], g: usize) -> [(__m256i, __m256i); 4] {
    let mask = _mm256_set1_epi8(0x0F);
    // SAFETY: in bounds by the caller's contract.
    let (b0, b1, xv) = unsafe {
        let wp = w.as_ptr().add(g * GROUP_BYTES) as *const __m256i;
        let xp = x.as_ptr().add(g * GROUP) as *const __m256i;
        (
            _mm256_loadu_si256(wp),
            _mm256_loadu_si256(wp.add(1)),
            [0, 1, 2, 3].map(|i| _mm256_loadu_si256(xp.add(i))),
        )
    };
    [
        (_mm256_and_si256(b0, mask), xv[0]),
        (_mm256_and_si256(b1, mask), xv[1]),
        (_mm256_and_si256(_mm256_srli_epi16(b0, 4), mask), xv[2]),
        (_mm256_and_si256(_mm256_srli_epi16(b1, 4), mask), xv[3]),
    ]
}

/// Int4 with `vpmaddubsw`, see the module docs and `super::Kernel::int4_dot`.
///
/// # Safety
/// `avx2` must be available; the slices as `super::Kernel::int4_dot` checks them.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn int4_dot_avx2(w: &[u8], scales: &[f32], x: &[i8], offsets: &[i32]) -> f32 {
    let ones = _mm256_set1_epi16(1);
    // Two accumulators: consecutive groups' additions do not wait on each other.
    let mut acc = [_mm256_setzero_ps(); 2];
    for (g, &scale) in scales.iter().enumerate() {
        // SAFETY: group g is in bounds.
        let c = unsafe { int4_group(w, x, g) };
        let p = c.map(|(w, x)| _mm256_maddubs_epi16(w, x));
        let p = _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3]));
        let off = _mm256_setr_epi32(offsets[g], 0, 0, 0, 0, 0, 0, 0);
        let s = _mm256_sub_epi32(_mm256_madd_epi16(p, ones), off);
        // A multiply and an add, not an FMA: the kernels' feature checks do not include `fma`.
        let y = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(scale));
        acc[g & 1] = _mm256_add_ps(acc[g & 1], y);
    }
    hsum_ps(_mm256_add_ps(acc[0], acc[1]))
}

/// Int4 with `vpdpbusd` (256-bit form), see the module docs and `super::Kernel::int4_dot`.
///
/// # Safety
/// `avx512vnni` and `avx512vl` must be available; the slices as for [`int4_dot_avx2`].
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
pub(super) unsafe fn int4_dot_vnni(w: &[u8], scales: &[f32], x: &[i8], offsets: &[i32]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 2];
    for (g, &scale) in scales.iter().enumerate() {
        // SAFETY: group g is in bounds.
        let c = unsafe { int4_group(w, x, g) };
        // Two chains per group, so that `vpdpbusd`'s latency is paid twice, not four times.
        let a = _mm256_setr_epi32(-offsets[g], 0, 0, 0, 0, 0, 0, 0);
        let a = _mm256_dpbusd_epi32(a, c[0].0, c[0].1);
        let b = _mm256_dpbusd_epi32(_mm256_setzero_si256(), c[1].0, c[1].1);
        let a = _mm256_dpbusd_epi32(a, c[2].0, c[2].1);
        let b = _mm256_dpbusd_epi32(b, c[3].0, c[3].1);
        let s = _mm256_add_epi32(a, b);
        let y = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(scale));
        acc[g & 1] = _mm256_add_ps(acc[g & 1], y);
    }
    hsum_ps(_mm256_add_ps(acc[0], acc[1]))
}

/// Nibble rows (`super::planes`) with `vpmaddubsw`: the four code vectors of a group summed in i16 (at most
/// 4·2·15·128 = 15360 per lane), widened once per group into one of two accumulators.
///
/// # Safety
/// `avx2` must be available; the slices as `super::Kernel::nibble_dot` checks them.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn nibble_dot_avx2(w: &[u8], x: &[i8]) -> i32 {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_si256(); 2];
    for g in 0..w.len() / GROUP_BYTES {
        _mm_prefetch::<_MM_HINT_T0>(
            w.as_ptr().wrapping_add(g * GROUP_BYTES + PREFETCH) as *const i8
        );
        // SAFETY: group g is in bounds.
        let c = unsafe { int4_group(w, x, g) };
        let p = c.map(|(w, x)| _mm256_maddubs_epi16(w, x));
        let p = _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3]));
        acc[g & 1] = _mm256_add_epi32(acc[g & 1], _mm256_madd_epi16(p, ones));
    }
    hsum(_mm256_add_epi32(acc[0], acc[1]))
}

/// Nibble rows with `vpdpbusd`: one accumulator per code vector, so that no chain of `vpdpbusd` paces the
/// stream (this kernel reads the screened output layer, the largest matrix of a decode step).
///
/// # Safety
/// `avx512vnni` and `avx512vl` must be available; the slices as for [`nibble_dot_avx2`].
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
pub(super) unsafe fn nibble_dot_vnni(w: &[u8], x: &[i8]) -> i32 {
    let mut acc = [_mm256_setzero_si256(); 4];
    for g in 0..w.len() / GROUP_BYTES {
        _mm_prefetch::<_MM_HINT_T0>(
            w.as_ptr().wrapping_add(g * GROUP_BYTES + PREFETCH) as *const i8
        );
        // SAFETY: group g is in bounds.
        let c = unsafe { int4_group(w, x, g) };
        for (a, (wv, xv)) in acc.iter_mut().zip(c) {
            *a = _mm256_dpbusd_epi32(*a, wv, xv);
        }
    }
    let [a, b, c, d] = acc;
    hsum(_mm256_add_epi32(
        _mm256_add_epi32(a, b),
        _mm256_add_epi32(c, d),
    ))
}
