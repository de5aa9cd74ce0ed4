//! The fused linear: `Y = [R +] [glu] (scale ⊙ (W · quantize([rms_norm](X))) / act_scale)`, the whole of a
//! BitNet linear in one op, for every token row of `X` (`[1, S, k]`).
//!
//! Two team jobs per call: the prologue (RMSNorm and quantization, a chunk per block of tokens) writes each row
//! in the layout the kernels read ([`QRowLayout`]: padded values, sum, scale), and the product (a chunk per range
//! of output features, every token) collects its chunk's sums in a per-thread buffer that stays in cache, then
//! applies the scales, the GLU and the residual token by token in loops the compiler vectorizes, so no f32
//! intermediate of the layer goes back to memory. Weights are read in place (`engine::weights`).
//!
//! With int4 weights (`kernels::int4`) `S` holds a scale per group of 128 columns, which the product applies
//! inside each row's sum.
//!
//! ONNX inputs: `X, [N], W, [S], [R]` (see [`LinearSpec::inputs`]); attributes `in_features`, `out_features`
//! (rows of `W`) and, with a norm, `epsilon`. After the loader's preparation `W` is a reference to the data file.

use std::ops::Range;
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::screen::{self, OutputLayer, Planes};
use super::{
    node_rows, node_weights, Glu, LinearSpec, WeightFormat, ATTR_OUTPUT_LAYER, ATTR_RESIDENCY,
};
use crate::engine::weights::{WeightResidency, Weights};
use crate::kernels::act::{self, QRowLayout};
use crate::kernels::{self, int4, pack, planes, Kernel, TernaryWeights};
use crate::team::{self, Job, Region, RegionMut};

/// Chunks per thread of the product: enough that a late thread's share is small, few enough that claiming costs
/// nothing.
const CHUNKS_PER_THREAD: usize = 8;
/// Fewest output features in a chunk.
const MIN_CHUNK: usize = 16;
/// Token rows per prologue chunk.
const PROLOGUE_ROWS: usize = 8;

pub(crate) fn parse(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let spec = LinearSpec::parse(&node.op_type).context("not a fused linear")?;
    let k: usize = node.get_attr("in_features")?;
    let n: usize = node.get_attr("out_features")?;
    ensure!(k > 0 && n > 0, "{}: empty weights ({n}×{k})", node.name);
    if spec.glu.is_some() {
        ensure!(
            n.is_multiple_of(2),
            "{}: a GLU needs an even number of outputs",
            node.name
        );
    }
    let eps: f32 = if spec.norm {
        node.get_attr("epsilon")?
    } else {
        0.0
    };
    let (expected, align) = match spec.weights {
        WeightFormat::Bit => (pack::packed_len(n, k), 1),
        WeightFormat::Int8 => (n * k, 1),
        WeightFormat::Int4 => (n * int4::row_bytes(k), 1),
        WeightFormat::F32 => (n * k * 4, 4),
    };
    let kernel = Kernel::from_env().map_err(|e| format_err!(e))?;
    // Only a plain int8 product (the output layer) is screened.
    let screened = spec.weights == WeightFormat::Int8
        && spec.glu.is_none()
        && !spec.residual
        && node.get_attr_opt::<String>(ATTR_OUTPUT_LAYER)?.as_deref()
            == Some(OutputLayer::Screened.name());
    if screened {
        // The planes are split from a `pread` of the int8 rows, so the int8 copy is never resident; a mapped
        // model keeps the mapping for its candidates' exact rows.
        let source = node_rows(ctx, node)?;
        ensure!(
            source.len() == expected,
            "{}: {} bytes of weights, {n}×{k} int8 weights take {expected}",
            node.name,
            source.len()
        );
        let residency: String = node.get_attr(ATTR_RESIDENCY)?;
        let mapped = match WeightResidency::parse(&residency) {
            Some(WeightResidency::Mapped) => Some(node_weights(ctx, node, 1)?),
            _ => None,
        };
        let planes = Planes::build(source.clone(), mapped.clone(), n, k)
            .with_context(|| format!("splitting the output layer of {}", node.name))?;
        return Ok((
            expand(LinearExpansion {
                spec,
                n,
                k,
                eps,
                weights: mapped.unwrap_or(source),
                planes: Some(Arc::new(planes)),
                kernel,
            }),
            vec![],
        ));
    }
    let weights = node_weights(ctx, node, align)?;
    ensure!(
        weights.bytes().len() == expected,
        "{}: {} bytes of weights, {n}×{k} {:?} weights take {expected}",
        node.name,
        weights.bytes().len(),
        spec.weights
    );
    if spec.weights == WeightFormat::Bit {
        TernaryWeights::new(weights.bytes(), n, k)?
            .validate_codes()
            .with_context(|| node.name.clone())?;
    }
    Ok((
        expand(LinearExpansion {
            spec,
            n,
            k,
            eps,
            weights,
            planes: None,
            kernel,
        }),
        vec![],
    ))
}

