//! `KvAttention`: rotate-half RoPE on queries and keys, the layer's KV cache (the op's state, see
//! [`crate::engine::kv`]), and causal softmax attention with grouped KV heads, for `S` new tokens at once.
//!
//! ONNX inputs `QKV [1, S, (heads + 2 kv_heads) head_dim]` (the fused projection), `position_ids [1, S]`,
//! `attention_mask [1, past + S]`, `inv_freq [head_dim / 2]`, and the past keys and values; outputs
//! `Y [1, S, heads head_dim]` and the present keys and values. The loader removes the past and present tensors:
//! here the cache is state. Positions must continue the cache (`past..past + S`) and the mask must be all ones
//! (one sequence, no padding), which is what a session sends; anything else is an error, not a silent change of
//! meaning.
//!
//! The work is a team job. Decoding a few tokens, each chunk takes one KV head and a range of cache pages
//! (flash-decoding) and the partial softmax states are merged on the calling thread; for a prompt, each chunk
//! takes one KV head and a block of query tokens over the whole cache and writes its output directly. Either
//! way each chunk reads its keys and values once, a page at a time, for every query head of the group.

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::ATTR_KV_FORMAT;
use crate::engine::kv::{KvCache, KvFormat, KvShape, KvView, PAGE};
use crate::kernels::attention::{self as attn, Page, Queries, Softmax, QUERY_TILE};
use crate::kernels::Kernel;
use crate::team::{self, Job, Region, RegionMut};

/// Query tokens per chunk when attending for a prompt.
const QUERY_BLOCK: usize = 16;
/// Up to this many new tokens, chunks split the cache instead of the queries.
const DECODE_TOKENS: usize = 4;

pub(crate) fn parse(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let heads: usize = node.get_attr("heads")?;
    let kv_heads: usize = node.get_attr("kv_heads")?;
    let head_dim: usize = node.get_attr("head_dim")?;
    let scale: f32 = node.get_attr("scale")?;
    ensure!(
        heads > 0 && kv_heads > 0 && heads.is_multiple_of(kv_heads) && head_dim.is_multiple_of(2),
        "{}: {heads} heads over {kv_heads} KV heads of {head_dim}",
        node.name
    );
    let format: String = node
        .get_attr(ATTR_KV_FORMAT)
        .with_context(|| format!("{}: not prepared by bitnetd's loader", node.name))?;
    let format = KvFormat::parse(&format).with_context(|| format!("KV format {format:?}"))?;
    let kernel = Kernel::from_env().map_err(|e| format_err!(e))?;
    Ok((
        expand(AttentionExpansion(Config {
            heads,
            kv_heads,
            head_dim,
            scale,
            format,
            kernel,
            inv_freq: Arc::from(vec![]),
        })),
        vec![],
    ))
}

#[derive(Debug, Clone, PartialEq)]
struct Config {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    format: KvFormat,
    /// Picks the attention kernels' path, as it picks the linears'.
    kernel: Kernel,
    inv_freq: Arc<[f32]>,
}

impl Config {
    fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

#[derive(Debug, Clone)]
struct AttentionExpansion(Config);

impl Expansion for AttentionExpansion {
    fn name(&self) -> StaticName {
        super::ATTENTION.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        let c = &self.0;
        check_input_arity(inputs, 4)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, 3)?;
        s.equals(&inputs[0].shape[2], c.qkv_width().to_dim())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, 3)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[1], &inputs[0].shape[1])?;
        s.equals(&outputs[0].shape[2], (c.heads * c.head_dim).to_dim())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let f = model
            .outlet_fact(inputs[3])?
            .konst
            .clone()
            .with_context(|| format!("{prefix}: inv_freq must be a constant"))?;
        let f = f.cast_to::<f32>()?;
        let plain = f.try_as_plain_ram()?;
        let inv_freq = plain.as_slice::<f32>()?;
        ensure!(
            inv_freq.len() == self.0.head_dim / 2,
            "{prefix}: {} inverse frequencies for head_dim {}",
            inv_freq.len(),
            self.0.head_dim
        );
        let op = KvAttention(Config {
            inv_freq: inv_freq.into(),
            ..self.0.clone()
        });
        model.wire_node(prefix, op, &inputs[..3])
    }
}

