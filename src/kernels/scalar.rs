//! Portable kernels: the reference every other kernel is tested against, and the fallback (armv7, old x86).

use super::pack::{BLOCK, BLOCK_BYTES};

/// `dot(codes, x)` for `M` activation rows; see [`super::Kernel::ternary_dot`]. Each block is unpacked once into
/// activation order, then multiplied with plain loops the compiler vectorizes for whatever the target has.
pub(super) fn ternary_dot<const M: usize>(w: &[u8], xs: [&[i8]; M], blocks: usize) -> [i32; M] {
    let mut acc = [0i32; M];
    let mut codes = [0i8; BLOCK];
    for b in 0..blocks {
        let wb = &w[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
        for (j, &byte) in wb.iter().enumerate() {
            for i in 0..4 {
                codes[32 * i + j] = ((byte >> (2 * i)) & 3) as i8;
            }
        }
        for (m, x) in xs.iter().enumerate() {
            let xb = &x[b * BLOCK..(b + 1) * BLOCK];
            acc[m] += codes
                .iter()
                .zip(xb)
                .map(|(&c, &v)| c as i32 * v as i32)
                .sum::<i32>();
        }
    }
    acc
}

/// `dot(w, x)` for `M` activation rows of `w.len()` values.
pub(super) fn int8_dot<const M: usize>(w: &[i8], xs: [&[i8]; M]) -> [i32; M] {
    let mut acc = [0i32; M];
    for (m, x) in xs.iter().enumerate() {
        acc[m] = w
            .iter()
            .zip(x.iter())
            .map(|(&a, &b)| a as i32 * b as i32)
            .sum();
    }
    acc
}

/// `Σ_g scales[g] · Σ q · x` of one packed int4 row; see [`super::Kernel::int4_dot`].
pub(super) fn int4_dot(w: &[u8], scales: &[f32], x: &[i8]) -> f32 {
    use super::int4::{GROUP, GROUP_BYTES};
    let mut y = 0f32;
    for ((wg, xg), &s) in w
        .chunks_exact(GROUP_BYTES)
        .zip(x.chunks_exact(GROUP))
        .zip(scales)
    {
        let (lo, hi) = xg.split_at(GROUP_BYTES);
        let acc: i32 = wg
            .iter()
            .zip(lo.iter().zip(hi))
            .map(|(&b, (&a, &c))| {
                ((b & 15) as i32 - 8) * a as i32 + ((b >> 4) as i32 - 8) * c as i32
            })
            .sum();
        y += s * acc as f32;
    }
    y
}

/// `Σ code · x` of one packed nibble row; see [`super::Kernel::nibble_dot`].
pub(super) fn nibble_dot(w: &[u8], x: &[i8]) -> i32 {
    use super::int4::{GROUP, GROUP_BYTES};
    w.chunks_exact(GROUP_BYTES)
        .zip(x.chunks_exact(GROUP))
        .map(|(wg, xg)| {
            let (lo, hi) = xg.split_at(GROUP_BYTES);
            wg.iter()
                .zip(lo.iter().zip(hi))
                .map(|(&b, (&a, &c))| (b & 15) as i32 * a as i32 + (b >> 4) as i32 * c as i32)
                .sum::<i32>()
        })
        .sum()
}
