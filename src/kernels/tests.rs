//! Every kernel this CPU runs against a plain `i32` reference computed from unpacked values, on random and edge
//! shapes and values. Run under qemu for aarch64 (see `.ci/run`), with and without `dotprod`.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::pack::{self, TernaryWeights};
use super::*;

/// `x · wᵀ` with plain integers: the reference.
fn reference(w: &[i8], n: usize, k: usize, x: &[i8], m: usize) -> Vec<i32> {
    let mut out = vec![0i32; m * n];
    for r in 0..m {
        for c in 0..n {
            out[r * n + c] = (0..k)
                .map(|i| x[r * k + i] as i32 * w[c * k + i] as i32)
                .sum();
        }
    }
    out
}

#[derive(Clone, Copy, Debug)]
enum Fill {
    Random,
    Zero,
    Max,
    /// `-hi`: -127 for activations, the most negative value the quantizer produces.
    NegMax,
    Min,
    Alternating,
}

fn values(rng: &mut SmallRng, len: usize, fill: Fill, lo: i8, hi: i8) -> Vec<i8> {
    (0..len)
        .map(|i| match fill {
            Fill::Random => rng.random_range(lo..=hi),
            Fill::Zero => 0,
            Fill::Max => hi,
            Fill::NegMax => -hi,
            Fill::Min => lo,
            Fill::Alternating => {
                if i % 2 == 0 {
                    lo
                } else {
                    hi
                }
            }
        })
        .collect()
}

const KS: [usize; 10] = [1, 5, 31, 127, 128, 129, 255, 256, 300, 2560];
const NS: [usize; 6] = [1, 2, 3, 33, 65, 130];
const MS: [usize; 6] = [1, 2, 3, 4, 5, 9];
const FILLS: [Fill; 6] = [
    Fill::Random,
    Fill::Zero,
    Fill::Max,
    Fill::NegMax,
    Fill::Min,
    Fill::Alternating,
];

fn check_ternary(
    kernel: Kernel,
    rng: &mut SmallRng,
    n: usize,
    k: usize,
    m: usize,
    wf: Fill,
    xf: Fill,
) {
    let w = values(rng, n * k, wf, -1, 1);
    let x = values(rng, m * k, xf, i8::MIN, i8::MAX);
    let packed = pack::pack(&w, n, k).unwrap();
    let tw = TernaryWeights::new(&packed, n, k).unwrap();
    let mut out = vec![0i32; m * n];
    ternary_matmul(kernel, tw, &x, m, &mut out).unwrap();
    assert_eq!(
        out,
        reference(&w, n, k, &x, m),
        "{kernel}: ternary n={n} k={k} m={m} weights {wf:?} activations {xf:?}"
    );
}

fn check_int8(
    kernel: Kernel,
    rng: &mut SmallRng,
    n: usize,
    k: usize,
    m: usize,
    wf: Fill,
    xf: Fill,
) {
    let w = values(rng, n * k, wf, i8::MIN, i8::MAX);
    let x = values(rng, m * k, xf, i8::MIN, i8::MAX);
    let mut out = vec![0i32; m * n];
    int8_matmul(kernel, &w, n, k, &x, m, &mut out).unwrap();
    assert_eq!(
        out,
        reference(&w, n, k, &x, m),
        "{kernel}: int8 n={n} k={k} m={m} weights {wf:?} activations {xf:?}"
    );
}

#[test]
fn scalar_is_always_available_and_detect_picks_a_supported_kernel() {
    assert!(Kernel::available().contains(&Kernel::Scalar));
    assert!(Kernel::detect().is_supported());
    #[cfg(target_arch = "x86_64")]
    assert!(!Kernel::Neon.is_supported() && !Kernel::NeonDot.is_supported());
    #[cfg(target_arch = "aarch64")]
    {
        assert!(Kernel::Neon.is_supported() && !Kernel::Avx2.is_supported());
        eprintln!("aarch64 kernels here: {:?}", Kernel::available());
    }
}

/// CI runs the tests under `QEMU_CPU=cortex-a72` and `QEMU_CPU=max` and says which kernel each must pick, so that
/// a detection mistake (sdot on a Pi 4 is SIGILL; scalar on a Pi 5 is slow) fails loudly.
#[test]
fn detected_kernel_is_the_one_ci_expects() {
    if let Ok(want) = std::env::var("BITNETD_EXPECT_KERNEL") {
        assert_eq!(Kernel::detect().name(), want);
    }
}

#[test]
fn unsupported_kernel_is_an_error_not_a_crash() {
    if let Some(k) = Kernel::ALL.into_iter().find(|k| !k.is_supported()) {
        let packed = pack::pack(&[1, 0, -1], 1, 3).unwrap();
        let w = TernaryWeights::new(&packed, 1, 3).unwrap();
        let mut out = [0];
        assert_eq!(
            ternary_matmul(k, w, &[1, 2, 3], 1, &mut out),
            Err(MatmulError::Unsupported(k.name()))
        );
    }
}