#[derive(Debug, Clone)]
struct LinearExpansion {
    spec: LinearSpec,
    n: usize,
    k: usize,
    eps: f32,
    weights: Arc<Weights>,
    planes: Option<Arc<Planes>>,
    kernel: Kernel,
}

impl LinearExpansion {
    fn out_features(&self) -> usize {
        if self.spec.glu.is_some() {
            self.n / 2
        } else {
            self.n
        }
    }
}

impl Expansion for LinearExpansion {
    fn name(&self) -> StaticName {
        self.spec.op_type().into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        let arity = 1
            + usize::from(self.spec.norm)
            + usize::from(self.spec.weights != WeightFormat::F32)
            + usize::from(self.spec.residual);
        check_input_arity(inputs, arity)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, 3)?;
        s.equals(&outputs[0].rank, 3)?;
        s.equals(&inputs[0].shape[2], self.k.to_dim())?;
        s.equals(&inputs[0].shape[0], &outputs[0].shape[0])?;
        s.equals(&inputs[0].shape[1], &outputs[0].shape[1])?;
        s.equals(&outputs[0].shape[2], self.out_features().to_dim())?;
        if self.spec.residual {
            s.equals(&inputs[arity - 1].shape, &outputs[0].shape)?;
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let konst = |i: usize, len: usize, what: &str| -> TractResult<Arc<[f32]>> {
            let t = model
                .outlet_fact(inputs[i])?
                .konst
                .clone()
                .with_context(|| format!("{prefix}: the {what} must be a constant"))?;
            let t = t.cast_to::<f32>()?;
            let plain = t.try_as_plain_ram()?;
            let v = plain.as_slice::<f32>()?;
            ensure!(
                v.len() == len,
                "{prefix}: {} {what} values for {len}",
                v.len()
            );
            Ok(v.into())
        };
        let mut i = 1;
        let norm = if self.spec.norm {
            i += 1;
            Some(konst(1, self.k, "norm weights")?)
        } else {
            None
        };
        let scales = match self.spec.weights {
            WeightFormat::Int4 => self.n * int4::groups(self.k),
            _ => self.n,
        };
        let scale = if self.spec.weights != WeightFormat::F32 {
            i += 1;
            Some(konst(i - 1, scales, "scales")?)
        } else {
            None
        };
        let mut wired = vec![inputs[0]];
        if self.spec.residual {
            wired.push(inputs[i]);
        }
        let op = FusedLinear {
            spec: self.spec,
            n: self.n,
            k: self.k,
            eps: self.eps,
            weights: self.weights.clone(),
            planes: self.planes.clone(),
            norm,
            scale,
            kernel: self.kernel,
        };
        model.wire_node(prefix, op, &wired)
    }
}

/// The fused linear, ready to run (see the module docs).
#[derive(Debug, Clone)]
pub struct FusedLinear {
    spec: LinearSpec,
    n: usize,
    k: usize,
    eps: f32,
    /// The weights as the file holds them (for a screened layer: the mapping of a mapped model, else a handle
    /// that reads nothing after load).
    weights: Arc<Weights>,
    /// The screened output layer's planes (see `super::screen`).
    planes: Option<Arc<Planes>>,
    norm: Option<Arc<[f32]>>,
    scale: Option<Arc<[f32]>>,
    kernel: Kernel,
}

impl FusedLinear {
    pub fn spec(&self) -> LinearSpec {
        self.spec
    }

    /// The kernel running the product.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Bytes of weights one token reads, with their scales (for a screened layer: the screen, without the
    /// candidates, see [`FusedLinear::planes`]).
    pub fn weight_bytes(&self) -> usize {
        let scales = self.scale.as_ref().map_or(0, |s| s.len() * 4);
        match &self.planes {
            Some(p) => p.screen_bytes() + scales,
            None => self.weights.bytes().len() + scales,
        }
    }

