//! The attention kernels against a direct softmax, on every path this CPU runs.

use super::*;

#[test]
fn exp_is_within_two_ulps() {
    let mut x = -87.0f32;
    while x < 88.0 {
        let (got, want) = (exp(x), x.exp());
        let ulp = (want.to_bits() as i64 - got.to_bits() as i64).abs();
        assert!(ulp <= 2, "exp({x}) = {got}, want {want}");
        x += 0.0137;
    }
    assert_eq!(exp(0.0), 1.0);
    assert!(exp(f32::NEG_INFINITY) < 1e-37);
}

#[test]
fn int8_rows_keep_each_value_within_half_a_step_of_its_scale() {
    let x = data(128, 3);
    let mut q = vec![0i8; 128];
    let s = quantize_i8(&x, &mut q);
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!((s * 127.0 - amax).abs() < 1e-6);
    for (&c, &v) in q.iter().zip(&x) {
        assert!((c as f32 * s - v).abs() <= s * 0.5 + 1e-6, "{v} as {c}");
    }
    assert_eq!(quantize_i8(&[0.0; 4], &mut q[..4]), 0.0);
    assert_eq!(&q[..4], &[0; 4]);
}

/// Softmax attention computed directly, in f64, over row-major keys.
fn reference(q: &[f32], keys: &[f32], values: &[f32], n: usize, hd: usize, scale: f32) -> Vec<f32> {
    let s: Vec<f64> = (0..n)
        .map(|j| {
            (0..hd)
                .map(|d| q[d] as f64 * keys[j * hd + d] as f64)
                .sum::<f64>()
                * scale as f64
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
    let l: f64 = p.iter().sum();
    (0..hd)
        .map(|d| {
            ((0..n)
                .map(|j| p[j] * values[j * hd + d] as f64)
                .sum::<f64>()
                / l) as f32
        })
        .collect()
}

fn data(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i + seed) * 7919 % 2003) as f32 / 1001.0 - 1.0) * 2.0)
        .collect()
}

/// Keys and values in the page layout (`key_index`, `value_index`), f32 and f16 (rounded the same way for
/// the reference).
fn pages(
    keys: &[f32],
    values: &[f32],
    n: usize,
    hd: usize,
    stride: usize,
) -> (Vec<f32>, Vec<u16>, Vec<f32>, Vec<u16>) {
    let (mut kt, mut vt) = (vec![0f32; hd * stride], vec![0f32; hd * stride]);
    for j in 0..n {
        for d in 0..hd {
            kt[key_index(j, d, hd)] = keys[j * hd + d];
            vt[value_index(j, d, hd, stride)] = values[j * hd + d];
        }
    }
    let bits = |v: &[f32]| {
        v.iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect::<Vec<u16>>()
    };
    (kt.clone(), bits(&kt), vt.clone(), bits(&vt))
}

#[test]
fn layout_indices_are_a_bijection() {
    for (hd, stride) in [(32usize, 64usize), (40, 32), (8, 16), (6, 16)] {
        let mut seen = [(); 3].map(|_| vec![false; hd * stride]);
        for j in 0..stride {
            for d in 0..hd {
                let at = [
                    key_index(j, d, hd),
                    key_index_i8(j, d, hd),
                    value_index(j, d, hd, stride),
                ];
                for (s, &i) in seen.iter_mut().zip(&at) {
                    assert!(!s[i], "({j}, {d}) of hd {hd}");
                    s[i] = true;
                }
            }
        }
        assert!(seen.iter().flatten().all(|&s| s));
    }
}

/// Row-major `hd`-wide rows quantized a row (a position) at a time: codes, scales, dequantized values.
fn quantized(v: &[f32], hd: usize) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
    let mut q = vec![0i8; v.len()];
    let mut scales = vec![];
    for (row, out) in v.chunks(hd).zip(q.chunks_mut(hd)) {
        scales.push(quantize_i8(row, out));
    }
    let dq = q
        .iter()
        .enumerate()
        .map(|(i, &c)| c as f32 * scales[i / hd])
        .collect();
    (q, scales, dq)
}

