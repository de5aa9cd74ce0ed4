//! The x86_64 attention path: scores over f32 and f16 keys and the weighted sum of the values with AVX2 + FMA +
//! F16C; scores over int8 keys with `vpdpbusd` (AVX-512 VNNI on 256-bit vectors) or, without VNNI, `vpmaddwd`.
//! Each format gets loops of its own ([`Lanes`]), so nothing inside them branches on it.

use std::arch::x86_64::*;

use super::*;

/// Stored values that load as eight f32 lanes.
trait Lanes: Copy {
    /// Bytes per value.
    const BYTES: usize;

    fn ptr(self) -> *const i8;

    /// # Safety
    /// Eight values readable at `i`; AVX2 and F16C available.
    unsafe fn load8(self, i: usize) -> __m256;
}

impl Lanes for &[f32] {
    const BYTES: usize = 4;

    fn ptr(self) -> *const i8 {
        self.as_ptr().cast()
    }

    #[inline(always)]
    unsafe fn load8(self, i: usize) -> __m256 {
        unsafe { _mm256_loadu_ps(self.as_ptr().add(i)) }
    }
}

impl Lanes for &[u16] {
    const BYTES: usize = 2;

    fn ptr(self) -> *const i8 {
        self.as_ptr().cast()
    }

    #[inline(always)]
    unsafe fn load8(self, i: usize) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(self.as_ptr().add(i).cast())) }
    }
}

impl Lanes for &[i8] {
    const BYTES: usize = 1;

    fn ptr(self) -> *const i8 {
        self.as_ptr()
    }

    #[inline(always)]
    unsafe fn load8(self, i: usize) -> __m256 {
        unsafe {
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                self.as_ptr().add(i).cast(),
            )))
        }
    }
}

/// Asks for the cache line holding `p` (a hint: it never faults, in bounds or not).
#[inline(always)]
fn prefetch(p: *const i8) {
    // SAFETY: a prefetch only hints the memory system; it does not fault or write.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p) };
}

/// Runs `$tile::<Q, $generics>($args)` for the number of queries `$q`.
macro_rules! by_queries {
    ($q:expr, $tile:ident [$($g:tt)*], $($args:expr),*) => {
        match $q {
            1 => $tile::<1, $($g)*>($($args),*),
            2 => $tile::<2, $($g)*>($($args),*),
            3 => $tile::<3, $($g)*>($($args),*),
            _ => $tile::<4, $($g)*>($($args),*),
        }
    };
}

/// Where the reads after key block `j` go: the next key block (`block` + one block of `block_bytes`), or after
/// the last one the page's values.
#[inline(always)]
fn ahead(page: &Page<'_>, j: usize, block: *const i8, block_bytes: usize) -> *const i8 {
    if j + KEY_BLOCK < page.n {
        block.wrapping_add(block_bytes)
    } else {
        page.values.bytes().0
    }
}

/// The update on this path, with `vpdpbusd` for int8 keys when `vnni`.
///
/// # Safety
/// AVX2, FMA and F16C available (and AVX-512 VNNI and VL when `vnni`); the bounds `super::update` asserts.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn update(
    vnni: bool,
    queries: &[Query<'_>],
    visible: &[usize],
    page: &Page<'_>,
    states: &mut [Softmax],
) {
    let mut scores: Scores = [[0f32; MAX_KEYS]; QUERY_TILE];
    unsafe {
        match (page.keys, vnni) {
            (Rows::I8 { .. }, true) => scores_i8_vnni(queries, page, &mut scores),
            (Rows::I8 { .. }, false) => scores_i8_avx2(queries, page, &mut scores),
            _ => scores_float(queries, page, &mut scores),
        }
        between(&mut scores, visible, page, states);
        accumulate(&scores, visible, page, states);
    }
}