/// The op (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct KvAttention(Config);

impl Eq for KvAttention {}

impl KvAttention {
    /// How the cache stores keys and values.
    pub fn format(&self) -> KvFormat {
        self.0.format
    }

    /// The cache's shape.
    pub fn shape(&self) -> KvShape {
        KvShape {
            kv_heads: self.0.kv_heads,
            head_dim: self.0.head_dim,
            format: self.0.format,
        }
    }
}

impl Op for KvAttention {
    fn name(&self) -> StaticName {
        super::ATTENTION.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let c = &self.0;
        Ok(vec![format!(
            "{} heads, {} KV heads of {}, {} cache",
            c.heads, c.kv_heads, c.head_dim, c.format
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for KvAttention {
    not_out_of_plan!();

    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(AttentionState {
            cache: KvCache::new(self.shape()),
        })))
    }
}

impl TypedOp for KvAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        shape[2] = (self.0.heads * self.0.head_dim).into();
        Ok(tvec!(f32::fact(&shape)))
    }

    as_op!();
}

/// A layer's cache within one session.
#[derive(Debug, Clone)]
struct AttentionState {
    cache: KvCache,
}

impl OpState for AttentionState {
    fn eval(
        &mut self,
        _ctx: &EvalContext,
        op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let op = op
            .downcast_ref::<KvAttention>()
            .context("KvAttention state on another op")?;
        let c = &op.0;
        let (qkv, positions, mask) = (&inputs[0], &inputs[1], &inputs[2]);
        let tokens = qkv.shape()[1];
        let cache = &mut self.cache;
        let past = cache.len();
        let pos = positions.cast_to::<i64>()?;
        let pos_plain = pos.try_as_plain_ram()?;
        let pos = pos_plain.as_slice::<i64>()?;
        ensure!(
            pos.iter().enumerate().all(|(t, &p)| p == (past + t) as i64),
            "position_ids must continue the cache ({past}..{}), got {pos:?}",
            past + tokens
        );
        let m = mask.cast_to::<i64>()?;
        let m_plain = m.try_as_plain_ram()?;
        let m = m_plain.as_slice::<i64>()?;
        ensure!(
            m.len() == past + tokens && m.iter().all(|&v| v == 1),
            "attention_mask must be {} ones (one sequence, no padding)",
            past + tokens
        );
        let plain = qkv.try_as_plain_ram()?;
        let qkv = plain.as_slice::<f32>()?;
        let (hd, h, kvh) = (c.head_dim, c.heads, c.kv_heads);
        let width = c.qkv_width();
        let mut q = vec![0f32; tokens * h * hd];
        let mut k = vec![0f32; tokens * kvh * hd];
        let mut v = vec![0f32; tokens * kvh * hd];
        let (mut cos, mut sin) = (vec![0f32; hd / 2], vec![0f32; hd / 2]);
        for t in 0..tokens {
            let p = (past + t) as f32;
            for (i, &f) in c.inv_freq.iter().enumerate() {
                let a = p * f;
                cos[i] = a.cos();
                sin[i] = a.sin();
            }
            let row = &qkv[t * width..(t + 1) * width];
            let (qs, rest) = row.split_at(h * hd);
            let (ks, vs) = rest.split_at(kvh * hd);
            for (src, dst) in qs.chunks(hd).zip(q[t * h * hd..].chunks_mut(hd)) {
                rope(src, &cos, &sin, dst);
            }
            for (src, dst) in ks.chunks(hd).zip(k[t * kvh * hd..].chunks_mut(hd)) {
                rope(src, &cos, &sin, dst);
            }
            v[t * kvh * hd..(t + 1) * kvh * hd].copy_from_slice(vs);
        }
        cache.append(&k, &v, tokens);
        let view = cache.view();
        let batch = qkv_shape0(&inputs[0]);
        let inputs = Inputs {
            c: c.clone(),
            q: q.into(),
            view,
            past,
        };
        let out_shape = [batch, tokens, h * hd];
        let y = if tokens <= DECODE_TOKENS {
            let pages = inputs.view.len().div_ceil(PAGE);
            // By the team's size, not the step's threads: the split fixes the order in which the partial states
            // are merged, and a step must give the same bits whether the tuner runs it on one thread or all.
            let splits = (team::capacity() * 4).div_ceil(kvh).clamp(1, pages.max(1));
            let job = Decode {
                inputs,
                tokens,
                splits,
            };
            let parts = job.partial_len();
            let n = job.chunks();
            // SAFETY: the job writes every value.
            let out = unsafe { Tensor::uninitialized::<f32>(&[n * parts])? };
            let partials = team::run(job.clone(), out);
            job.merge(&partials, &out_shape)?
        } else {
            let job = Prompt { inputs, tokens };
            // SAFETY: the job writes every value.
            let out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
            team::run(job, out)
        };
        Ok(tvec!(y.into_tvalue()))
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        bail!("KvAttention holds one sequence")
    }
}

