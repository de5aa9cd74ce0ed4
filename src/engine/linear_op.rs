//! The tract op behind the exporter's `ai.bitnetd` ONNX functions `BitLinear` (int8 activations × 2-bit packed
//! ternary weights) and `Int8Linear` (int8 activations × int8 weights, the quantized output layer): both
//! `int32[..., n] = x[..., k] · wᵀ`, computed by [`crate::kernels`].
//!
//! The weight initializer is taken by reference (the constant's `Arc<Tensor>`), never copied or repacked: the
//! bytes tract loaded from the file are the bytes the kernels read. onnxruntime, which does not know these ops,
//! runs the function bodies the exporter writes beside them instead (see `onnx::functions`).

use std::sync::Arc;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernels::{self, Kernel, TernaryWeights};

/// The ONNX domain of the ops.
pub const DOMAIN: &str = "ai.bitnetd";
/// 2-bit packed ternary weights (`uint8 [n, blocks(k) * 32]`, see [`kernels::pack`]); attribute `in_features`.
pub const BIT_LINEAR: &str = "BitLinear";
/// Row-major int8 weights (`int8 [n, k]`).
pub const INT8_LINEAR: &str = "Int8Linear";

/// Registers both ops with a tract ONNX parser.
pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert(BIT_LINEAR, parse_bit_linear);
    reg.insert(INT8_LINEAR, parse_int8_linear);
}

fn parse_bit_linear(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let k: i64 = node.get_attr("in_features")?;
    ensure!(k > 0, "BitLinear in_features must be positive, got {k}");
    Ok((
        expand(LinearExpansion {
            format: Format::Ternary,
            k: Some(k as usize),
        }),
        vec![],
    ))
}

fn parse_int8_linear(
    _ctx: &ParsingContext,
    _node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((
        expand(LinearExpansion {
            format: Format::Int8,
            k: None,
        }),
        vec![],
    ))
}

/// How the weights are stored.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Format {
    Ternary,
    Int8,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct LinearExpansion {
    format: Format,
    /// Input features, for ternary weights (their packed width is rounded up to a block).
    k: Option<usize>,
}

impl Expansion for LinearExpansion {
    fn name(&self) -> StaticName {
        match self.format {
            Format::Ternary => BIT_LINEAR.into(),
            Format::Int8 => INT8_LINEAR.into(),
        }
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, i8::datum_type())?;
        s.equals(&outputs[0].datum_type, i32::datum_type())?;
        s.equals(&inputs[1].rank, 2)?;
        s.equals(&inputs[0].rank, &outputs[0].rank)?;
        s.given(&inputs[0].rank, move |s, rank| {
            let last = rank as usize - 1;
            for axis in 0..last {
                s.equals(&inputs[0].shape[axis], &outputs[0].shape[axis])?;
            }
            s.equals(&outputs[0].shape[last], &inputs[1].shape[0])
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let x = model.outlet_fact(inputs[0])?.clone();
        let weights = model
            .outlet_fact(inputs[1])?
            .konst
            .clone()
            .with_context(|| format!("{prefix}: the weights must be a constant initializer"))?;
        let k = x
            .shape
            .last()
            .context("activations need at least one axis")?
            .to_usize()
            .with_context(|| format!("{prefix}: the input feature axis must be fixed"))?;
        let n = weights.shape()[0];
        match self.format {
            Format::Ternary => {
                ensure!(
                    self.k == Some(k),
                    "{prefix}: in_features {:?} but the input has {k} features",
                    self.k
                );
                ensure!(
                    weights.datum_type() == u8::datum_type(),
                    "{prefix}: packed weights must be uint8"
                );
                let w = TernaryWeights::new(weights.try_as_plain_ram()?.as_slice::<u8>()?, n, k)
                    .with_context(|| prefix.to_string())?;
                w.validate_codes().with_context(|| prefix.to_string())?;
            }
            Format::Int8 => {
                ensure!(
                    weights.datum_type() == i8::datum_type(),
                    "{prefix}: weights must be int8"
                );
                ensure!(
                    weights.shape()[1] == k,
                    "{prefix}: weights have {} features, the input {k}",
                    weights.shape()[1]
                );
            }
        }
        let kernel = Kernel::from_env().map_err(|e| format_err!(e))?;
        let op = PackedLinear {
            format: self.format,
            n,
            k,
            weights,
            kernel,
        };
        model.wire_node(prefix, op, &[inputs[0]])
    }
}

/// `int32[..., n] = x[..., k] · wᵀ` against constant weights, with the kernel chosen at load time.
#[derive(Debug, Clone)]
pub struct PackedLinear {
    format: Format,
    n: usize,
    k: usize,
    weights: Arc<Tensor>,
    kernel: Kernel,
}

impl PackedLinear {
    /// The kernel chosen at load.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// How the weights are stored.
    pub fn format(&self) -> Format {
        self.format
    }
}

impl PartialEq for PackedLinear {
    fn eq(&self, other: &Self) -> bool {
        self.format == other.format
            && (self.n, self.k) == (other.n, other.k)
            && Arc::ptr_eq(&self.weights, &other.weights)
            && self.kernel == other.kernel
    }
}

impl Eq for PackedLinear {}

impl Op for PackedLinear {
    fn name(&self) -> StaticName {
        match self.format {
            Format::Ternary => BIT_LINEAR.into(),
            Format::Int8 => INT8_LINEAR.into(),
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}×{} weights, kernel {}",
            self.n, self.k, self.kernel
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for PackedLinear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let m = x.len() / self.k.max(1);
        let mut shape: TVec<usize> = x.shape().into();
        *shape.last_mut().context("rank 0 input")? = self.n;
        let mut out = vec![0i32; m * self.n];
        let xs = x.try_as_plain_ram()?.as_slice::<i8>()?;
        let weights = self.weights.try_as_plain_ram()?;
        match self.format {
            Format::Ternary => {
                let w = TernaryWeights::new(weights.as_slice::<u8>()?, self.n, self.k)?;
                kernels::ternary_matmul(self.kernel, w, xs, m, &mut out)?;
            }
            Format::Int8 => {
                let w = weights.as_slice::<i8>()?;
                kernels::int8_matmul(self.kernel, w, self.n, self.k, xs, m, &mut out)?;
            }
        }
        let out = tract_ndarray::ArrayD::from_shape_vec(&*shape, out)?.into_tensor();
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PackedLinear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        *shape.last_mut().context("rank 0 input")? = self.n.into();
        Ok(tvec!(i32::fact(&shape)))
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