/// Scores over f32 or f16 keys.
///
/// # Safety
/// AVX2, FMA and F16C available; the bounds `super::update` asserts; keys not int8.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scores_float(queries: &[Query<'_>], page: &Page<'_>, out: &mut Scores) {
    unsafe {
        match page.keys {
            Rows::F32(k) => by_queries!(queries.len(), float_tile[&[f32]], queries, page, k, out),
            Rows::F16(k) => by_queries!(queries.len(), float_tile[&[u16]], queries, page, k, out),
            Rows::I8 { .. } => unreachable!("int8 keys take the integer paths"),
        }
    }
}

#[inline(always)]
unsafe fn float_tile<const Q: usize, L: Lanes>(
    queries: &[Query<'_>],
    page: &Page<'_>,
    keys: L,
    out: &mut Scores,
) {
    let (n, hd) = (page.n, page.head_dim);
    let q: [*const f32; Q] = std::array::from_fn(|i| queries[i].values.as_ptr());
    unsafe {
        let scale = _mm256_set1_ps(page.scale);
        for j in (0..n).step_by(KEY_BLOCK) {
            let block = j * hd;
            let bytes = hd * KEY_BLOCK * L::BYTES;
            // The loads wait on memory, not on the FMAs: fetch what comes next a block ahead, line by line as
            // this block is read.
            let next = ahead(page, j, keys.ptr().wrapping_add(block * L::BYTES), bytes);
            let mut acc = [[_mm256_setzero_ps(); 2]; Q];
            for d in 0..hd {
                let at = d * KEY_BLOCK * L::BYTES;
                if at.is_multiple_of(64) {
                    prefetch(next.wrapping_add(at));
                }
                let k0 = keys.load8(block + d * KEY_BLOCK);
                let k1 = keys.load8(block + d * KEY_BLOCK + 8);
                for i in 0..Q {
                    let b = _mm256_set1_ps(*q[i].add(d));
                    acc[i][0] = _mm256_fmadd_ps(b, k0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(b, k1, acc[i][1]);
                }
            }
            for i in 0..Q {
                let s = out[i].as_mut_ptr().add(j);
                _mm256_storeu_ps(s, _mm256_mul_ps(acc[i][0], scale));
                _mm256_storeu_ps(s.add(8), _mm256_mul_ps(acc[i][1], scale));
            }
        }
    }
}

/// Scores over int8 keys with `vpdpbusd`, which multiplies unsigned bytes by signed ones: the keys are read
/// offset by 128 (`k ^ 0x80`) and `128 · Σ codes` is taken back off each query's sums.
///
/// # Safety
/// AVX2, AVX-512 VNNI and VL available; the bounds `super::update` asserts; int8 keys and quantized queries.
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
pub(super) unsafe fn scores_i8_vnni(queries: &[Query<'_>], page: &Page<'_>, out: &mut Scores) {
    let Rows::I8 { q: keys, .. } = page.keys else {
        unreachable!("float keys take the float path")
    };
    unsafe { by_queries!(queries.len(), vnni_tile [], queries, page, keys, out) }
}

#[inline(always)]
#[allow(clippy::needless_range_loop)] // the indices name registers: query, parity or half, group
unsafe fn vnni_tile<const Q: usize>(
    queries: &[Query<'_>],
    page: &Page<'_>,
    keys: &[i8],
    out: &mut Scores,
) {
    let (n, hd) = (page.n, page.head_dim);
    let groups = hd / KEY_GROUP;
    let codes: [*const i8; Q] = std::array::from_fn(|i| queries[i].codes.as_ptr());
    unsafe {
        let flip = _mm256_set1_epi8(i8::MIN);
        for j in (0..n).step_by(KEY_BLOCK) {
            let block = keys.as_ptr().add(j * hd);
            let next = ahead(page, j, block, hd * KEY_BLOCK);
            // Even and odd groups sum apart: two chains per query and half-block hide `vpdpbusd`'s latency.
            let mut acc = [[[_mm256_setzero_si256(); 2]; 2]; Q];
            for g in (0..groups).step_by(2) {
                for p in 0..2 {
                    let at = (g + p) * KEY_GROUP * KEY_BLOCK;
                    prefetch(next.wrapping_add(at));
                    let k0 = _mm256_xor_si256(_mm256_loadu_si256(block.add(at).cast()), flip);
                    let k1 = _mm256_xor_si256(_mm256_loadu_si256(block.add(at + 32).cast()), flip);
                    for i in 0..Q {
                        let word = codes[i]
                            .add((g + p) * KEY_GROUP)
                            .cast::<i32>()
                            .read_unaligned();
                        let b = _mm256_set1_epi32(word);
                        acc[i][p][0] = _mm256_dpbusd_epi32(acc[i][p][0], k0, b);
                        acc[i][p][1] = _mm256_dpbusd_epi32(acc[i][p][1], k1, b);
                    }
                }
            }
            for i in 0..Q {
                let offset = _mm256_set1_epi32(128 * queries[i].sum);
                let f = _mm256_set1_ps(page.scale * queries[i].scale);
                let s = out[i].as_mut_ptr().add(j);
                for h in 0..2 {
                    let dot = _mm256_add_epi32(acc[i][0][h], acc[i][1][h]);
                    let dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot, offset));
                    _mm256_storeu_ps(s.add(8 * h), _mm256_mul_ps(dot, f));
                }
            }
        }
    }
}

/// Scores over int8 keys with `vpmaddwd`: four keys' groups widened to i16 against a query's group (four i16,
/// repeated), giving sums of pairs of dimensions that one `vphaddd` per eight keys completes.
///
/// # Safety
/// AVX2 available; the bounds `super::update` asserts; int8 keys and quantized queries; `head_dim` at most
/// [`MAX_SIMD_HEAD_DIM`].
#[target_feature(enable = "avx2")]
pub(super) unsafe fn scores_i8_avx2(queries: &[Query<'_>], page: &Page<'_>, out: &mut Scores) {
    let Rows::I8 { q: keys, .. } = page.keys else {
        unreachable!("float keys take the float path")
    };
    unsafe { by_queries!(queries.len(), avx2_tile [], queries, page, keys, out) }
}

#[inline(always)]
#[allow(clippy::needless_range_loop)] // the indices name registers: query, parity or half, group
unsafe fn avx2_tile<const Q: usize>(
    queries: &[Query<'_>],
    page: &Page<'_>,
    keys: &[i8],
    out: &mut Scores,
) {
    let (n, hd) = (page.n, page.head_dim);
    let groups = hd / KEY_GROUP;
    let mut words = [[0i64; MAX_SIMD_HEAD_DIM / KEY_GROUP]; Q];
    for (w, q) in words.iter_mut().zip(queries) {
        for (word, c) in w.iter_mut().zip(q.codes.chunks_exact(KEY_GROUP)) {
            *word = c
                .iter()
                .rev()
                .fold(0i64, |acc, &x| (acc << 16) | (x as i16 as u16 as i64));
        }
    }
    unsafe {
        for j in (0..n).step_by(KEY_BLOCK) {
            let block = keys.as_ptr().add(j * hd);
            let next = ahead(page, j, block, hd * KEY_BLOCK);
            for h in 0..2 {
                // Keys 8h..8h+4 and 8h+4..8h+8 of the block.
                let mut acc = [[_mm256_setzero_si256(); 2]; Q];
                for g in 0..groups {
                    let at = g * KEY_GROUP * KEY_BLOCK;
                    if h == 0 {
                        prefetch(next.wrapping_add(at));
                    }
                    let k0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(block.add(at + 32 * h).cast()));
                    let k1 =
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(block.add(at + 32 * h + 16).cast()));
                    for i in 0..Q {
                        let b = _mm256_set1_epi64x(words[i][g]);
                        acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(k0, b));
                        acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(k1, b));
                    }
                }
                for i in 0..Q {
                    // `vphaddd` gives keys 0, 1, 4, 5 | 2, 3, 6, 7; the permutation puts them in order.
                    let dot = _mm256_hadd_epi32(acc[i][0], acc[i][1]);
                    let dot = _mm256_cvtepi32_ps(_mm256_permute4x64_epi64::<0xD8>(dot));
                    let f = _mm256_set1_ps(page.scale * queries[i].scale);
                    _mm256_storeu_ps(out[i].as_mut_ptr().add(j + 8 * h), _mm256_mul_ps(dot, f));
                }
            }
        }
    }
}

