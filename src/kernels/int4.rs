//! 4-bit grouped weights (the optional `--head int4` output layer): int8 activations against signed 4-bit
//! weights in groups of [`GROUP`] columns, each group with its own f32 scale.
//!
//! Layout of one row of `k` columns: `groups(k)` groups of [`GROUP_BYTES`] bytes (the row is padded with zero
//! weights to whole groups). Byte `j` of a group holds column `j` in its low nibble and column `j + 64` in its
//! high nibble, each as `q + 8` for a weight `q` in `-8..=7`: a 16-, 32- or 64-byte load then gives, after one
//! mask and one shift, two vectors lined up with two consecutive runs of activations, on every target.
//!
//! The product of a row is `Σ_g scale[g] · Σ_{j ∈ g} q_j · x_j`. The SIMD kernels sum each group exactly in i32
//! lanes and scale the lanes in f32 before adding them (no horizontal sum per group), so they agree with the
//! scalar kernel to f32 rounding of `Σ_g scale[g] · Σ_{j ∈ g} (|q_j| + 8) · |x_j|`. Kernels that multiply the
//! unsigned codes (`vpmaddubsw`, `vpdpbusd`) subtract `8 · Σ_{j ∈ g} x_j` per group, which the caller computes
//! once per activation row ([`offsets`]).

use std::ops::Range;

use super::{scalar, Kernel};

/// Columns per scale group.
pub const GROUP: usize = 128;
/// Packed bytes per group.
pub const GROUP_BYTES: usize = GROUP / 2;
/// The code offset: a stored nibble is `q + OFFSET`.
const OFFSET: i32 = 8;

/// Groups of a row of `k` columns.
pub fn groups(k: usize) -> usize {
    k.div_ceil(GROUP)
}

/// Columns of a row of `k` padded to whole groups (the activation row's length).
pub fn padded(k: usize) -> usize {
    groups(k) * GROUP
}

/// Packed bytes of a row of `k` columns.
pub fn row_bytes(k: usize) -> usize {
    groups(k) * GROUP_BYTES
}

/// Quantizes one row of weights: appends its packed bytes to `packed` and its group scales to `scales`.
///
/// Each group's scale is the one, among `max|w| / d` for `d` from 7 to 8, that minimizes the group's squared
/// rounding error (so no weight moves by more than one scale); a group of zeros gets scale 1.
pub fn quantize_row(row: &[f32], packed: &mut Vec<u8>, scales: &mut Vec<f32>) {
    let k = row.len();
    let mut q = [0i8; GROUP];
    for g in 0..groups(k) {
        let vals = &row[g * GROUP..((g + 1) * GROUP).min(k)];
        let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if amax > 0.0 {
            // Divisors from 7 (the largest weight lands on ±7) to 8 (it lands on -8, or clips to 7).
            (0..5)
                .map(|i| amax / (7.0 + 0.25 * i as f32))
                .map(|s| {
                    (
                        s,
                        vals.iter()
                            .map(|&v| (v - s * level(v, s)).powi(2))
                            .sum::<f32>(),
                    )
                })
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(s, _)| s)
                .expect("candidates")
        } else {
            1.0
        };
        scales.push(scale);
        q.fill(0);
        for (d, &v) in q.iter_mut().zip(vals) {
            *d = level(v, scale) as i8;
        }
        pack_group(&q, packed);
    }
}

/// Appends one group of levels (`-8..=7`, [`GROUP`] of them) in the packed layout.
///
/// Panics if `q` is not one group.
pub fn pack_group(q: &[i8], packed: &mut Vec<u8>) {
    assert_eq!(q.len(), GROUP);
    debug_assert!(q.iter().all(|&v| (-8..=7).contains(&v)));
    packed.extend((0..GROUP_BYTES).map(|j| {
        let lo = (q[j] as i32 + OFFSET) as u8;
        let hi = (q[j + GROUP_BYTES] as i32 + OFFSET) as u8;
        lo | (hi << 4)
    }));
}

