//! Portable kernels: the reference every other kernel is tested against, and the fallback (armv7, old x86).

use super::pack::{BLOCK, BLOCK_BYTES};

/// `dot(codes, x)` for `M` activation rows; see [`super::Kernel::ternary_dot`].
pub(super) fn ternary_dot<const M: usize>(w: &[u8], xs: [&[i8]; M], blocks: usize) -> [i32; M] {
    let mut acc = [0i32; M];
    for b in 0..blocks {
        let wb = &w[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
        for (m, x) in xs.iter().enumerate() {
            let xb = &x[b * BLOCK..(b + 1) * BLOCK];
            let mut s = 0i32;
            for (j, &byte) in wb.iter().enumerate() {
                for i in 0..4 {
                    let code = ((byte >> (2 * i)) & 3) as i32;
                    s += code * xb[32 * i + j] as i32;
                }
            }
            acc[m] += s;
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