/// Int8 rows in the page layout: keys at `key_index_i8`, values at `value_index`.
fn layout_i8(v: &[i8], n: usize, hd: usize, stride: usize, keys: bool) -> Vec<i8> {
    let mut out = vec![0i8; hd * stride];
    for j in 0..n {
        for d in 0..hd {
            let at = if keys {
                key_index_i8(j, d, hd)
            } else {
                value_index(j, d, hd, stride)
            };
            out[at] = v[j * hd + d];
        }
    }
    out
}

fn round16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// Every path this CPU runs (one per available kernel, the scalar one being the portable reference) against
/// the reference: two pages of 16 and 21 keys, three queries seeing 37, 20 and 1 keys, head dims that take the
/// vector paths (32) and that do not (40), f32, f16 and int8 storage; and merging two key ranges computed apart.
#[test]
fn pages_and_merged_ranges_give_softmax_attention() {
    for hd in [32usize, 40] {
        let n = 37;
        let keys = data(n * hd, 1);
        let values = data(n * hd, 2);
        let qs: Vec<Vec<f32>> = (0..3).map(|i| data(hd, 10 + i)).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let total = [37usize, 20, 1];
        for format in ["f32", "f16", "i8"] {
            // Int8 rows: one scale per position; the reference sees the dequantized values.
            let (ki8, ks, kdq) = quantized(&keys, hd);
            let (vi8, vs, vdq) = quantized(&values, hd);
            let mut queries = Queries::new(hd, format == "i8");
            for q in &qs {
                queries.push(q);
            }
            for kernel in Kernel::available() {
                let mut states: Vec<Softmax> = (0..3).map(|_| Softmax::new(hd)).collect();
                for (start, len) in [(0usize, 16usize), (16, 21)] {
                    let (kt, kt16, v, v16) =
                        pages(&keys[start * hd..], &values[start * hd..], len, hd, 32);
                    let (kq, vq) = (
                        layout_i8(&ki8[start * hd..], len, hd, 32, true),
                        layout_i8(&vi8[start * hd..], len, hd, 32, false),
                    );
                    let rows = |f: &'static str, t: &'static str| -> Rows<'_> {
                        match (f, t) {
                            ("f16", "k") => Rows::F16(&kt16),
                            ("f16", _) => Rows::F16(&v16),
                            ("i8", "k") => Rows::I8 {
                                q: &kq,
                                scales: &ks[start..start + len],
                            },
                            ("i8", _) => Rows::I8 {
                                q: &vq,
                                scales: &vs[start..start + len],
                            },
                            (_, "k") => Rows::F32(&kt),
                            _ => Rows::F32(&v),
                        }
                    };
                    let page = Page {
                        keys: rows(format, "k"),
                        values: rows(format, "v"),
                        n: len,
                        stride: 32,
                        head_dim: hd,
                        scale,
                        // Any keys: a prefetch hint must not change a result.
                        next_keys: Some(Rows::F32(&kt)),
                    };
                    let vis: Vec<usize> = total
                        .iter()
                        .map(|&t| t.saturating_sub(start).min(len))
                        .collect();
                    let q: Vec<Query<'_>> = (0..3).map(|i| queries.get(i)).collect();
                    update(kernel, &q, &vis, &page, &mut states);
                }
                let (k, v) = match format {
                    "f16" => (round16(&keys), round16(&values)),
                    "i8" => (kdq.clone(), vdq.clone()),
                    _ => (keys.clone(), values.clone()),
                };
                for i in 0..3 {
                    // Int8 keys are scored against the query quantized the same way.
                    let query = queries.get(i);
                    let q: Vec<f32> = match format {
                        "i8" => query
                            .codes
                            .iter()
                            .map(|&c| c as f32 * query.scale)
                            .collect(),
                        _ => qs[i].clone(),
                    };
                    let want = reference(&q, &k, &v, total[i], hd, scale);
                    let mut got = vec![0f32; hd];
                    states[i].write_output(&mut got);
                    for d in 0..hd {
                        assert!(
                            (got[d] - want[d]).abs() < 1e-5,
                            "hd {hd} {format} kernel {} query {i} dim {d}: {} vs {}",
                            kernel.name(),
                            got[d],
                            want[d]
                        );
                    }
                }
            }
        }
        // Two key ranges computed apart, merged.
        let mut parts = vec![];
        let queries = {
            let mut q = Queries::new(hd, false);
            q.push(&qs[0]);
            q
        };
        for (start, len) in [(0usize, 16usize), (16, 21)] {
            let (kt, _, v, _) = pages(&keys[start * hd..], &values[start * hd..], len, hd, 32);
            let page = Page {
                keys: Rows::F32(&kt),
                values: Rows::F32(&v),
                n: len,
                stride: 32,
                head_dim: hd,
                scale,
                next_keys: None,
            };
            let mut s = [Softmax::new(hd)];
            update(Kernel::detect(), &[queries.get(0)], &[len], &page, &mut s);
            let [s] = s;
            parts.push(s);
        }
        let b = parts.pop().unwrap();
        let mut a = parts.pop().unwrap();
        a.merge(b.m, b.l, &b.acc);
        let mut got = vec![0f32; hd];
        a.write_output(&mut got);
        let want = reference(&qs[0], &keys, &values, n, hd, scale);
        for d in 0..hd {
            assert!((got[d] - want[d]).abs() < 1e-5);
        }
    }
}