fn qkv_shape0(t: &Tensor) -> usize {
    t.shape()[0]
}

/// Rotate-half RoPE of one head: `x * cos + rotate_half(x) * sin`, as transformers computes it.
fn rope(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[half + i]);
        out[i] = a * cos[i] + (-b) * sin[i];
        out[half + i] = b * cos[i] + a * sin[i];
    }
}

/// What every chunk of one attention call reads: the rotated queries (`[tokens][heads][head_dim]`), the cache,
/// and where the new tokens start.
#[derive(Clone)]
struct Inputs {
    c: Config,
    q: Arc<[f32]>,
    view: KvView,
    past: usize,
}

/// Folds pages `pages` of KV head `g` into the states of `tokens` query tokens (all query heads of the group;
/// `states` and their queries are ordered by token, then head).
fn attend(
    inputs: &Inputs,
    g: usize,
    tokens: std::ops::Range<usize>,
    pages: std::ops::Range<usize>,
    states: &mut [Softmax],
) {
    let Inputs { c, q, view, past } = inputs;
    let past = *past;
    let (hd, group) = (c.head_dim, c.group());
    let nq = tokens.len() * group;
    // Quantized once for all pages (for an int8 cache), in the order of `states`.
    let mut queries = Queries::new(hd, c.format == KvFormat::I8);
    for i in 0..nq {
        let (t, head) = (tokens.start + i / group, g * group + i % group);
        queries.push(&q[(t * c.heads + head) * hd..(t * c.heads + head + 1) * hd]);
    }
    let mut qs = Vec::with_capacity(QUERY_TILE);
    let mut visible = Vec::with_capacity(QUERY_TILE);
    for page in pages.clone() {
        let n = view.rows_in(page);
        if n == 0 {
            break;
        }
        let start = page * PAGE;
        let next = page + 1;
        let block = Page {
            keys: view.keys(g, page),
            values: view.values(g, page),
            n,
            stride: PAGE,
            head_dim: hd,
            scale: c.scale,
            next_keys: (next < pages.end && view.rows_in(next) > 0).then(|| view.keys(g, next)),
        };
        for tile in (0..nq).step_by(QUERY_TILE) {
            let end = (tile + QUERY_TILE).min(nq);
            qs.clear();
            visible.clear();
            for i in tile..end {
                let t = tokens.start + i / group;
                qs.push(queries.get(i));
                // Query at position past + t sees keys up to and including it.
                visible.push((past + t + 1).saturating_sub(start).min(n));
            }
            if visible.iter().all(|&v| v == 0) {
                continue;
            }
            attn::update(c.kernel, &qs, &visible, &block, &mut states[tile..end]);
        }
    }
}

/// A few new tokens: chunk = (KV head, range of pages), output = partial softmax states.
#[derive(Clone)]
struct Decode {
    inputs: Inputs,
    tokens: usize,
    splits: usize,
}

impl Decode {
    /// Values per chunk: for each query (token × group head), `m`, `l` and `head_dim` accumulators.
    fn partial_len(&self) -> usize {
        self.tokens * self.inputs.c.group() * (2 + self.inputs.c.head_dim)
    }

    fn pages(&self, split: usize) -> std::ops::Range<usize> {
        let total = self.inputs.view.len().div_ceil(PAGE);
        let per = total.div_ceil(self.splits).max(1);
        (split * per).min(total)..((split + 1) * per).min(total)
    }

