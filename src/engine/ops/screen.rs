//! The screened output layer: the int8 output layer (`Int8LinearNorm`) read as a 4-bit screen over every row,
//! then an exact product for the few rows that can hold the largest logit.
//!
//! The output layer is the largest matrix a decode step reads (vocabulary × hidden; 328 MB of the 860 MB a
//! 2B-4T token reads). At load its int8 rows are split into two 4-bit planes ([`crate::kernels::planes`]). Each
//! step then:
//! 1. estimates every logit from the high plane (half the bytes), the low nibbles taken at their row mean;
//! 2. computes the [`SEEDS`] best estimates exactly: the largest of those exact logits is a floor under the
//!    largest logit of all;
//! 3. keeps as candidates the rows whose estimate, raised by `z` standard deviations of its error, reaches that
//!    floor ([`candidates`]), computes them exactly from their int8 rows and writes every exact logit over its
//!    estimate.
//!
//! Only the high plane is resident (half the int8 layer: 164 MB of 328 on 2B-4T). The int8 rows of the
//! candidates, about a hundred a step, are read from the data file with `pread` (their pages stay in the page
//! cache, shared and reclaimable, as the embedding's rows do), or from the mapping of a mapped model.
//!
//! Every exact logit is bit-identical to the plain int8 layer's. A row left out has an exact logit below the
//! floor unless its error exceeds `z` standard deviations; the error is a sum of the activations times
//! independent bounded noise, sub-Gaussian with the row's deviation, so `z` is chosen for a chance below
//! [`MISS_PROBABILITY`] per step over the whole vocabulary ([`margin`]). Greedy decoding is therefore the int8
//! layer's. Sampling sees exact logits for every token within `z` deviations of the top and the estimate, off
//! by about one deviation, for the rest.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tract_onnx::tract_hir::internal::*;

use crate::engine::weights::{WeightResidency, Weights};
use crate::kernels::act::QRowLayout;
use crate::kernels::{planes, Kernel};
use crate::team::{self, Job, Region, RegionMut};

/// The chance, per step, that some row's estimate is off by more than the margin (see the module docs).
pub const MISS_PROBABILITY: f64 = 1e-12;

/// Rows computed exactly first, for the floor.
pub const SEEDS: usize = 4;

/// Rows per chunk of the screen; candidates per chunk of the exact pass.
const SCREEN_CHUNK: usize = 512;
const EXACT_CHUNK: usize = 64;
/// Rows split per read while building the planes.
const BUILD_ROWS: usize = 256;

/// How the int8 output layer runs.
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
pub enum OutputLayer {
    /// A 4-bit screen over every row, exact products for the candidates (see the module docs).
    #[default]
    Screened,
    /// The int8 product of every row.
    Exact,
}

impl OutputLayer {
    pub fn name(self) -> &'static str {
        match self {
            OutputLayer::Screened => "screened",
            OutputLayer::Exact => "exact",
        }
    }

    pub fn parse(name: &str) -> Option<OutputLayer> {
        [OutputLayer::Screened, OutputLayer::Exact]
            .into_iter()
            .find(|o| o.name() == name)
    }
}

/// The screen's margin in standard deviations for `rows` rows: a sub-Gaussian error passes `z` deviations with
/// a chance below `2·exp(-z²/2)`, so `z = sqrt(2·ln(2·rows / MISS_PROBABILITY))` keeps the union over all rows
/// below [`MISS_PROBABILITY`] (about 9 for a vocabulary of 128k).
pub fn margin(rows: usize) -> f32 {
    (2.0 * (2.0 * rows.max(1) as f64 / MISS_PROBABILITY).ln()).sqrt() as f32
}