/// The 4-bit level of `v` at `scale`.
fn level(v: f32, scale: f32) -> f32 {
    (v / scale).round().clamp(-8.0, 7.0)
}

/// The signed weight of column `c` of a packed row (for tests and references).
pub fn weight(row: &[u8], c: usize) -> i8 {
    let (g, j) = (c / GROUP, c % GROUP);
    let byte = row[g * GROUP_BYTES + j % GROUP_BYTES];
    let code = if j < GROUP_BYTES {
        byte & 15
    } else {
        byte >> 4
    };
    (code as i32 - OFFSET) as i8
}

/// `OFFSET · Σ x` per group of an activation row padded to whole groups: what the unsigned-code kernels
/// subtract.
pub fn offsets(x: &[i8]) -> Vec<i32> {
    x.chunks(GROUP)
        .map(|g| OFFSET * g.iter().map(|&v| v as i32).sum::<i32>())
        .collect()
}

/// `put(row, i, Σ_g scale[row, g] · Σ_{j ∈ g} w[row, j] · xs[i][j])` for every row in `rows` and activation row
/// `i`, for int4 weights of `k` columns (`w`: rows of [`row_bytes`]`(k)`, `scales`: rows of [`groups`]`(k)`).
/// Each `xs[i]` is padded with zeros to [`padded`]`(k)` values.
///
/// Panics if the kernel is not supported by this CPU or a slice is too short.
pub fn int4_rows(
    kernel: Kernel,
    w: &[u8],
    scales: &[f32],
    k: usize,
    rows: Range<usize>,
    xs: &[&[i8]],
    mut put: impl FnMut(usize, usize, f32),
) {
    assert!(
        kernel.is_supported(),
        "kernel {kernel} is not supported by this CPU"
    );
    let (rb, ng) = (row_bytes(k), groups(k));
    assert!(rows.end * rb <= w.len() && rows.end * ng <= scales.len());
    assert!(xs.iter().all(|x| x.len() >= padded(k)));
    let offs: Vec<Vec<i32>> = xs.iter().map(|x| offsets(&x[..padded(k)])).collect();
    for row in rows {
        let (wr, sr) = (
            &w[row * rb..(row + 1) * rb],
            &scales[row * ng..(row + 1) * ng],
        );
        for (i, x) in xs.iter().enumerate() {
            // SAFETY: the kernel is supported and the lengths are checked above.
            put(row, i, unsafe {
                kernel.int4_dot(wr, sr, &x[..padded(k)], &offs[i])
            });
        }
    }
}

impl Kernel {
    /// `Σ_g scales[g] · Σ_{j ∈ g} q_j · x_j` of one packed int4 row (`scales.len()` groups) against one activation
    /// row padded to whole groups; `offsets` is [`offsets`]`(x)`.
    ///
    /// Panics if the slices do not agree.
    ///
    /// # Safety
    /// The kernel must be supported by this CPU ([`Kernel::is_supported`]).
    #[inline]
    pub(crate) unsafe fn int4_dot(
        self,
        w: &[u8],
        scales: &[f32],
        x: &[i8],
        offsets: &[i32],
    ) -> f32 {
        let g = scales.len();
        assert!(w.len() == g * GROUP_BYTES && x.len() == g * GROUP && offsets.len() == g);
        match self {
            Kernel::Scalar => scalar::int4_dot(w, scales, x),
            // SAFETY: lengths checked above, CPU support is the caller's contract.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { super::x86::int4_dot_avx2(w, scales, x, offsets) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { super::x86::int4_dot_vnni(w, scales, x, offsets) },
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => unsafe { super::neon::int4_dot(w, scales, x) },
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => unsafe { super::neon::int4_dot_sdot(w, scales, x) },
            #[allow(unreachable_patterns)]
            _ => unreachable!("kernel {} is not built for this target", self.name()),
        }
    }
}