/// Int8 scores are integer sums times one factor per query, so every path gives the same bits as a direct sum:
/// full pages of 2B-4T's head width, one to four queries, and codes at both ends of the range (where the x86
/// path's offset of 128 and the i16 pair sums are at their limits).
#[test]
fn int8_scores_are_the_same_exact_sums_on_every_path() {
    let (hd, n) = (128usize, MAX_KEYS);
    let mut codes: Vec<i8> = (0..n * hd).map(|i| ((i * 7919 + 13) % 255) as i8).collect();
    codes[..hd].fill(127);
    codes[hd..2 * hd].fill(-127);
    let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-3).collect();
    let keys = layout_i8(&codes, n, hd, n, true);
    let values = vec![0i8; n * hd];
    for tile in 1..=QUERY_TILE {
        let mut queries = Queries::new(hd, true);
        for i in 0..tile {
            let mut q = data(hd, 40 + i);
            if i == 0 {
                q.iter_mut()
                    .enumerate()
                    .for_each(|(d, x)| *x = if d % 2 == 0 { 3.0 } else { -3.0 });
            }
            queries.push(&q);
        }
        let q: Vec<Query<'_>> = (0..tile).map(|i| queries.get(i)).collect();
        let page = Page {
            keys: Rows::I8 {
                q: &keys,
                scales: &scales,
            },
            values: Rows::I8 {
                q: &values,
                scales: &scales,
            },
            n,
            stride: n,
            head_dim: hd,
            scale: 0.088,
            next_keys: None,
        };
        let mut want: Scores = [[0f32; MAX_KEYS]; QUERY_TILE];
        for (i, query) in q.iter().enumerate() {
            for j in 0..n {
                let dot: i32 = (0..hd)
                    .map(|d| query.codes[d] as i32 * codes[j * hd + d] as i32)
                    .sum();
                want[i][j] = dot as f32 * (page.scale * query.scale);
            }
        }
        for kernel in Kernel::available() {
            let mut got: Scores = [[0f32; MAX_KEYS]; QUERY_TILE];
            int8_scores(kernel, &q, &page, &mut got);
            for i in 0..tile {
                for j in 0..n {
                    assert_eq!(
                        got[i][j].to_bits(),
                        want[i][j].to_bits(),
                        "kernel {} query {i} of {tile}, key {j}: {} vs {}",
                        kernel.name(),
                        got[i][j],
                        want[i][j]
                    );
                }
            }
        }
    }
}

/// The int8 scores of `kernel`'s path.
fn int8_scores(kernel: Kernel, queries: &[Query<'_>], page: &Page<'_>, out: &mut Scores) {
    // SAFETY: the path's features are checked by `Path::choose`; the caller gives whole pages.
    match Path::choose(kernel, page.head_dim) {
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 { vnni: true } => unsafe { x86::scores_i8_vnni(queries, page, out) },
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 { vnni: false } => unsafe { x86::scores_i8_avx2(queries, page, out) },
        #[cfg(target_arch = "aarch64")]
        Path::Neon { dot: true } => unsafe { arm::scores_i8_sdot(queries, page, out) },
        #[cfg(target_arch = "aarch64")]
        Path::Neon { dot: false } => unsafe { arm::scores_i8(queries, page, out) },
        Path::Portable => portable::scores(queries, page, out),
    }
}
