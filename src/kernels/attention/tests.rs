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
    for (hd, stride) in [(32usize, 64usize), (40, 32), (8, 16)] {
        let (mut keys, mut values) = (vec![false; hd * stride], vec![false; hd * stride]);
        for j in 0..stride {
            for d in 0..hd {
                let (k, v) = (key_index(j, d, hd), value_index(j, d, hd, stride));
                assert!(!keys[k] && !values[v], "({j}, {d}) of hd {hd}");
                (keys[k], values[v]) = (true, true);
            }
        }
        assert!(keys.iter().chain(&values).all(|&s| s));
    }
}

fn round16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// Every path (the one this CPU takes, and the portable one) against the reference: two pages of 16 and 21
/// keys, three queries seeing 37, 20 and 1 keys, head dims that take the vector path (32) and that do not
/// (40), f32 and f16 storage; and merging two key ranges computed apart.
#[test]
fn pages_and_merged_ranges_give_softmax_attention() {
    for hd in [32usize, 40] {
        let n = 37;
        let keys = data(n * hd, 1);
        let values = data(n * hd, 2);
        let qs: Vec<Vec<f32>> = (0..3).map(|i| data(hd, 10 + i)).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let total = [37usize, 20, 1];
        for f16 in [false, true] {
            for path in ["dispatch", "portable"] {
                let mut states: Vec<Softmax> = (0..3).map(|_| Softmax::new(hd)).collect();
                for (start, len) in [(0usize, 16usize), (16, 21)] {
                    let (kt, kt16, v, v16) =
                        pages(&keys[start * hd..], &values[start * hd..], len, hd, 32);
                    let page = Page {
                        keys: if f16 {
                            Rows::F16(&kt16)
                        } else {
                            Rows::F32(&kt)
                        },
                        values: if f16 { Rows::F16(&v16) } else { Rows::F32(&v) },
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
                    let q: Vec<&[f32]> = qs.iter().map(|q| &q[..]).collect();
                    let mut st: Vec<&mut Softmax> = states.iter_mut().collect();
                    match path {
                        "portable" => portable::update(&q, &vis, &page, &mut st),
                        _ => update(&q, &vis, &page, &mut st),
                    }
                }
                let (k, v) = if f16 {
                    (round16(&keys), round16(&values))
                } else {
                    (keys.clone(), values.clone())
                };
                for i in 0..3 {
                    let want = reference(&qs[i], &k, &v, total[i], hd, scale);
                    let mut got = vec![0f32; hd];
                    states[i].write_output(&mut got);
                    for d in 0..hd {
                        assert!(
                            (got[d] - want[d]).abs() < 1e-5,
                            "hd {hd} f16 {f16} path {path} query {i} dim {d}: {} vs {}",
                            got[d],
                            want[d]
                        );
                    }
                }
            }
        }
        // Two key ranges computed apart, merged.
        let mut parts = vec![];
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
            let mut s = Softmax::new(hd);
            update(&[&qs[0]], &[len], &page, &mut [&mut s]);
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
