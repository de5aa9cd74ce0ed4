//! The portable attention update: the reference the SIMD paths are checked against.

use super::*;

fn key(r: Rows<'_>, i: usize) -> f32 {
    match r {
        Rows::F32(v) => v[i],
        Rows::F16(v) => half::f16::from_bits(v[i]).to_f32(),
        // The position's scale is applied by `per_position`.
        Rows::I8 { q, .. } => q[i] as f32,
    }
}

pub(super) fn update(
    queries: &[&[f32]],
    visible: &[usize],
    page: &Page<'_>,
    states: &mut [&mut Softmax],
) {
    let (n, hd) = (page.n, page.head_dim);
    let mut scores = [[0f32; MAX_KEYS]; QUERY_TILE];
    for (i, q) in queries.iter().enumerate() {
        for (j, score) in scores[i][..n].iter_mut().enumerate() {
            let mut s = 0f32;
            for (d, &qd) in q.iter().enumerate() {
                s += qd * key(page.keys, key_index(j, d, hd));
            }
            *score = s * page.scale;
        }
    }
    per_position(&mut scores, queries.len(), n, page.keys);
    softmax_step(&mut scores, n, visible, states);
    per_position(&mut scores, queries.len(), n, page.values);
    for (i, st) in states.iter_mut().enumerate() {
        for (j, &p) in scores[i][..visible[i]].iter().enumerate() {
            for (d, a) in st.acc.iter_mut().enumerate() {
                *a += p * key(page.values, value_index(j, d, hd, page.stride));
            }
        }
    }
}