    /// The planes of a screened output layer.
    pub fn planes(&self) -> Option<&Arc<Planes>> {
        self.planes.as_ref()
    }

    /// Whether the weights are file-backed.
    pub fn is_mapped(&self) -> bool {
        self.weights.is_mapped()
    }

    fn out_features(&self) -> usize {
        if self.spec.glu.is_some() {
            self.n / 2
        } else {
            self.n
        }
    }

    fn layout(&self) -> QRowLayout {
        let padded = match self.spec.weights {
            WeightFormat::Bit => pack::blocks(self.k) * pack::BLOCK,
            WeightFormat::Int4 => int4::padded(self.k),
            _ if self.planes.is_some() => planes::padded_len(self.k),
            _ => self.k,
        };
        QRowLayout::new(self.k, padded)
    }
}

impl PartialEq for FusedLinear {
    fn eq(&self, other: &Self) -> bool {
        self.spec == other.spec
            && (self.n, self.k) == (other.n, other.k)
            && Arc::ptr_eq(&self.weights, &other.weights)
    }
}

impl Eq for FusedLinear {}

impl Op for FusedLinear {
    fn name(&self) -> StaticName {
        self.spec.op_type().into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}×{} weights ({}{}), kernel {}",
            self.n,
            self.k,
            if self.is_mapped() { "mapped" } else { "loaded" },
            if self.planes.is_some() {
                ", screened"
            } else {
                ""
            },
            self.kernel
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for FusedLinear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].clone();
        let tokens = x.len() / self.k;
        let mut shape: TVec<usize> = x.shape().into();
        shape[2] = self.out_features();
        let act = match self.spec.weights {
            WeightFormat::F32 => match &self.norm {
                None => Act::Float(x),
                Some(g) => {
                    let job = Normalize {
                        x,
                        gamma: g.clone(),
                        eps: self.eps,
                        k: self.k,
                        rows: tokens,
                    };
                    // SAFETY: the job writes every value (its regions cover the output).
                    let out = unsafe { Tensor::uninitialized::<f32>(&[tokens, self.k])? };
                    Act::Float(team::run(job, out).into_tvalue())
                }
            },
            _ => {
                let layout = self.layout();
                let job = Quantize {
                    x,
                    gamma: self.norm.clone(),
                    eps: self.eps,
                    layout,
                    rows: tokens,
                };
                // SAFETY: as above.
                let out = unsafe { Tensor::uninitialized::<i8>(&[tokens, layout.stride()])? };
                let q = team::run(job, out).into_tvalue();
                if let Some(planes) = &self.planes {
                    let scale = self.scale.as_ref().expect("scaled weights");
                    let logits = screen::run(planes, self.kernel, scale, q, layout, tokens)?;
                    return Ok(tvec!(logits.into_shape(&shape)?.into_tvalue()));
                }
                Act::Quantized(q, layout)
            }
        };
        let out_n = self.out_features();
        let per_chunk = out_n
            .div_ceil(team::threads() * CHUNKS_PER_THREAD)
            .max(MIN_CHUNK);
        let job = Product {
            op: self.clone(),
            act,
            residual: self.spec.residual.then(|| inputs[1].clone()),
            tokens,
            per_chunk,
        };
        // SAFETY: the product writes every value.
        let out = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        Ok(tvec!(team::run(job, out).into_tvalue()))
    }
}

