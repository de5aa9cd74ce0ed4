//! The KV cache of one attention layer of one session: keys and values in pages of [`PAGE`] positions, stored as
//! f32, f16 or int8 with a scale per position and head ([`KvFormat`]), appended in place (never regrown) and read
//! a page at a time.
//!
//! A page holds, for each KV head, its keys, then for each KV head its values, each in the blocked layout the
//! attention kernels stream (`kernels::attention::key_index` and `value_index`: keys in blocks of 16 positions,
//! dimension-major inside a block, so that scores are plain vector products with no horizontal sums, int8 keys
//! in groups of four dimensions there (`key_index_i8`) for integer dot products; values in blocks of 16
//! dimensions, position-major inside). An int8 page then holds, after the codes, each KV head's key
//! scales and then its value scales (f32, one per position). Attention jobs read the cache through a [`KvView`], a
//! snapshot of the pages and the length; pages are shared by `Arc`, so a view taken by a job that outlives its step (see
//! `crate::team`) keeps what it reads alive. The cache writes a page only while no view holds it; a page still
//! held (by a late helper) is copied first, so appending never races with readers.

use std::sync::Arc;

use memmap2::MmapMut;

pub use crate::kernels::attention::Rows;
use crate::kernels::attention::{key_index, key_index_i8, quantize_i8, value_index};
use crate::kernels::f16;

/// Positions per page.
pub const PAGE: usize = 64;

/// How keys and values are stored.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum KvFormat {
    /// f32: exactly what the model computed.
    F32,
    /// IEEE half precision, rounded to nearest: half the memory and half the bytes read per decode step.
    F16,
    /// Int8 with one f32 scale per position and KV head (`max |x| / 127`): a quarter of f32's bytes (and 1/32
    /// more for the scales), so a long context costs attention half of what f16 does. The default: on a trained
    /// model its predictions stay as close to f32's as f16's do (tests/default_model.rs measures both), the
    /// format vLLM calls `int8_per_token_head`.
    #[default]
    I8,
}

impl KvFormat {
    /// Bytes per stored value (an int8 row's scale apart, see [`KvFormat::scale_bytes`]).
    pub fn bytes(self) -> usize {
        match self {
            KvFormat::F32 => 4,
            KvFormat::F16 => 2,
            KvFormat::I8 => 1,
        }
    }

    /// Bytes of scale per position, KV head, and keys or values.
    pub fn scale_bytes(self) -> usize {
        match self {
            KvFormat::I8 => 4,
            _ => 0,
        }
    }

    /// Bytes one position takes in one layer: keys and values of `kv_heads` heads of `head_dim`, scales included.
    pub fn position_bytes(self, kv_heads: usize, head_dim: usize) -> usize {
        2 * kv_heads * (head_dim * self.bytes() + self.scale_bytes())
    }