/// Appends to `out` the rows that can hold a value of at least `floor`, given each row's estimate and the
/// standard deviation of its error: row `v` is kept when `estimates[v] + z·sigma(v) >= floor`. If every error is
/// within `z·sigma`, every row left out is below `floor`. Estimates that are not numbers are kept (the exact pass
/// decides them).
pub fn candidates(
    estimates: &[f32],
    sigma: impl Fn(usize) -> f32,
    z: f32,
    floor: f32,
    out: &mut Vec<u32>,
) {
    out.extend(
        estimates
            .iter()
            .enumerate()
            .filter(|&(v, &e)| e.is_nan() || e + z * sigma(v) >= floor)
            .map(|(v, _)| v as u32),
    );
}

/// The `n` rows with the largest estimates (fewer if there are fewer rows), ignoring those that are not numbers.
pub fn best_estimates(estimates: &[f32], n: usize) -> Vec<u32> {
    // Sorted, largest first; most rows fail the first comparison against the smallest kept.
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    for (v, &e) in estimates.iter().enumerate() {
        if n == 0 || e.is_nan() || (best.len() == n && e <= best[n - 1].0) {
            continue;
        }
        let at = best.partition_point(|&(b, _)| b >= e);
        best.insert(at, (e, v as u32));
        best.truncate(n);
    }
    best.into_iter().map(|(_, v)| v).collect()
}

/// Where the int8 rows of candidates come from.
enum ExactRows {
    /// Read with `pread` from the data file: nothing resident in the process.
    File(Arc<Weights>),
    /// The mapped data file (only the candidates' pages are ever touched).
    Mapped(Arc<Weights>),
}

/// The planes of one int8 output layer, built at load.
pub struct Planes {
    high: Arc<Weights>,
    exact: ExactRows,
    stats: Vec<planes::RowStats>,
    rows: usize,
    k: usize,
    /// Each row's error deviation per unit of activation spread (`sd · scale`), set at the first step.
    noise: OnceLock<Vec<f32>>,
    /// Set once a candidate's row could not be read (logged once).
    read_failed: AtomicBool,
    /// Steps screened and rows computed exactly, for benchmarks and `status`.
    steps: AtomicU64,
    rescored: AtomicU64,
}

impl std::fmt::Debug for Planes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Planes({}×{})", self.rows, self.k)
    }
}

impl Planes {
    /// Splits the `rows × k` int8 weights of `source` (a `pread` handle, so the int8 copy is never resident):
    /// the high plane into anonymous memory, the row statistics from the low nibbles. Candidates' rows are
    /// later read from `mapped` when the model is mapped, else from `source`.
    pub fn build(
        source: Arc<Weights>,
        mapped: Option<Arc<Weights>>,
        rows: usize,
        k: usize,
    ) -> std::io::Result<Planes> {
        assert_eq!(source.len(), rows * k, "int8 weights of {rows}×{k}");
        let rb = planes::plane_row_bytes(k);
        let mut high = Weights::anonymous(rows * rb)?;
        let mut low = vec![0u8; BUILD_ROWS * rb];
        let mut buf = vec![0u8; BUILD_ROWS * k];
        let mut stats = Vec::with_capacity(rows);
        for r0 in (0..rows).step_by(BUILD_ROWS) {
            let n = BUILD_ROWS.min(rows - r0);
            let chunk = &mut buf[..n * k];
            source.read_at(r0 * k, chunk)?;
            // SAFETY: i8 and u8 have the same layout.
            let w = unsafe { std::slice::from_raw_parts(chunk.as_ptr() as *const i8, chunk.len()) };
            let hi = &mut high.bytes_mut().expect("anonymous")[r0 * rb..(r0 + n) * rb];
            stats.extend(planes::split(w, k, hi, &mut low[..n * rb]));
        }
        Ok(Planes {
            high: Arc::new(high),
            exact: match mapped {
                Some(m) => ExactRows::Mapped(m),
                None => ExactRows::File(source),
            },
            stats,
            rows,
            k,
            noise: OnceLock::new(),
            read_failed: AtomicBool::new(false),
            steps: AtomicU64::new(0),
            rescored: AtomicU64::new(0),
        })
    }