#[test]
fn every_kernel_matches_the_reference_on_ternary_shapes() {
    let mut rng = SmallRng::seed_from_u64(1);
    for kernel in Kernel::available() {
        for &k in &KS {
            for &n in &NS {
                check_ternary(kernel, &mut rng, n, k, 1, Fill::Random, Fill::Random);
            }
            for &m in &MS {
                check_ternary(kernel, &mut rng, 7, k, m, Fill::Random, Fill::Random);
            }
        }
    }
}

#[test]
fn every_kernel_matches_the_reference_on_ternary_edge_values() {
    let mut rng = SmallRng::seed_from_u64(2);
    for kernel in Kernel::available() {
        for wf in FILLS {
            for xf in FILLS {
                for &(n, k, m) in &[(3, 129, 1), (5, 2560, 2), (2, 6912, 5)] {
                    check_ternary(kernel, &mut rng, n, k, m, wf, xf);
                }
            }
        }
    }
}

#[test]
fn every_kernel_matches_the_reference_on_int8_shapes_and_edge_values() {
    let mut rng = SmallRng::seed_from_u64(3);
    for kernel in Kernel::available() {
        for &k in &KS {
            for &n in &NS[..4] {
                check_int8(kernel, &mut rng, n, k, 1, Fill::Random, Fill::Random);
            }
            for &m in &MS {
                check_int8(kernel, &mut rng, 3, k, m, Fill::Random, Fill::Random);
            }
        }
        for wf in FILLS {
            for xf in FILLS {
                check_int8(kernel, &mut rng, 3, 2563, 2, wf, xf);
            }
        }
    }
}

#[test]
fn row_ranges_cover_the_whole_product() {
    let mut rng = SmallRng::seed_from_u64(4);
    let (n, k) = (1000, 640);
    let w = values(&mut rng, n * k, Fill::Random, -1, 1);
    let packed = pack::pack(&w, n, k).unwrap();
    let tw = TernaryWeights::new(&packed, n, k).unwrap();
    let w8 = values(&mut rng, n * k, Fill::Random, i8::MIN, i8::MAX);
    let kernel = Kernel::detect();
    for m in [1, 6] {
        let x = values(&mut rng, m * k, Fill::Random, i8::MIN, i8::MAX);
        let xs: Vec<&[i8]> = x.chunks(k).collect();
        let xsum: Vec<i32> = xs
            .iter()
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
        let (mut a, mut b) = (vec![0; m * n], vec![0; m * n]);
        for range in [0..333, 333..334, 334..1000] {
            ternary_rows(kernel, tw, range.clone(), &xs, &xsum, |r, i, v| {
                a[i * n + r] = v
            });
            int8_rows(kernel, &w8, k, range, &xs, |r, i, v| b[i * n + r] = v);
        }
        assert_eq!(a, reference(&w, n, k, &x, m), "ternary m={m}");
        assert_eq!(b, reference(&w8, n, k, &x, m), "int8 m={m}");
    }
}

#[test]
fn shape_errors_are_typed() {
    let packed = pack::pack(&[0; 6], 2, 3).unwrap();
    let w = TernaryWeights::new(&packed, 2, 3).unwrap();
    let k = Kernel::Scalar;
    assert_eq!(
        ternary_matmul(k, w, &[0; 5], 2, &mut [0; 4]),
        Err(MatmulError::Activations { len: 5, m: 2, k: 3 })
    );
    assert_eq!(
        ternary_matmul(k, w, &[0; 6], 2, &mut [0; 3]),
        Err(MatmulError::Output { len: 3, m: 2, n: 2 })
    );
    assert_eq!(
        int8_matmul(k, &[0; 5], 2, 3, &[0; 3], 1, &mut [0; 2]),
        Err(MatmulError::Weights { len: 5, n: 2, k: 3 })
    );
}

#[test]
fn packing_round_trips_and_rejects_what_is_not_ternary() {
    let mut rng = SmallRng::seed_from_u64(5);
    let (n, k) = (3, 300);
    let w = values(&mut rng, n * k, Fill::Random, -1, 1);
    let packed = pack::pack(&w, n, k).unwrap();
    assert_eq!(packed.len(), pack::packed_len(n, k));
    assert_eq!(packed.len(), 3 * 3 * BLOCK_BYTES);
    for r in 0..n {
        for c in 0..k {
            assert_eq!(pack::get(&packed, k, r, c), w[r * k + c]);
        }
    }
    TernaryWeights::new(&packed, n, k)
        .unwrap()
        .validate_codes()
        .unwrap();
    assert_eq!(
        pack::pack(&[0, 2], 1, 2),
        Err(PackError::NotTernary {
            row: 0,
            col: 1,
            value: 2
        })
    );
    let mut bad = packed.clone();
    bad[2 * 3 * BLOCK_BYTES + 5] |= 0b1100_0000;
    assert_eq!(
        TernaryWeights::new(&bad, n, k).unwrap().validate_codes(),
        Err(PackError::BadCode { row: 2 })
    );
    assert_eq!(
        TernaryWeights::new(&packed[1..], n, k).unwrap_err(),
        PackError::Length {
            rows: 3,
            cols: 300,
            len: packed.len() - 1,
            expected: packed.len()
        }
    );
}

