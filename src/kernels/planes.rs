//! An int8 matrix held as two 4-bit planes, for the screened output layer (`engine::ops::screen`).
//!
//! Each int8 weight is `w = 16·h + l` with `h = w >> 4` (arithmetic, -8..=7) and `l = w & 15` (0..=15). The
//! high plane stores the nibbles `h + 8`, the low plane the nibbles `l`, each in the int4 layout of
//! [`super::int4`] without scales: groups of [`GROUP`] columns in [`GROUP_BYTES`] bytes, byte `j` of a group
//! holding column `j` in its low nibble and column `j + 64` in its high nibble. One kernel, [`Kernel::nibble_dot`]
//! (`Σ code · x` over unsigned nibbles), serves both planes, and
//!
//! ```text
//! Σ w·x = 16 · (nibble_dot(high, x) - 8·Σx) + nibble_dot(low, x)
//! ```
//!
//! is the int8 product, exactly. From the high plane alone, with the low nibbles replaced by their row mean
//! `m`, the product is approximated by `16 · (nibble_dot(high, x) - 8·Σx) + m·Σx`: the error is
//! `Σ x_j (l_j - m)`. The low nibbles of rounded weights behave as independent noise of the row's spread `s` (they
//! are the bits far below a weight's magnitude), so the error is sub-Gaussian with a standard deviation of
//! `s·‖x‖₂` ([`RowStats`]), which is what lets a screen on half the bytes find every row that can be the
//! largest (`candidates`).

use super::int4::{groups, padded, row_bytes, GROUP, GROUP_BYTES};
use super::Kernel;

/// The mean and standard deviation of a row's low nibbles, over its `k` real columns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowStats {
    pub mean: f32,
    pub sd: f32,
}

/// Bytes of one plane's row of `k` columns (the int4 row size: padded to whole groups).
pub fn plane_row_bytes(k: usize) -> usize {
    row_bytes(k)
}

/// Values of an activation row the nibble kernels read (`k` padded with zeros to whole groups).
pub fn padded_len(k: usize) -> usize {
    padded(k)
}

/// Splits int8 rows (`rows × k`, row-major) into their high and low planes (each `rows ×`
/// [`plane_row_bytes`]`(k)`), and returns each row's [`RowStats`].
///
/// Panics if a slice does not have the size the shape gives.
pub fn split(w: &[i8], k: usize, high: &mut [u8], low: &mut [u8]) -> Vec<RowStats> {
    let rb = row_bytes(k);
    let rows = w.len().checked_div(k).unwrap_or(0);
    assert!(w.len() == rows * k && high.len() == rows * rb && low.len() == rows * rb);
    let mut codes_h = vec![0u8; padded(k)];
    let mut codes_l = vec![0u8; padded(k)];
    let mut stats = Vec::with_capacity(rows);
    for r in 0..rows {
        let row = &w[r * k..(r + 1) * k];
        // Padding columns: weight 0, so high code 8 and low code 0 (their activations are zero anyway).
        codes_h.fill(8);
        codes_l.fill(0);
        let (mut sum, mut sum2) = (0u64, 0u64);
        for (j, &v) in row.iter().enumerate() {
            codes_h[j] = ((v >> 4) + 8) as u8;
            let l = (v & 15) as u8;
            codes_l[j] = l;
            sum += l as u64;
            sum2 += (l as u64) * (l as u64);
        }
        pack(&codes_h, &mut high[r * rb..(r + 1) * rb]);
        pack(&codes_l, &mut low[r * rb..(r + 1) * rb]);
        let n = k.max(1) as f64;
        let mean = sum as f64 / n;
        let var = (sum2 as f64 / n - mean * mean).max(0.0);
        stats.push(RowStats {
            mean: mean as f32,
            sd: var.sqrt() as f32,
        });
    }
    stats
}

/// Packs one row of nibble codes (whole groups) in the int4 layout.
fn pack(codes: &[u8], out: &mut [u8]) {
    for (g, (cg, og)) in codes
        .chunks_exact(GROUP)
        .zip(out.chunks_exact_mut(GROUP_BYTES))
        .enumerate()
    {
        debug_assert!(g < groups(codes.len()));
        for j in 0..GROUP_BYTES {
            og[j] = cg[j] | (cg[j + GROUP_BYTES] << 4);
        }
    }
}

/// The nibble at column `c` of a packed plane row (for tests and references).
pub fn nibble(row: &[u8], c: usize) -> u8 {
    let (g, j) = (c / GROUP, c % GROUP);
    let byte = row[g * GROUP_BYTES + j % GROUP_BYTES];
    if j < GROUP_BYTES {
        byte & 15
    } else {
        byte >> 4
    }
}

/// `Σ w·x` of an int8 row from the raw plane products and the activations' sum: see the module docs.
#[inline]
pub fn exact(high_dot: i32, low_dot: i32, xsum: i32) -> i32 {
    16 * (high_dot - 8 * xsum) + low_dot
}

