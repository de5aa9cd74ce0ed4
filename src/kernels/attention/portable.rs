//! The portable attention path: the reference the SIMD paths are checked against.

use super::*;

fn value(r: Rows<'_>, i: usize) -> f32 {
    match r {
        Rows::F32(v) => v[i],
        Rows::F16(v) => half::f16::from_bits(v[i]).to_f32(),
        // The position's scale is applied by `per_position`.
        Rows::I8 { q, .. } => q[i] as f32,
    }
}

pub(super) fn update(
    queries: &[Query<'_>],
    visible: &[usize],
    page: &Page<'_>,
    states: &mut [Softmax],
) {
    let mut scores: Scores = [[0f32; MAX_KEYS]; QUERY_TILE];
    self::scores(queries, page, &mut scores);
    between(&mut scores, visible, page, states);
    accumulate(&scores, visible, page, states);
}

/// Each query's scores over the page's keys, times `page.scale` (for int8 keys, before the keys' scales).
pub(super) fn scores(queries: &[Query<'_>], page: &Page<'_>, out: &mut Scores) {
    let (n, hd) = (page.n, page.head_dim);
    for (q, row) in queries.iter().zip(out.iter_mut()) {
        for (j, score) in row[..n].iter_mut().enumerate() {
            *score = match page.keys {
                Rows::I8 { q: keys, .. } => {
                    let dot: i32 = (0..hd)
                        .map(|d| q.codes[d] as i32 * keys[key_index_i8(j, d, hd)] as i32)
                        .sum();
                    dot as f32 * (page.scale * q.scale)
                }
                keys => {
                    let dot: f32 = (0..hd)
                        .map(|d| q.values[d] * value(keys, key_index(j, d, hd)))
                        .sum();
                    dot * page.scale
                }
            };
        }
    }
}

/// Adds each query's weighted values to its state's accumulators.
fn accumulate(weights: &Scores, visible: &[usize], page: &Page<'_>, states: &mut [Softmax]) {
    let (hd, stride) = (page.head_dim, page.stride);
    for (i, st) in states.iter_mut().enumerate() {
        for (j, &p) in weights[i][..visible[i]].iter().enumerate() {
            for (d, a) in st.acc.iter_mut().enumerate() {
                *a += p * value(page.values, value_index(j, d, hd, stride));
            }
        }
    }
}