impl TypedOp for FusedLinear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        *shape.last_mut().context("rank 0 input")? = self.out_features().into();
        Ok(tvec!(f32::fact(&shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let rows: TDim = inputs[0].shape.iter().rev().skip(1).product();
        Ok(tvec!((
            Cost::FMA(i32::datum_type()),
            rows * (self.n * self.k)
        )))
    }

    as_op!();
}

/// The product's input rows.
enum Act {
    /// Quantized rows in the kernels' layout (`[tokens, layout.stride()]` int8).
    Quantized(TValue, QRowLayout),
    /// f32 rows (`[tokens, k]`), for f32 weights.
    Float(TValue),
}

/// Prologue for int8 and ternary weights: a chunk per block of token rows.
struct Quantize {
    x: TValue,
    gamma: Option<Arc<[f32]>>,
    eps: f32,
    layout: QRowLayout,
    rows: usize,
}

// SAFETY: chunk `c` writes whole rows `c*PROLOGUE_ROWS..`, which partition `[rows, stride]`.
unsafe impl Job for Quantize {
    type Out = i8;

    fn chunks(&self) -> usize {
        self.rows.div_ceil(PROLOGUE_ROWS)
    }

    fn region(&self, c: usize) -> Region {
        let (r0, r1) = block(c, PROLOGUE_ROWS, self.rows);
        let stride = self.layout.stride();
        Region::contiguous(r0 * stride, (r1 - r0) * stride)
    }

    fn compute(&self, c: usize, out: &mut RegionMut<'_, i8>) {
        let (r0, r1) = block(c, PROLOGUE_ROWS, self.rows);
        let (k, stride) = (self.layout.k, self.layout.stride());
        let plain = self.x.try_as_plain_ram().expect("plain input");
        let x = plain.as_slice::<f32>().expect("f32 input");
        let mut scratch = vec![0f32; k];
        let dst = out.run(0);
        for r in r0..r1 {
            let row = &mut dst[(r - r0) * stride..(r - r0 + 1) * stride];
            act::norm_quantize(
                &x[r * k..(r + 1) * k],
                self.gamma.as_deref(),
                self.eps,
                &mut scratch,
                self.layout,
                row,
            );
        }
    }
}

/// Prologue for f32 weights: RMSNorm only.
struct Normalize {
    x: TValue,
    gamma: Arc<[f32]>,
    eps: f32,
    k: usize,
    rows: usize,
}

// SAFETY: chunk `c` writes whole rows, which partition `[rows, k]`.
unsafe impl Job for Normalize {
    type Out = f32;

    fn chunks(&self) -> usize {
        self.rows.div_ceil(PROLOGUE_ROWS)
    }

    fn region(&self, c: usize) -> Region {
        let (r0, r1) = block(c, PROLOGUE_ROWS, self.rows);
        Region::contiguous(r0 * self.k, (r1 - r0) * self.k)
    }

    fn compute(&self, c: usize, out: &mut RegionMut<'_, f32>) {
        let (r0, r1) = block(c, PROLOGUE_ROWS, self.rows);
        let plain = self.x.try_as_plain_ram().expect("plain input");
        let x = plain.as_slice::<f32>().expect("f32 input");
        let dst = out.run(0);
        for r in r0..r1 {
            let d = &mut dst[(r - r0) * self.k..(r - r0 + 1) * self.k];
            act::rms_norm(&x[r * self.k..(r + 1) * self.k], &self.gamma, self.eps, d);
        }
    }
}

/// The product: a chunk per range of output features, for every token.
struct Product {
    op: FusedLinear,
    act: Act,
    residual: Option<TValue>,
    tokens: usize,
    per_chunk: usize,
}

// SAFETY: chunk `c` writes output features `block(c)` of every token row: a partition of `[tokens, out_n]`.
unsafe impl Job for Product {
    type Out = f32;

    fn chunks(&self) -> usize {
        self.op.out_features().div_ceil(self.per_chunk)
    }

    fn region(&self, c: usize) -> Region {
        let out_n = self.op.out_features();
        let (c0, c1) = block(c, self.per_chunk, out_n);
        Region {
            offset: c0,
            len: c1 - c0,
            stride: out_n,
            count: self.tokens,
        }
    }

    fn compute(&self, c: usize, out: &mut RegionMut<'_, f32>) {
        let out_n = self.op.out_features();
        let (c0, c1) = block(c, self.per_chunk, out_n);
        let width = c1 - c0;
        let residual = self
            .residual
            .as_ref()
            .map(|r| r.try_as_plain_ram().expect("plain residual"));
        let residual = residual
            .as_ref()
            .map(|r| r.as_slice::<f32>().expect("f32 residual"));
        SCRATCH.with_borrow_mut(|scratch| {
            let n = width * self.tokens;
            let parts = if self.op.spec.glu.is_some() { 2 } else { 1 };
            if scratch.len() < parts * n {
                scratch.resize(parts * n, 0.0);
            }
            let (y, rest) = scratch.split_at_mut(n);
            self.values(c0..c1, y);
            // Token by token over contiguous features: plain loops the compiler vectorizes, in the order of
            // operations of the reference (`finish(glu(gate) * up)`), so the results are the same to the bit.
            match self.op.spec.glu {
                None => {
                    for t in 0..self.tokens {
                        let (o, y) = (out.run(t), &y[t * width..(t + 1) * width]);
                        match residual {
                            Some(r) => {
                                let r = &r[t * out_n + c0..t * out_n + c1];
                                for ((o, &y), &r) in o.iter_mut().zip(y).zip(r) {
                                    *o = r + y;
                                }
                            }
                            None => o.copy_from_slice(y),
                        }
                    }
                }
                Some(glu) => {
                    let up = &mut rest[..n];
                    self.values(out_n + c0..out_n + c1, up);
                    for t in 0..self.tokens {
                        let o = out.run(t);
                        let (g, u) = (
                            &y[t * width..(t + 1) * width],
                            &up[t * width..(t + 1) * width],
                        );
                        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                            let a = match glu {
                                Glu::Relu2 => {
                                    let r = g.max(0.0);
                                    r * r
                                }
                                Glu::Silu => g * (1.0 / (1.0 + (-g).exp())),
                            };
                            *o = a * u;
                        }
                        if let Some(r) = residual {
                            let r = &r[t * out_n + c0..t * out_n + c1];
                            for (o, &r) in o.iter_mut().zip(r) {
                                *o += r;
                            }
                        }
                    }
                }
            }
        });
    }
}