    pub fn name(self) -> &'static str {
        match self {
            KvFormat::F32 => "f32",
            KvFormat::F16 => "f16",
            KvFormat::I8 => "i8",
        }
    }

    /// The format named `name` (`f32`, `f16` or `i8`).
    pub fn parse(name: &str) -> Option<KvFormat> {
        [KvFormat::F32, KvFormat::F16, KvFormat::I8]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

impl std::fmt::Display for KvFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One page of keys and values: its own anonymous mapping, so that a session's cache goes back to the system
/// when the session ends (from the allocator's heap it would stay with the process, pinned between other
/// allocations). Page-aligned, so it can be seen as f32 or u16 values.
struct Page {
    data: MmapMut,
}

impl Page {
    fn new(bytes: usize) -> Page {
        // Zeroed by the kernel; an allocation failure is an out-of-memory like any other.
        Page {
            data: MmapMut::map_anon(bytes).expect("mapping a KV cache page"),
        }
    }

    fn f32s(&self) -> &[f32] {
        // SAFETY: page-aligned, and every bit pattern is an f32.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast(), self.data.len() / 4) }
    }

    fn f16s(&self) -> &[u16] {
        // SAFETY: page-aligned, and every bit pattern is a u16.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast(), self.data.len() / 2) }
    }

    /// The codes and the scales of an int8 page whose codes take `codes` bytes.
    fn i8s(&self, codes: usize) -> (&[i8], &[f32]) {
        let (c, s) = self.data.split_at(codes);
        // SAFETY: `codes` is a multiple of 4 on a page-aligned mapping; every bit pattern is an i8 or an f32.
        unsafe {
            (
                std::slice::from_raw_parts(c.as_ptr().cast(), c.len()),
                std::slice::from_raw_parts(s.as_ptr().cast(), s.len() / 4),
            )
        }
    }

    fn i8s_mut(&mut self, codes: usize) -> (&mut [i8], &mut [f32]) {
        let (c, s) = self.data.split_at_mut(codes);
        // SAFETY: as `i8s`, with the exclusive borrow of the mapping.
        unsafe {
            (
                std::slice::from_raw_parts_mut(c.as_mut_ptr().cast(), c.len()),
                std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len() / 4),
            )
        }
    }

    fn f32s_mut(&mut self) -> &mut [f32] {
        // SAFETY: as `f32s`, with the exclusive borrow of the mapping.
        unsafe {
            std::slice::from_raw_parts_mut(self.data.as_mut_ptr().cast(), self.data.len() / 4)
        }
    }

    fn f16s_mut(&mut self) -> &mut [u16] {
        // SAFETY: as `f16s`, with the exclusive borrow of the mapping.
        unsafe {
            std::slice::from_raw_parts_mut(self.data.as_mut_ptr().cast(), self.data.len() / 2)
        }
    }
}

impl Clone for Page {
    fn clone(&self) -> Page {
        let mut p = Page::new(self.data.len());
        p.data.copy_from_slice(&self.data);
        p
    }
}

/// The shape of a layer's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub format: KvFormat,
}

impl KvShape {
    fn page_values(&self) -> usize {
        2 * self.kv_heads * PAGE * self.head_dim
    }

    fn page_bytes(&self) -> usize {
        PAGE * self.bytes_per_position()
    }

    /// Bytes of an int8 page's codes (its scales follow).
    fn codes_bytes(&self) -> usize {
        self.page_values()
    }

    /// Offset of head `head`'s key scales (values: `kv_heads + head`) among an int8 page's scales.
    fn scales_offset(&self, head: usize) -> usize {
        head * PAGE
    }

    /// Offset of head `head`'s keys inside a page.
    fn keys_offset(&self, head: usize) -> usize {
        head * self.head_dim * PAGE
    }

    /// Offset of head `head`'s values inside a page.
    fn values_offset(&self, head: usize) -> usize {
        (self.kv_heads + head) * self.head_dim * PAGE
    }

    /// Bytes one position takes in one layer (keys and values of every KV head).
    pub fn bytes_per_position(&self) -> usize {
        self.format.position_bytes(self.kv_heads, self.head_dim)
    }
}

/// The cache of one layer of one session. Cloning copies what it holds.
pub struct KvCache {
    shape: KvShape,
    pages: Vec<Arc<Page>>,
    len: usize,
}

