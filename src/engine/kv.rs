//! The KV cache of one attention layer of one session: keys and values in pages of [`PAGE`] positions, stored as
//! f32 or f16 ([`KvFormat`]), appended in place (nothing is ever copied or regrown) and read a page at a time.
//!
//! A page holds, for each KV head, `PAGE` rows of `head_dim` keys, then the same for values, so that one head's
//! keys over a page are contiguous. Attention jobs read the cache through a [`KvView`], a snapshot of the pages
//! and the length; pages are shared by `Arc`, so a view taken by a job that outlives its step (see
//! `crate::team`) keeps what it reads alive. The cache only ever writes positions at or past its length, which
//! no view reads, so appending never races with readers.

use std::cell::UnsafeCell;
use std::sync::Arc;

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
    #[default]
    F16,
}

impl KvFormat {
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvFormat::F32 => 4,
            KvFormat::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvFormat::F32 => "f32",
            KvFormat::F16 => "f16",
        }
    }

    /// The format named `name` (`f32` or `f16`).
    pub fn parse(name: &str) -> Option<KvFormat> {
        [KvFormat::F32, KvFormat::F16]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

impl std::fmt::Display for KvFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

enum Values {
    F32(Box<[f32]>),
    F16(Box<[u16]>),
}

/// One page of keys and values.
struct Page {
    data: UnsafeCell<Values>,
}

// SAFETY: the cache writes only positions at or past its length, views read only positions below the length
// they were taken at, and a page's allocation never changes after creation (see the module docs).
unsafe impl Sync for Page {}
unsafe impl Send for Page {}

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

    /// Offset of (key or value, head, row) inside a page.
    fn offset(&self, value: bool, head: usize, row: usize) -> usize {
        let half = self.kv_heads * PAGE * self.head_dim;
        usize::from(value) * half + (head * PAGE + row) * self.head_dim
    }

    /// Bytes one position takes in one layer (keys and values of every KV head).
    pub fn bytes_per_position(&self) -> usize {
        2 * self.kv_heads * self.head_dim * self.format.bytes()
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
        self.pages.len() * self.shape.page_values() * self.shape.format.bytes()
    }

    /// Appends `n` positions: `keys` and `values` are `n` rows of `kv_heads * head_dim` values each, head-major
    /// inside a row (as the projections produce them).
    pub fn append(&mut self, keys: &[f32], values: &[f32], n: usize) {
        let (kvh, hd) = (self.shape.kv_heads, self.shape.head_dim);
        assert!(keys.len() == n * kvh * hd && values.len() == n * kvh * hd);
        for t in 0..n {
            let pos = self.len + t;
            let (page, row) = (pos / PAGE, pos % PAGE);
            while self.pages.len() <= page {
                self.pages.push(Arc::new(new_page(self.shape)));
            }
            let p = &self.pages[page];
            for h in 0..kvh {
                for (value, src) in [(false, keys), (true, values)] {
                    let src = &src[(t * kvh + h) * hd..(t * kvh + h + 1) * hd];
                    let off = self.shape.offset(value, h, row);
                    // SAFETY: position `pos` is at or past `len`, so no view reads it (module docs); the range is
                    // inside the page (`offset` of a row below PAGE, `hd` values).
                    unsafe {
                        match &mut *p.data.get() {
                            Values::F32(v) => {
                                std::slice::from_raw_parts_mut(v.as_mut_ptr().add(off), hd)
                                    .copy_from_slice(src)
                            }
                            Values::F16(v) => f16::from_f32(
                                src,
                                std::slice::from_raw_parts_mut(v.as_mut_ptr().add(off), hd),
                            ),
                        }
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
        let pages = self
            .pages
            .iter()
            .map(|p| {
                // SAFETY: read only; writes need `&mut self`, which a shared borrow rules out.
                let data = unsafe {
                    match &*p.data.get() {
                        Values::F32(v) => Values::F32(v.clone()),
                        Values::F16(v) => Values::F16(v.clone()),
                    }
                };
                Arc::new(Page {
                    data: UnsafeCell::new(data),
                })
            })
            .collect();
        KvCache {
            shape: self.shape,
            pages,
            len: self.len,
        }
    }
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvCache({} positions, {:?})", self.len, self.shape)
    }
}

fn new_page(shape: KvShape) -> Page {
    let n = shape.page_values();
    Page {
        data: UnsafeCell::new(match shape.format {
            KvFormat::F32 => Values::F32(vec![0f32; n].into_boxed_slice()),
            KvFormat::F16 => Values::F16(vec![0u16; n].into_boxed_slice()),
        }),
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

    /// Keys (`value == false`) or values of KV head `head` over the visible rows of page `page`, as f32 rows of
    /// `head_dim`: borrowed from an f32 cache, converted into `scratch` (`PAGE * head_dim` values) from f16.
    pub fn rows<'a>(
        &'a self,
        value: bool,
        head: usize,
        page: usize,
        scratch: &'a mut [f32],
    ) -> &'a [f32] {
        let n = self.rows_in(page) * self.shape.head_dim;
        let off = self.shape.offset(value, head, 0);
        // SAFETY: rows below `len` are never written again (module docs); the range lies in the page.
        unsafe {
            match &*self.pages[page].data.get() {
                Values::F32(v) => std::slice::from_raw_parts(v.as_ptr().add(off), n),
                Values::F16(v) => {
                    let src = std::slice::from_raw_parts(v.as_ptr().add(off), n);
                    f16::to_f32(src, &mut scratch[..n]);
                    &scratch[..n]
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
        for format in [KvFormat::F32, KvFormat::F16] {
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
            assert_eq!(c.bytes(), 2 * shape.page_values() * format.bytes());
            let view = c.view();
            let (keys, values) = ([k1, k2].concat(), [v1, v2].concat());
            let mut scratch = vec![0f32; PAGE * 8];
            for head in 0..2 {
                for page in 0..2 {
                    for (value, src) in [(false, &keys), (true, &values)] {
                        let got = view.rows(value, head, page, &mut scratch).to_vec();
                        assert_eq!(got.len(), view.rows_in(page) * 8);
                        for (r, row) in got.chunks(8).enumerate() {
                            let pos = page * PAGE + r;
                            let want = &src[(pos * 2 + head) * 8..(pos * 2 + head + 1) * 8];
                            for (&g, &w) in row.iter().zip(want) {
                                let w = match format {
                                    KvFormat::F32 => w,
                                    KvFormat::F16 => half::f16::from_f32(w).to_f32(),
                                };
                                assert_eq!(g, w, "{format} {pos}");
                            }
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
    }
}