/// The high plane's estimate of `Σ w·x`: [`exact`] with the low nibbles' dot replaced by `mean · Σx`.
#[inline]
pub fn estimate(high_dot: i32, xsum: i32, mean: f32) -> f32 {
    (16 * (high_dot - 8 * xsum)) as f32 + mean * xsum as f32
}

impl Kernel {
    /// `Σ_j code_j · x_j` of one packed plane row (unsigned nibbles, [`GROUP_BYTES`] bytes per group) against an
    /// activation row of `GROUP` values per group.
    ///
    /// Panics if the slices do not agree.
    ///
    /// # Safety
    /// The kernel must be supported by this CPU ([`Kernel::is_supported`]).
    #[inline]
    pub(crate) unsafe fn nibble_dot(self, w: &[u8], x: &[i8]) -> i32 {
        let g = w.len() / GROUP_BYTES;
        assert!(w.len() == g * GROUP_BYTES && x.len() == g * GROUP);
        match self {
            Kernel::Scalar => super::scalar::nibble_dot(w, x),
            // SAFETY: lengths checked above, CPU support is the caller's contract.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { super::x86::nibble_dot_avx2(w, x) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { super::x86::nibble_dot_vnni(w, x) },
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => unsafe { super::neon::nibble_dot(w, x) },
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => unsafe { super::neon::nibble_dot_sdot(w, x) },
            #[allow(unreachable_patterns)]
            _ => unreachable!("kernel {} is not built for this target", self.name()),
        }
    }
}

/// [`Kernel::nibble_dot`] for a kernel this CPU supports.
///
/// Panics if the kernel is not supported or the slices do not agree.
pub fn nibble_dot(kernel: Kernel, w: &[u8], x: &[i8]) -> i32 {
    assert!(
        kernel.is_supported(),
        "kernel {kernel} is not supported by this CPU"
    );
    // SAFETY: supported (asserted); lengths are checked inside.
    unsafe { kernel.nibble_dot(w, x) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn planes_give_the_int8_product_exactly_on_every_kernel() {
        let mut seed = 0x9E37_79B9_7F4A_7C15;
        for k in [1, 64, 127, 128, 200, 2560] {
            let rows = 5;
            let w: Vec<i8> = (0..rows * k).map(|_| rng(&mut seed) as i8).collect();
            let mut x = vec![0i8; padded_len(k)];
            for v in x.iter_mut().take(k) {
                *v = rng(&mut seed) as i8;
            }
            // The extremes: -128 weights and activations.
            x[0] = -128;
            let rb = plane_row_bytes(k);
            let (mut hi, mut lo) = (vec![0u8; rows * rb], vec![0u8; rows * rb]);
            let stats = split(&w, k, &mut hi, &mut lo);
            let xsum: i32 = x.iter().map(|&v| v as i32).sum();
            for r in 0..rows {
                let want: i32 = (0..k).map(|j| w[r * k + j] as i32 * x[j] as i32).sum();
                for kernel in Kernel::available() {
                    let h = nibble_dot(kernel, &hi[r * rb..(r + 1) * rb], &x);
                    let l = nibble_dot(kernel, &lo[r * rb..(r + 1) * rb], &x);
                    assert_eq!(exact(h, l, xsum), want, "{kernel} k={k} row {r}");
                }
                for j in 0..k {
                    let v = w[r * k + j] as i32;
                    let h = nibble(&hi[r * rb..], j) as i32 - 8;
                    let l = nibble(&lo[r * rb..], j) as i32;
                    assert_eq!(16 * h + l, v);
                }
                let mean = (0..k).map(|j| (w[r * k + j] & 15) as f64).sum::<f64>() / k as f64;
                assert!((stats[r].mean as f64 - mean).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn the_estimate_is_off_by_the_low_nibbles_noise() {
        let mut seed = 7;
        let k = 2560;
        let w: Vec<i8> = (0..k).map(|_| rng(&mut seed) as i8).collect();
        let x: Vec<i8> = (0..k).map(|_| (rng(&mut seed) % 61) as i8 - 30).collect();
        let rb = plane_row_bytes(k);
        let (mut hi, mut lo) = (vec![0u8; rb], vec![0u8; rb]);
        let s = split(&w, k, &mut hi, &mut lo)[0];
        let xsum: i32 = x.iter().map(|&v| v as i32).sum();
        let h = nibble_dot(Kernel::Scalar, &hi, &x);
        let l = nibble_dot(Kernel::Scalar, &lo, &x);
        let err = estimate(h, xsum, s.mean) - exact(h, l, xsum) as f32;
        let norm = x.iter().map(|&v| (v as f32).powi(2)).sum::<f32>().sqrt();
        // Uniform low nibbles: sd = sqrt((16² - 1) / 12) ≈ 4.6.
        assert!((s.sd - 4.61).abs() < 0.2, "sd {}", s.sd);
        assert!(
            err.abs() < 5.0 * s.sd * norm,
            "error {err} vs sigma {}",
            s.sd * norm
        );
    }
}