impl KvCache {
    pub fn new(shape: KvShape) -> KvCache {
        KvCache {
            shape,
            pages: Vec::new(),
            len: 0,
        }
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated (whole pages).
    pub fn bytes(&self) -> usize {
        self.pages.len() * self.shape.page_bytes()
    }

    /// Appends `n` positions: `keys` and `values` are `n` rows of `kv_heads * head_dim` values each, head-major
    /// inside a row (as the projections produce them).
    pub fn append(&mut self, keys: &[f32], values: &[f32], n: usize) {
        let (kvh, hd) = (self.shape.kv_heads, self.shape.head_dim);
        assert!(keys.len() == n * kvh * hd && values.len() == n * kvh * hd);
        let (mut kbits, mut vbits) = (vec![0u16; hd], vec![0u16; hd]);
        let (mut kq, mut vq) = (vec![0i8; hd], vec![0i8; hd]);
        for t in 0..n {
            let pos = self.len + t;
            let (page, row) = (pos / PAGE, pos % PAGE);
            while self.pages.len() <= page {
                self.pages
                    .push(Arc::new(Page::new(self.shape.page_bytes())));
            }
            // Copied first if a view still holds it (only a job that outlived its step does).
            let p = Arc::make_mut(&mut self.pages[page]);
            for h in 0..kvh {
                let k = &keys[(t * kvh + h) * hd..(t * kvh + h + 1) * hd];
                let v = &values[(t * kvh + h) * hd..(t * kvh + h + 1) * hd];
                let (ko, vo) = (self.shape.keys_offset(h), self.shape.values_offset(h));
                match self.shape.format {
                    KvFormat::F32 => {
                        let dst = p.f32s_mut();
                        for d in 0..hd {
                            dst[ko + key_index(row, d, hd)] = k[d];
                            dst[vo + value_index(row, d, hd, PAGE)] = v[d];
                        }
                    }
                    KvFormat::F16 => {
                        let dst = p.f16s_mut();
                        f16::from_f32(k, &mut kbits);
                        f16::from_f32(v, &mut vbits);
                        for d in 0..hd {
                            dst[ko + key_index(row, d, hd)] = kbits[d];
                            dst[vo + value_index(row, d, hd, PAGE)] = vbits[d];
                        }
                    }
                    KvFormat::I8 => {
                        let (ks, vs) = (quantize_i8(k, &mut kq), quantize_i8(v, &mut vq));
                        let (codes, scales) = p.i8s_mut(self.shape.codes_bytes());
                        for d in 0..hd {
                            codes[ko + key_index_i8(row, d, hd)] = kq[d];
                            codes[vo + value_index(row, d, hd, PAGE)] = vq[d];
                        }
                        scales[self.shape.scales_offset(h) + row] = ks;
                        scales[self.shape.scales_offset(kvh + h) + row] = vs;
                    }
                }
            }
        }
        self.len += n;
    }

    /// A snapshot for readers: the pages and the length now.
    pub fn view(&self) -> KvView {
        KvView {
            shape: self.shape,
            pages: self.pages.clone(),
            len: self.len,
        }
    }
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        KvCache {
            shape: self.shape,
            pages: self
                .pages
                .iter()
                .map(|p| Arc::new(Page::clone(p)))
                .collect(),
            len: self.len,
        }
    }
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvCache({} positions, {:?})", self.len, self.shape)
    }
}

/// What a reader sees of a cache: the positions stored when the view was taken.
#[derive(Clone)]
pub struct KvView {
    shape: KvShape,
    pages: Vec<Arc<Page>>,
    len: usize,
}

impl KvView {
    /// Positions visible.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Rows of page `page` that are visible.
    pub fn rows_in(&self, page: usize) -> usize {
        self.len.saturating_sub(page * PAGE).min(PAGE)
    }