    /// How the candidates' rows are read.
    pub fn residency(&self) -> WeightResidency {
        match self.exact {
            ExactRows::File(_) => WeightResidency::Loaded,
            ExactRows::Mapped(_) => WeightResidency::Mapped,
        }
    }

    /// Bytes held in memory: the high plane and the row statistics.
    pub fn resident_bytes(&self) -> usize {
        self.screen_bytes()
    }

    /// Bytes the screen reads every step (the high plane and the row statistics), before the candidates.
    pub fn screen_bytes(&self) -> usize {
        self.high.len() + self.stats.len() * std::mem::size_of::<planes::RowStats>()
    }

    /// Bytes one candidate's exact product reads (its int8 row).
    pub fn candidate_bytes(&self) -> usize {
        self.k
    }

    /// Steps screened and rows computed exactly since load.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.steps.load(Ordering::Relaxed),
            self.rescored.load(Ordering::Relaxed),
        )
    }

    /// Each row's `sd · scale` for the op's row scales (one op owns the planes, so one `scale`).
    fn noise(&self, scale: &[f32]) -> &[f32] {
        self.noise.get_or_init(|| {
            self.stats
                .iter()
                .zip(scale)
                .map(|(s, &w)| s.sd * w.abs())
                .collect()
        })
    }

    fn high_row(&self, r: usize) -> &[u8] {
        let rb = planes::plane_row_bytes(self.k);
        &self.high.bytes()[r * rb..(r + 1) * rb]
    }

    /// `Σ w·x` of row `r`, exactly, from its int8 row (`buf` holds `k` bytes for a row read from the file).
    fn exact(&self, kernel: Kernel, r: usize, x: &[i8], buf: &mut [u8]) -> std::io::Result<i32> {
        let k = self.k;
        let row: &[u8] = match &self.exact {
            ExactRows::Mapped(w) => &w.bytes()[r * k..(r + 1) * k],
            ExactRows::File(w) => {
                w.read_at(r * k, &mut buf[..k])?;
                &buf[..k]
            }
        };
        // SAFETY: i8 and u8 have the same layout.
        let row = unsafe { std::slice::from_raw_parts(row.as_ptr() as *const i8, k) };
        // SAFETY: the kernel was checked at load; both rows have `k` values.
        Ok(unsafe { kernel.int8_dot(row, [&x[..k]]) }[0])
    }
}

/// One quantized activation row, as the screen reads it.
#[derive(Clone, Copy)]
struct Token {
    xsum: i32,
    /// The inverse activation scale.
    inv: f32,
    /// `‖x‖₂ · inv`: a row's error deviation in logits is `sd · scale · this`.
    spread: f32,
}