/// `Σ_g s_g · Σ q · x` for unpacked int4 levels, and the magnitude the kernels' f32 rounding is relative to:
/// `Σ_g s_g · Σ (|q| + 8) · |x|` (see `int4`'s module docs).
fn int4_reference(q: &[i8], scales: &[f32], x: &[i8]) -> (f64, f64) {
    let (mut y, mut bound) = (0f64, 0f64);
    for (g, &s) in scales.iter().enumerate() {
        let r = g * int4::GROUP..(g + 1) * int4::GROUP;
        let pairs = || q[r.clone()].iter().zip(&x[r.clone()]);
        let dot: i64 = pairs().map(|(&a, &b)| a as i64 * b as i64).sum();
        let mag: i64 = pairs()
            .map(|(&a, &b)| ((a as i64).abs() + 8) * (b as i64).abs())
            .sum();
        y += s as f64 * dot as f64;
        bound += s as f64 * mag as f64;
    }
    (y, bound)
}

fn check_int4(
    kernel: Kernel,
    rng: &mut SmallRng,
    n: usize,
    k: usize,
    m: usize,
    wf: Fill,
    xf: Fill,
) {
    let (kp, ng) = (int4::padded(k), int4::groups(k));
    let mut q = vec![0i8; n * kp];
    let mut packed = vec![];
    for r in 0..n {
        let row = &mut q[r * kp..(r + 1) * kp];
        row[..k].copy_from_slice(&values(rng, k, wf, -8, 7));
        for g in row.chunks(int4::GROUP) {
            int4::pack_group(g, &mut packed);
        }
    }
    let scales: Vec<f32> = (0..n * ng).map(|_| rng.random_range(1e-4..2e-2)).collect();
    let mut x = vec![0i8; m * kp];
    for i in 0..m {
        x[i * kp..i * kp + k].copy_from_slice(&values(rng, k, xf, i8::MIN, i8::MAX));
    }
    let xs: Vec<&[i8]> = x.chunks(kp).collect();
    let mut out = vec![f32::NAN; m * n];
    int4_rows(kernel, &packed, &scales, k, 0..n, &xs, |r, i, y| {
        out[i * n + r] = y
    });
    for r in 0..n {
        assert_eq!(
            int4::weight(&packed[r * int4::row_bytes(k)..], k - 1),
            q[r * kp + k - 1]
        );
        for i in 0..m {
            let (want, bound) = int4_reference(
                &q[r * kp..(r + 1) * kp],
                &scales[r * ng..(r + 1) * ng],
                xs[i],
            );
            let got = out[i * n + r] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * bound,
                "{kernel}: int4 n={n} k={k} m={m} weights {wf:?} activations {xf:?}: {got} for {want}"
            );
        }
    }
}

#[test]
fn every_kernel_matches_the_reference_on_int4_shapes_and_edge_values() {
    let mut rng = SmallRng::seed_from_u64(6);
    for kernel in Kernel::available() {
        for &k in &KS {
            check_int4(kernel, &mut rng, 3, k, 1, Fill::Random, Fill::Random);
            check_int4(kernel, &mut rng, 2, k, 3, Fill::Random, Fill::Random);
        }
        for wf in FILLS {
            for xf in FILLS {
                check_int4(kernel, &mut rng, 3, 2563, 1, wf, xf);
            }
        }
    }
}

#[test]
fn int4_quantization_rounds_each_group_to_its_own_scale() {
    let mut rng = SmallRng::seed_from_u64(7);
    let k = 300;
    // Groups of very different magnitudes, a zero group, and padding.
    let row: Vec<f32> = (0..k)
        .map(|c| match c / int4::GROUP {
            0 => rng.random_range(-1.0..1.0),
            1 => 0.0,
            _ => rng.random_range(-1e-3..1e-3),
        })
        .collect();
    let (mut packed, mut scales) = (vec![], vec![]);
    int4::quantize_row(&row, &mut packed, &mut scales);
    assert_eq!(
        (packed.len(), scales.len()),
        (int4::row_bytes(k), int4::groups(k))
    );
    assert_eq!(scales[1], 1.0);
    for (c, &v) in row.iter().enumerate() {
        let s = scales[c / int4::GROUP];
        let back = s * int4::weight(&packed, c) as f32;
        assert!(
            (back - v).abs() <= s * 1.0001,
            "column {c}: {v} became {back} (scale {s})"
        );
    }
    for c in k..int4::padded(k) {
        assert_eq!(int4::weight(&packed, c), 0, "padding column {c}");
    }
    assert!(scales[2] < 1e-3 / 6.0 && scales[0] > 1e-2, "{scales:?}");
}