thread_local! {
    /// A thread's buffers for the product's scaled values, kept across calls: a prompt's chunk needs hundreds of
    /// KiB, which a fresh allocation would take from (and give back to) the system every time.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Product {
    /// Writes the scaled products of weight rows `rows` (before GLU and residual) to `y`, token-major:
    /// `y[t * rows.len() + (row - rows.start)]`.
    fn values(&self, rows: Range<usize>, y: &mut [f32]) {
        let op = &self.op;
        let (r0, width) = (rows.start, rows.len());
        let mut put = |r: usize, t: usize, v: f32| y[t * width + r - r0] = v;
        match &self.act {
            Act::Quantized(q, layout) => {
                let plain = q.try_as_plain_ram().expect("plain rows");
                let data = plain.as_slice::<i8>().expect("int8 rows");
                let rows_q: Vec<&[i8]> = data.chunks(layout.stride()).collect();
                let xs: Vec<&[i8]> = rows_q.iter().map(|r| layout.values(r)).collect();
                // The inverse activation scale: a product per value where a division would be.
                let inv: Vec<f32> = rows_q.iter().map(|r| 1.0 / layout.scale(r)).collect();
                let scale = op.scale.as_deref().expect("scaled weights");
                match op.spec.weights {
                    WeightFormat::Bit => {
                        let xsum: Vec<i32> = rows_q.iter().map(|r| layout.sum(r)).collect();
                        let w = TernaryWeights::new(op.weights.bytes(), op.n, op.k)
                            .expect("validated at load");
                        kernels::ternary_rows(
                            op.kernel,
                            w,
                            rows.clone(),
                            &xs,
                            &xsum,
                            |r, t, acc| put(r, t, acc as f32),
                        );
                    }
                    // The group scales are the kernel's; only the activation's is left.
                    WeightFormat::Int4 => {
                        kernels::int4_rows(
                            op.kernel,
                            op.weights.bytes(),
                            scale,
                            op.k,
                            rows,
                            &xs,
                            |r, t, v| put(r, t, v * inv[t]),
                        );
                        return;
                    }
                    _ => kernels::int8_rows(
                        op.kernel,
                        op.weights.as_i8(),
                        op.k,
                        rows.clone(),
                        &xs,
                        |r, t, acc| put(r, t, acc as f32),
                    ),
                }
                // `acc * inv[t] * scale[row]`, in that order, for every token's contiguous rows.
                let scale = &scale[rows];
                for (t, y) in y.chunks_exact_mut(width).take(self.tokens).enumerate() {
                    let it = inv[t];
                    for (v, &s) in y.iter_mut().zip(scale) {
                        *v = *v * it * s;
                    }
                }
            }
            Act::Float(x) => {
                let plain = x.try_as_plain_ram().expect("plain rows");
                let data = plain.as_slice::<f32>().expect("f32 rows");
                let xs: Vec<&[f32]> = data.chunks(op.k).collect();
                let w = op.weights.as_f32().expect("aligned at load");
                kernels::f32_rows(w, op.k, rows, &xs, put);
            }
        }
    }
}

/// Bounds of block `c` of `size` over `total`.
fn block(c: usize, size: usize, total: usize) -> (usize, usize) {
    (c * size, ((c + 1) * size).min(total))
}