/// Runs the screened layer on quantized rows `q` (`tokens` rows in `layout`), with per-row weight `scale`:
/// the logits `[tokens, rows]` as the module docs describe.
pub(super) fn run(
    planes: &Arc<Planes>,
    kernel: Kernel,
    scale: &Arc<[f32]>,
    q: TValue,
    layout: QRowLayout,
    tokens: usize,
) -> TractResult<Tensor> {
    let n = planes.rows;
    let info: Vec<Token> = {
        let plain = q.try_as_plain_ram()?;
        let data = plain.as_slice::<i8>()?;
        data.chunks(layout.stride())
            .take(tokens)
            .map(|r| {
                let inv = 1.0 / layout.scale(r);
                let norm = layout
                    .values(r)
                    .iter()
                    .map(|&v| (v as i32 * v as i32) as f32)
                    .sum::<f32>()
                    .sqrt();
                Token {
                    xsum: layout.sum(r),
                    inv,
                    spread: norm * inv,
                }
            })
            .collect()
    };
    let step = Arc::new(Step {
        planes: planes.clone(),
        kernel,
        scale: scale.clone(),
        q,
        layout,
        info,
    });
    let job = Screen { step: step.clone() };
    // SAFETY: the screen writes every value.
    let out = unsafe { Tensor::uninitialized::<f32>(&[tokens, n])? };
    let mut logits = team::run(job, out);
    let z = margin(n);
    let noise = planes.noise(scale);
    let mut picked: Vec<(u32, u32, f32)> = Vec::new();
    {
        let qp = step.q.try_as_plain_ram()?;
        let data = qp.as_slice::<i8>()?;
        let mut lp = logits.try_as_plain_ram_mut()?;
        let all = lp.as_slice_mut::<f32>()?;
        let mut rows = Vec::new();
        let mut buf = vec![0u8; planes.k];
        for (t, tok) in step.info.iter().enumerate() {
            let est = &mut all[t * n..(t + 1) * n];
            let seeds = best_estimates(est, SEEDS);
            let mut floor = f32::NEG_INFINITY;
            let exact = seeds
                .iter()
                .map(|&v| step.exact(data, t, v as usize, &mut buf))
                .collect::<std::io::Result<Vec<f32>>>()
                .context("reading the output layer's rows")?;
            for (&v, &y) in seeds.iter().zip(&exact) {
                floor = floor.max(y);
                // Marks the seed as decided: no estimate reaches infinity.
                est[v as usize] = f32::NEG_INFINITY;
            }
            rows.clear();
            candidates(est, |v| noise[v] * tok.spread, z, floor, &mut rows);
            for (&v, &y) in seeds.iter().zip(&exact) {
                est[v as usize] = y;
            }
            picked.extend(rows.iter().map(|&v| (t as u32, v, est[v as usize])));
            planes
                .rescored
                .fetch_add((seeds.len() + rows.len()) as u64, Ordering::Relaxed);
        }
    }
    planes.steps.fetch_add(tokens as u64, Ordering::Relaxed);
    if picked.is_empty() {
        return Ok(logits);
    }
    let count = picked.len();
    let picked: Arc<[(u32, u32, f32)]> = picked.into();
    let job = Rescore {
        step,
        picked: picked.clone(),
    };
    // SAFETY: the exact pass writes every value.
    let out = unsafe { Tensor::uninitialized::<f32>(&[count])? };
    let exact = team::run(job, out);
    let plain = exact.try_as_plain_ram()?;
    let exact = plain.as_slice::<f32>()?;
    let mut dst = logits.try_as_plain_ram_mut()?;
    let all = dst.as_slice_mut::<f32>()?;
    for (&(t, v, _), &y) in picked.iter().zip(exact) {
        all[t as usize * n + v as usize] = y;
    }
    Ok(logits)
}

/// What both passes of one step read: the planes, the weight scales, the quantized rows and their tokens.
struct Step {
    planes: Arc<Planes>,
    kernel: Kernel,
    scale: Arc<[f32]>,
    q: TValue,
    layout: QRowLayout,
    info: Vec<Token>,
}

impl Step {
    /// The quantized values of token `t` among the rows `data` (of `q`).
    fn values<'a>(&self, data: &'a [i8], t: usize) -> &'a [i8] {
        let stride = self.layout.stride();
        self.layout.values(&data[t * stride..(t + 1) * stride])
    }

    /// Row `v`'s exact logit for token `t`: the plain int8 layer's epilogue, operation for operation.
    fn exact(&self, data: &[i8], t: usize, v: usize, buf: &mut [u8]) -> std::io::Result<f32> {
        let acc = self
            .planes
            .exact(self.kernel, v, self.values(data, t), buf)?;
        Ok(acc as f32 * self.info[t].inv * self.scale[v])
    }
}

/// The screen: a chunk per range of rows, every token.
struct Screen {
    step: Arc<Step>,
}

// SAFETY: chunk `c` writes rows `c*SCREEN_CHUNK..` of every token: a partition of `[tokens, rows]`.
unsafe impl Job for Screen {
    type Out = f32;