    /// Head `head`'s keys in page `page`, at `key_index` (int8 keys at `key_index_i8`; positions past
    /// [`KvView::rows_in`] are zero).
    pub fn keys(&self, head: usize, page: usize) -> Rows<'_> {
        self.slice(page, self.shape.keys_offset(head), head)
    }

    /// Head `head`'s values in page `page`, at `value_index` for [`PAGE`] positions.
    pub fn values(&self, head: usize, page: usize) -> Rows<'_> {
        self.slice(
            page,
            self.shape.values_offset(head),
            self.shape.kv_heads + head,
        )
    }

    /// `head_dim * PAGE` values at `off`; for int8, with the scales of scale set `set`.
    fn slice(&self, page: usize, off: usize, set: usize) -> Rows<'_> {
        let (p, n) = (&self.pages[page], self.shape.head_dim * PAGE);
        match self.shape.format {
            KvFormat::F32 => Rows::F32(&p.f32s()[off..off + n]),
            KvFormat::F16 => Rows::F16(&p.f16s()[off..off + n]),
            KvFormat::I8 => {
                let (codes, scales) = p.i8s(self.shape.codes_bytes());
                let s = self.shape.scales_offset(set);
                Rows::I8 {
                    q: &codes[off..off + n],
                    scales: &scales[s..s + PAGE],
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, width: usize, seed: f32) -> Vec<f32> {
        (0..n * width).map(|i| seed + i as f32 * 0.25).collect()
    }

    #[test]
    fn appended_rows_read_back_by_head_and_page() {
        for format in [KvFormat::F32, KvFormat::F16, KvFormat::I8] {
            let shape = KvShape {
                kv_heads: 2,
                head_dim: 8,
                format,
            };
            let mut c = KvCache::new(shape);
            let (k1, v1) = (rows(50, 16, 0.0), rows(50, 16, 1000.0));
            c.append(&k1, &v1, 50);
            let old = c.view();
            let (k2, v2) = (rows(30, 16, 500.0), rows(30, 16, 1500.0));
            c.append(&k2, &v2, 30);
            assert_eq!(c.len(), 80);
            assert_eq!(c.bytes(), 2 * shape.page_bytes());
            let view = c.view();
            let (keys, values) = ([k1, k2].concat(), [v1, v2].concat());
            // Values as stored, dequantized (an int8 code times its position's scale), and the scales.
            let stored = |r: Rows<'_>, keys: bool| -> (Vec<f32>, Vec<f32>) {
                match r {
                    Rows::F32(v) => (v.to_vec(), vec![]),
                    Rows::F16(v) => (
                        v.iter()
                            .map(|&b| half::f16::from_bits(b).to_f32())
                            .collect(),
                        vec![],
                    ),
                    Rows::I8 { q, scales } => {
                        let mut v = vec![0f32; q.len()];
                        for (j, &scale) in scales.iter().enumerate().take(PAGE) {
                            for d in 0..8 {
                                let i = if keys {
                                    key_index_i8(j, d, 8)
                                } else {
                                    value_index(j, d, 8, PAGE)
                                };
                                v[i] = q[i] as f32 * scale;
                            }
                        }
                        (v, scales.to_vec())
                    }
                }
            };
            // Within rounding: exact for f32, f16's rounding, half an int8 step of the row's scale.
            let close = |got: f32, want: f32, scale: f32| match format {
                KvFormat::F32 => got == want,
                KvFormat::F16 => got == half::f16::from_f32(want).to_f32(),
                KvFormat::I8 => (got - want).abs() <= scale * 0.5 + 1e-4,
            };
            for head in 0..2 {
                for page in 0..2 {
                    let (k, ks) = stored(view.keys(head, page), true);
                    let (v, vs) = stored(view.values(head, page), false);
                    assert_eq!((k.len(), v.len()), (PAGE * 8, PAGE * 8));
                    for r in 0..view.rows_in(page) {
                        let pos = page * PAGE + r;
                        let (sk, sv) = (ks.get(r).copied(), vs.get(r).copied());
                        for d in 0..8 {
                            let i = (pos * 2 + head) * 8 + d;
                            let got = k[match format {
                                KvFormat::I8 => key_index_i8(r, d, 8),
                                _ => key_index(r, d, 8),
                            }];
                            assert!(
                                close(got, keys[i], sk.unwrap_or(0.0)),
                                "{format} key {pos} {d}: {got} for {}",
                                keys[i]
                            );
                            let got = v[value_index(r, d, 8, PAGE)];
                            assert!(
                                close(got, values[i], sv.unwrap_or(0.0)),
                                "{format} value {pos} {d}: {got} for {}",
                                values[i]
                            );
                        }
                    }
                }
            }
            // A view taken earlier still sees only what was there then.
            assert_eq!(old.len(), 50);
            assert_eq!(old.rows_in(0), 50);
            assert_eq!(old.rows_in(1), 0);
        }
    }

    #[test]
    fn formats_have_names_and_sizes() {
        assert_eq!(KvFormat::parse("f16"), Some(KvFormat::F16));
        assert_eq!(KvFormat::parse("int4"), None);
        let s = KvShape {
            kv_heads: 5,
            head_dim: 128,
            format: KvFormat::F16,
        };
        assert_eq!(s.bytes_per_position(), 2 * 5 * 128 * 2);
        let i8 = KvShape {
            format: KvFormat::I8,
            ..s
        };
        assert_eq!(i8.bytes_per_position(), 2 * 5 * (128 + 4));
        assert_eq!(KvFormat::parse("i8"), Some(KvFormat::I8));
    }
}