    /// Merges the partial states into `Y`.
    fn merge(&self, partials: &Tensor, shape: &[usize]) -> TractResult<Tensor> {
        let c = &self.inputs.c;
        let (hd, group) = (c.head_dim, c.group());
        let plain = partials.try_as_plain_ram()?;
        let p = plain.as_slice::<f32>()?;
        let mut y = Tensor::zero::<f32>(shape)?;
        let mut yp = y.try_as_plain_ram_mut()?;
        let out = yp.as_slice_mut::<f32>()?;
        let parts = self.partial_len();
        let mut acc = Softmax::new(hd);
        for g in 0..c.kv_heads {
            for i in 0..self.tokens * group {
                acc.reset();
                for split in 0..self.splits {
                    let base = (g * self.splits + split) * parts + i * (2 + hd);
                    acc.merge(p[base], p[base + 1], &p[base + 2..base + 2 + hd]);
                }
                let (t, head) = (i / group, g * group + i % group);
                acc.write_output(
                    &mut out[(t * c.heads + head) * hd..(t * c.heads + head + 1) * hd],
                );
            }
        }
        Ok(y)
    }
}

// SAFETY: chunk `g * splits + s` writes its own `partial_len()` values; chunks tile the output.
unsafe impl Job for Decode {
    type Out = f32;

    fn chunks(&self) -> usize {
        self.inputs.c.kv_heads * self.splits
    }

    fn region(&self, c: usize) -> Region {
        Region::contiguous(c * self.partial_len(), self.partial_len())
    }

    fn compute(&self, chunk: usize, out: &mut RegionMut<'_, f32>) {
        let (g, split) = (chunk / self.splits, chunk % self.splits);
        let hd = self.inputs.c.head_dim;
        let mut states: Vec<Softmax> = (0..self.tokens * self.inputs.c.group())
            .map(|_| Softmax::new(hd))
            .collect();
        attend(
            &self.inputs,
            g,
            0..self.tokens,
            self.pages(split),
            &mut states,
        );
        let dst = out.run(0);
        for (i, s) in states.iter().enumerate() {
            let base = i * (2 + hd);
            dst[base] = s.m;
            dst[base + 1] = s.l;
            dst[base + 2..base + 2 + hd].copy_from_slice(&s.acc);
        }
    }
}

/// A prompt: chunk = (KV head, block of query tokens), output = `Y` directly.
struct Prompt {
    inputs: Inputs,
    tokens: usize,
}

impl Prompt {
    fn blocks(&self) -> usize {
        self.tokens.div_ceil(QUERY_BLOCK)
    }

    fn token_range(&self, b: usize) -> std::ops::Range<usize> {
        b * QUERY_BLOCK..((b + 1) * QUERY_BLOCK).min(self.tokens)
    }
}

// SAFETY: chunk (g, b) writes the group's heads of tokens in block b: disjoint, and together all of `Y`.
unsafe impl Job for Prompt {
    type Out = f32;

    fn chunks(&self) -> usize {
        self.inputs.c.kv_heads * self.blocks()
    }

    fn region(&self, chunk: usize) -> Region {
        let (g, b) = (chunk / self.blocks(), chunk % self.blocks());
        let span = self.inputs.c.group() * self.inputs.c.head_dim;
        let tokens = self.token_range(b);
        Region {
            offset: tokens.start * self.inputs.c.heads * self.inputs.c.head_dim + g * span,
            len: span,
            stride: self.inputs.c.heads * self.inputs.c.head_dim,
            count: tokens.len(),
        }
    }

    fn compute(&self, chunk: usize, out: &mut RegionMut<'_, f32>) {
        let (g, b) = (chunk / self.blocks(), chunk % self.blocks());
        let (hd, group) = (self.inputs.c.head_dim, self.inputs.c.group());
        let tokens = self.token_range(b);
        let mut states: Vec<Softmax> = (0..tokens.len() * group)
            .map(|_| Softmax::new(hd))
            .collect();
        // Pages past the last query of the block are invisible to all of it.
        let last = self.inputs.past + tokens.end;
        attend(
            &self.inputs,
            g,
            tokens.clone(),
            0..last.div_ceil(PAGE),
            &mut states,
        );
        for (i, s) in states.iter().enumerate() {
            let (t, head) = (i / group, i % group);
            s.write_output(&mut out.run(t)[head * hd..(head + 1) * hd]);
        }
    }
}