    fn chunks(&self) -> usize {
        self.step.planes.rows.div_ceil(SCREEN_CHUNK)
    }

    fn region(&self, c: usize) -> Region {
        let n = self.step.planes.rows;
        let r0 = c * SCREEN_CHUNK;
        Region {
            offset: r0,
            len: SCREEN_CHUNK.min(n - r0),
            stride: n,
            count: self.step.info.len(),
        }
    }

    fn compute(&self, c: usize, out: &mut RegionMut<'_, f32>) {
        let s = &*self.step;
        let r0 = c * SCREEN_CHUNK;
        let r1 = (r0 + SCREEN_CHUNK).min(s.planes.rows);
        let plain = s.q.try_as_plain_ram().expect("plain rows");
        let data = plain.as_slice::<i8>().expect("int8 rows");
        for (t, tok) in s.info.iter().enumerate() {
            let x = s.values(data, t);
            let dst = out.run(t);
            for r in r0..r1 {
                // SAFETY: the kernel was checked at load; the row and `x` have the plane sizes.
                let h = unsafe { s.kernel.nibble_dot(s.planes.high_row(r), x) };
                let est = planes::estimate(h, tok.xsum, s.planes.stats[r].mean);
                dst[r - r0] = est * tok.inv * s.scale[r];
            }
        }
    }
}

/// The exact pass over the candidates: a chunk per run of [`EXACT_CHUNK`] of them.
struct Rescore {
    step: Arc<Step>,
    /// (token, row, estimate).
    picked: Arc<[(u32, u32, f32)]>,
}

// SAFETY: chunk `c` writes candidates `c*EXACT_CHUNK..`, which partition the output.
unsafe impl Job for Rescore {
    type Out = f32;

    fn chunks(&self) -> usize {
        self.picked.len().div_ceil(EXACT_CHUNK)
    }

    fn region(&self, c: usize) -> Region {
        let i0 = c * EXACT_CHUNK;
        Region::contiguous(i0, EXACT_CHUNK.min(self.picked.len() - i0))
    }

