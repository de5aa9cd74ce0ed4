//! Activation prologues of the fused linears, op for op as the exported ONNX function bodies (and transformers)
//! compute them, one token row at a time:
//! - RMSNorm: `y = x / sqrt(mean(x²) + eps) * gamma`, rounded after each operation in that order;
//! - per-token absmax int8 quantization: `scale = 127 / max(max|y|, 1e-5)`, `q = clip(round_half_even(y * scale),
//!   -128, 127)`.
//!
//! Only the order of the sum in `mean(x²)` differs from a sequential loop (eight lanes, then pairwise), so a
//! result can differ from other runtimes by an ulp there; everything else is exact. The loops are written so the
//! compiler vectorizes them for the target.
//!
//! A quantized row is stored as [`QRowLayout`] describes: the int8 values padded with zeros to whole kernel
//! blocks, then the sum of the values (`i32`, which the ternary kernels need) and the scale (`f32`).

/// `1.5 · 2²³`: adding and subtracting it rounds an f32 of magnitude below 2²² to the nearest integer, ties to
/// even, in the default rounding mode (which Rust never changes).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Smallest absmax the quantization divides by (the graph's `Max(m, 1e-5)`).
pub const ABSMAX_FLOOR: f32 = 1e-5;

/// Where a quantized row keeps its values, sum and scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QRowLayout {
    /// Features.
    pub k: usize,
    /// Values stored (at least `k`, zero-padded).
    pub padded: usize,
}

impl QRowLayout {
    pub fn new(k: usize, padded: usize) -> QRowLayout {
        assert!(padded >= k, "padding {padded} below {k} features");
        QRowLayout { k, padded }
    }

    /// Bytes per row.
    pub fn stride(&self) -> usize {
        self.padded + 8
    }

    /// The values of a stored row.
    pub fn values<'a>(&self, row: &'a [i8]) -> &'a [i8] {
        &row[..self.padded]
    }

    /// The sum of a stored row's values.
    pub fn sum(&self, row: &[i8]) -> i32 {
        i32::from_le_bytes(bytes(&row[self.padded..self.padded + 4]))
    }

    /// The scale a stored row was quantized with.
    pub fn scale(&self, row: &[i8]) -> f32 {
        f32::from_le_bytes(bytes(&row[self.padded + 4..self.padded + 8]))
    }
}

fn bytes(v: &[i8]) -> [u8; 4] {
    [v[0] as u8, v[1] as u8, v[2] as u8, v[3] as u8]
}

/// `Σ x²`, eight lanes then pairwise.
#[inline]
pub fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for v in rest {
        s += v * v;
    }
    s
}

/// RMSNorm of one row into `y`.
#[inline]
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, y: &mut [f32]) {
    assert!(x.len() == gamma.len() && x.len() == y.len());
    let rms = (sum_squares(x) / x.len() as f32 + eps).sqrt();
    for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
        *y = x / rms * g;
    }
}

/// `max |y|`.
#[inline]
pub fn absmax(y: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = y.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            let a = c[i].abs();
            acc[i] = if a > acc[i] { a } else { acc[i] };
        }
    }
    acc.iter()
        .chain(rest.iter())
        .fold(0f32, |m, &v| m.max(v.abs()))
}

/// Round half to even for `|v| < 2²²`.
#[inline(always)]
pub fn round_half_even(v: f32) -> f32 {
    (v + ROUND_MAGIC) - ROUND_MAGIC
}

/// Quantizes `y` into `row` (`layout.stride()` bytes): values, zero padding, sum and scale.
#[inline]
pub fn quantize_into(y: &[f32], layout: QRowLayout, row: &mut [i8]) {
    assert_eq!(y.len(), layout.k);
    assert_eq!(row.len(), layout.stride());
    let scale = 127.0 / absmax(y).max(ABSMAX_FLOOR);
    let (values, tail) = row.split_at_mut(layout.padded);
    for (q, &v) in values.iter_mut().zip(y) {
        *q = round_half_even(v * scale).clamp(-128.0, 127.0) as i8;
    }
    values[layout.k..].fill(0);
    let sum: i32 = values.iter().map(|&q| q as i32).sum();
    for (d, s) in tail
        .iter_mut()
        .zip(sum.to_le_bytes().into_iter().chain(scale.to_le_bytes()))
    {
        *d = s as i8;
    }
}

/// RMSNorm (when `gamma` is given) then quantization of one row, with `scratch` of `x.len()` values.
pub fn norm_quantize(
    x: &[f32],
    gamma: Option<&[f32]>,
    eps: f32,
    scratch: &mut [f32],
    layout: QRowLayout,
    row: &mut [i8],
) {
    match gamma {
        Some(g) => {
            rms_norm(x, g, eps, scratch);
            quantize_into(scratch, layout, row);
        }
        None => quantize_into(x, layout, row),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_to_even_like_onnx_round() {
        for v in [
            -128.5f32, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, 127.4, 3.49999, -7.50001,
        ] {
            assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
        }
        let mut x = -130.0f32;
        while x < 130.0 {
            assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
            x += 0.013;
        }
    }

    #[test]
    fn quantized_rows_keep_values_padding_sum_and_scale() {
        let y: Vec<f32> = (0..13).map(|i| (i as f32 - 6.0) * 0.37).collect();
        let layout = QRowLayout::new(13, 16);
        let mut row = vec![99i8; layout.stride()];
        quantize_into(&y, layout, &mut row);
        let scale = 127.0 / (6.0f32 * 0.37);
        assert_eq!(layout.scale(&row), scale);
        let want: Vec<i8> = y
            .iter()
            .map(|v| (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8)
            .collect();
        assert_eq!(&layout.values(&row)[..13], &want[..]);
        assert_eq!(&layout.values(&row)[13..], &[0, 0, 0]);
        assert_eq!(
            layout.sum(&row),
            want.iter().map(|&q| q as i32).sum::<i32>()
        );
        assert_eq!(want[0], -127);
        assert_eq!(want[12], 127);
    }

    #[test]
    fn an_all_zero_row_quantizes_to_zero_with_the_floor_scale() {
        let layout = QRowLayout::new(8, 8);
        let mut row = vec![1i8; layout.stride()];
        quantize_into(&[0.0; 8], layout, &mut row);
        assert!(layout.values(&row).iter().all(|&q| q == 0));
        assert_eq!(layout.scale(&row), 127.0 / ABSMAX_FLOOR);
    }

    #[test]
    fn rms_norm_matches_the_sequential_definition() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 / 17.0 - 3.0)
            .collect();
        let g: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 / 100.0).collect();
        let mut y = vec![0f32; 37];
        rms_norm(&x, &g, 1e-5, &mut y);
        let mean: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / 37.0;
        let rms = (mean + 1e-5).sqrt();
        for i in 0..37 {
            let want = (x[i] as f64 / rms * g[i] as f64) as f32;
            assert!((y[i] - want).abs() <= 2e-6 * want.abs().max(1.0), "{i}");
        }
    }
}