/// Adds each query's weighted values (`weights[i][j]` for value `j`) to its state's accumulators.
///
/// # Safety
/// AVX2, FMA and F16C available; the bounds `super::update` asserts.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate(weights: &Scores, visible: &[usize], page: &Page<'_>, states: &mut [Softmax]) {
    let most = visible.iter().copied().max().unwrap_or(0);
    let q = states.len();
    unsafe {
        match page.values {
            Rows::F32(v) => by_queries!(q, value_tile[&[f32]], weights, most, page, v, states),
            Rows::F16(v) => by_queries!(q, value_tile[&[u16]], weights, most, page, v, states),
            Rows::I8 { q: v, .. } => {
                by_queries!(q, value_tile[&[i8]], weights, most, page, v, states)
            }
        }
    }
}

#[inline(always)]
unsafe fn value_tile<const Q: usize, L: Lanes>(
    weights: &Scores,
    most: usize,
    page: &Page<'_>,
    values: L,
    states: &mut [Softmax],
) {
    let (hd, stride) = (page.head_dim, page.stride);
    // Positions per cache line of a value block.
    let per_line = (64 / (DIM_BLOCK * L::BYTES)).max(1);
    let mut ahead = ValuePrefetch::new(page);
    unsafe {
        for d0 in (0..hd).step_by(DIM_BLOCK) {
            let mut acc = [[_mm256_setzero_ps(); 2]; Q];
            for (a, st) in acc.iter_mut().zip(states.iter()) {
                let p = st.acc.as_ptr().add(d0);
                *a = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
            }
            let block = d0 * stride;
            let next = values
                .ptr()
                .wrapping_add((block + DIM_BLOCK * stride) * L::BYTES);
            let mut j = 0;
            while j < most {
                ahead.line(next.wrapping_add(j * DIM_BLOCK * L::BYTES));
                for j in j..(j + per_line).min(most) {
                    let v0 = values.load8(block + j * DIM_BLOCK);
                    let v1 = values.load8(block + j * DIM_BLOCK + 8);
                    for i in 0..Q {
                        let p = _mm256_set1_ps(*weights[i].get_unchecked(j));
                        acc[i][0] = _mm256_fmadd_ps(p, v0, acc[i][0]);
                        acc[i][1] = _mm256_fmadd_ps(p, v1, acc[i][1]);
                    }
                }
                j += per_line;
            }
            for (a, st) in acc.iter().zip(states.iter_mut()) {
                let p = st.acc.as_mut_ptr().add(d0);
                _mm256_storeu_ps(p, a[0]);
                _mm256_storeu_ps(p.add(8), a[1]);
            }
        }
    }
}

/// Prefetches for a pass over values: one line of the next value block per `per_line` steps, and one line of the
/// next page's keys with each (so that its first key blocks are in the cache when its key pass starts, instead
/// of waiting for the prefetchers to find them).
struct ValuePrefetch {
    next_keys: *const i8,
    end: *const i8,
}

impl ValuePrefetch {
    fn new(page: &Page<'_>) -> ValuePrefetch {
        let (next_keys, bytes) = page.next_keys.map_or((std::ptr::null(), 0), |k| k.bytes());
        ValuePrefetch {
            next_keys,
            end: next_keys.wrapping_add(bytes),
        }
    }

    #[inline(always)]
    fn line(&mut self, values: *const i8) {
        prefetch(values);
        if self.next_keys < self.end {
            prefetch(self.next_keys);
            self.next_keys = self.next_keys.wrapping_add(64);
        }
    }
}