    fn compute(&self, c: usize, out: &mut RegionMut<'_, f32>) {
        let i0 = c * EXACT_CHUNK;
        let s = &*self.step;
        let plain = s.q.try_as_plain_ram().expect("plain rows");
        let data = plain.as_slice::<i8>().expect("int8 rows");
        let mut buf = vec![0u8; s.planes.k];
        let dst = out.run(0);
        for (d, &(t, v, estimate)) in dst.iter_mut().zip(&self.picked[i0..]) {
            let v = v as usize;
            // A row the file cannot give (a disk error under a running daemon) keeps its estimate: the job
            // cannot fail, and the estimate is within the screen's error of it.
            *d = match s.exact(data, t as usize, v, &mut buf) {
                Ok(y) => y,
                Err(e) => {
                    if !s.planes.read_failed.swap(true, Ordering::Relaxed) {
                        log::error!(
                            "reading the output layer's row {v}: {e}; its estimate stands in"
                        );
                    }
                    estimate
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_grows_slowly_with_the_vocabulary() {
        assert!((margin(128_256) - 8.96).abs() < 0.05, "{}", margin(128_256));
        assert!(margin(1000) < margin(128_256) && margin(1000) > 7.5);
    }

    #[test]
    fn every_row_that_can_reach_the_floor_is_a_candidate() {
        let est = [1.0, 5.0, 4.2, 3.9, -2.0];
        let mut out = vec![];
        // sigma 0.1, z 2: a row is kept from 4.6 up.
        candidates(&est, |_| 0.1, 2.0, 4.8, &mut out);
        assert_eq!(out, [1]);
        out.clear();
        // sigma 0.3: kept from 3.8 up.
        candidates(&est, |_| 0.3, 2.0, 4.4, &mut out);
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn a_noisier_row_reaches_further() {
        let est = [5.0, 3.0, 3.0];
        let mut out = vec![];
        candidates(&est, |v| if v == 2 { 1.0 } else { 0.1 }, 1.0, 4.0, &mut out);
        assert_eq!(out, [0, 2]);
    }

    #[test]
    fn the_best_estimates_come_largest_first() {
        let est = [0.5, 3.0, f32::NAN, -1.0, 3.0, 2.0];
        assert_eq!(best_estimates(&est, 3), [1, 4, 5]);
        assert_eq!(best_estimates(&est, 10), [1, 4, 5, 0, 3]);
        assert!(best_estimates(&est, 0).is_empty());
        assert!(best_estimates(&[], 2).is_empty());
    }

    /// Gaussian-like int8 rows (the shape of a quantized output layer) and activations with a few outliers, as
    /// LLM hidden states have: over many steps, the row with the largest exact product is always a candidate,
    /// and the candidates are a small share of the rows.
    #[test]
    fn the_largest_exact_row_is_always_a_candidate_and_few_others_are() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (rows, k) = (4096, 256);
        let mut gauss = |sd: f64| {
            // Sum of four uniforms: close enough to a normal for a weight distribution.
            let u: f64 = (0..4)
                .map(|_| (next() >> 11) as f64 / (1u64 << 53) as f64)
                .sum();
            (u - 2.0) * sd * 3f64.sqrt()
        };
        let w: Vec<i8> = (0..rows * k)
            .map(|_| gauss(30.0).round().clamp(-127.0, 127.0) as i8)
            .collect();
        let rb = planes::plane_row_bytes(k);
        let (mut hi, mut lo) = (vec![0u8; rows * rb], vec![0u8; rows * rb]);
        let stats = planes::split(&w, k, &mut hi, &mut lo);
        let z = margin(rows);
        let mut total = 0;
        for step in 0..50 {
            let mut x = vec![0i8; planes::padded_len(k)];
            for (j, v) in x.iter_mut().take(k).enumerate() {
                let sd = if j % 61 == step % 61 { 100.0 } else { 12.0 };
                *v = gauss(sd).round().clamp(-127.0, 127.0) as i8;
            }
            let xsum: i32 = x.iter().map(|&v| v as i32).sum();
            let norm = x.iter().map(|&v| (v as f32).powi(2)).sum::<f32>().sqrt();
            let (mut est, mut exact) = (vec![0f32; rows], vec![0i32; rows]);
            for r in 0..rows {
                let h = planes::nibble_dot(Kernel::Scalar, &hi[r * rb..(r + 1) * rb], &x);
                let l = planes::nibble_dot(Kernel::Scalar, &lo[r * rb..(r + 1) * rb], &x);
                est[r] = planes::estimate(h, xsum, stats[r].mean);
                exact[r] = planes::exact(h, l, xsum);
            }
            let seeds = best_estimates(&est, SEEDS);
            let floor = seeds.iter().map(|&v| exact[v as usize]).max().unwrap() as f32;
            let mut picked = vec![];
            candidates(&est, |v| stats[v].sd * norm, z, floor, &mut picked);
            picked.extend(&seeds);
            let top = (0..rows).max_by_key(|&r| exact[r]).unwrap() as u32;
            assert!(picked.contains(&top), "step {step}: row {top} left out");
            total += picked.len();
        }
        // Noise at 15% of the rows' spread and z = 8.6: about 6% of 4096 Gaussian rows reach the floor.
        let share = total as f64 / (50 * rows) as f64;
        assert!(
            share < 0.1,
            "{:.1}% of the rows are candidates",
            share * 100.0
        );
    }

    #[test]
    fn estimates_that_are_not_numbers_are_kept() {
        let mut out = vec![];
        candidates(&[f32::NAN, 1.0, -9.0], |_| 0.1, 1.0, 0.5, &mut out);
        assert_eq!(out, [0, 1]);
    }
}
