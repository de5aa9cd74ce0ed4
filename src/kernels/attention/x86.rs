//! The x86_64 attention update: AVX2 + FMA + F16C.

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
            Rows::F16(v) => _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i)),
            Rows::I8 { q, .. } => _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                q.as_ptr().add(i) as *const __m128i,
            ))),
        }
    }
}

/// Asks for the cache line holding value `i` of `r` (a hint: it never faults, in bounds or not).
#[inline(always)]
fn prefetch(r: Rows<'_>, i: usize) {
    let p = match r {
        Rows::F32(v) => v.as_ptr().wrapping_add(i) as *const i8,
        Rows::F16(v) => v.as_ptr().wrapping_add(i) as *const i8,
        Rows::I8 { q, .. } => q.as_ptr().wrapping_add(i),
    };
    // SAFETY: a prefetch only hints the memory system; it does not fault or write.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
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
            let last = j + KEY_BLOCK >= n;
            let mut acc = [[_mm256_setzero_ps(); 2]; Q];
            for d in 0..hd {
                // The loads wait on memory, not on the FMAs: fetch the next key block (after the last one, the
                // first values) a block ahead, line by line as this one is read.
                if last {
                    prefetch(page.values, d * KEY_BLOCK);
                } else {
                    prefetch(page.keys, block + hd * KEY_BLOCK + d * KEY_BLOCK);
                }
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
        per_position(&mut scores, Q, n, page.keys);
        softmax_step(&mut scores, n, visible, states);
        per_position(&mut scores, Q, n, page.values);
        let most = visible.iter().copied().max().unwrap_or(0);
        for d0 in (0..hd).step_by(DIM_BLOCK) {
            let mut acc = [[_mm256_setzero_ps(); 2]; Q];
            for q in 0..Q {
                let a = states[q].acc.as_ptr().add(d0);
                acc[q] = [_mm256_loadu_ps(a), _mm256_loadu_ps(a.add(8))];
            }
            let block = d0 * stride;
            for j in 0..most {
                prefetch(page.values, block + DIM_BLOCK * stride + j * DIM_BLOCK);
                // Over the value passes, one line of the next page's keys per step: its first key blocks are
                // in the cache when its key pass starts, instead of waiting for the prefetchers to find them.
                if let Some(next) = page.next_keys {
                    let line = (d0 / DIM_BLOCK) * most + j;
                    let per_line = 64 / next.value_bytes();
                    if line * per_line < next.len() {
                        prefetch(next, line * per_line);
                    }
                }
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
