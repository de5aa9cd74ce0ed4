//! Queries as the attention kernels read them.

use super::quantize_i8;

/// Queries of one head width, prepared once for every page they are scored against: their f32 values and, when
/// made for int8 keys, the same quantized to int8 (one scale per query, `max |x| / 127`, as the cache quantizes
/// a key) with the sum of the codes (`vpdpbusd` multiplies unsigned bytes by signed ones, so the x86 path reads
/// the keys offset by 128 and takes `128 · sum` back off).
#[derive(Debug, Clone)]
pub struct Queries {
    head_dim: usize,
    int8: bool,
    values: Vec<f32>,
    codes: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<i32>,
}

impl Queries {
    /// An empty set for heads of `head_dim`, quantized when `int8`.
    pub fn new(head_dim: usize, int8: bool) -> Queries {
        Queries {
            head_dim,
            int8,
            values: Vec::new(),
            codes: Vec::new(),
            scales: Vec::new(),
            sums: Vec::new(),
        }
    }

    /// Adds a query of `head_dim` values.
    pub fn push(&mut self, q: &[f32]) {
        assert_eq!(q.len(), self.head_dim, "a query of another head width");
        self.values.extend_from_slice(q);
        if self.int8 {
            let at = self.codes.len();
            self.codes.resize(at + q.len(), 0);
            let codes = &mut self.codes[at..];
            self.scales.push(quantize_i8(q, codes));
            self.sums.push(codes.iter().map(|&c| c as i32).sum());
        }
    }

    /// Queries held.
    pub fn len(&self) -> usize {
        self.values.len() / self.head_dim.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Query `i`.
    pub fn get(&self, i: usize) -> Query<'_> {
        let span = i * self.head_dim..(i + 1) * self.head_dim;
        if self.int8 {
            Query {
                values: &self.values[span.clone()],
                codes: &self.codes[span],
                scale: self.scales[i],
                sum: self.sums[i],
            }
        } else {
            Query {
                values: &self.values[span],
                codes: &[],
                scale: 0.0,
                sum: 0,
            }
        }
    }
}

/// One query of a [`Queries`]: `values`, and for int8 keys `codes` (empty otherwise) with `values ≈ codes · scale`
/// and `sum = Σ codes`.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub(super) values: &'a [f32],
    pub(super) codes: &'a [i8],
    pub(super) scale: f32,
    pub(super) sum: i32,
}
