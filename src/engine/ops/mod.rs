//! bitnetd's tract ops, one per `ai.bitnetd` ONNX op the exporter writes (each also defined as an ONNX
//! function in standard ops, `onnx::functions`, so that other runtimes run the same file):
//! - [`linear`]: a fused linear, `{Bit|Int8|Int4|F32}Linear[Norm][Relu2Glu|SiluGlu][Add]`: RMSNorm, per-token int8
//!   quantization, the product on packed weights, the scales, the GLU and the residual in one op;
//! - [`attention`]: RoPE, the paged KV cache (its own state: int8, f16 or f32) and streaming softmax attention;
//! - [`embedding`]: the token lookup, one row per token read from the data file (the table is never resident);
//! - [`screen`]: the int8 output layer as a 4-bit screen over every row and exact products for the candidates.
//!
//! Every op runs its parallel part as a [`crate::team`] job on the forward pass's team.

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod screen;

use std::sync::Arc;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::weights::{WeightResidency, Weights};

/// The ONNX domain of the ops.
pub const DOMAIN: &str = "ai.bitnetd";
/// `KvAttention(QKV, position_ids, attention_mask, inv_freq, past_key, past_value) -> (Y, present_key,
/// present_value)` (not named `Attention`: tract keys ops by type alone, and that is a standard op).
pub const ATTENTION: &str = "KvAttention";
/// `Embedding(input_ids, table) -> float[1, S, hidden]` for an f16 or f32 table.
pub const EMBEDDING: &str = "Embedding";
/// `Int8Embedding(input_ids, table, scale)`: an int8 table with one scale per row.
pub const INT8_EMBEDDING: &str = "Int8Embedding";
/// The packed 2-bit product used inside the fused linears' function bodies (`int8 · ternary -> int32`).
pub const BIT_MATMUL: &str = "BitMatMul";

/// Attributes the loader puts on a node whose weights it took out of the graph (see `engine::prepare`).
pub const ATTR_WEIGHT_LOCATION: &str = "bitnetd_weight_location";
pub const ATTR_WEIGHT_OFFSET: &str = "bitnetd_weight_offset";
pub const ATTR_WEIGHT_LENGTH: &str = "bitnetd_weight_length";
/// The ONNX data type and dims of the weights taken out (the initializer's).
pub const ATTR_WEIGHT_DTYPE: &str = "bitnetd_weight_dtype";
pub const ATTR_WEIGHT_DIMS: &str = "bitnetd_weight_dims";
/// Attribute the loader puts on attention nodes: the KV cache format.
pub const ATTR_KV_FORMAT: &str = "bitnetd_kv_format";
/// Attribute the loader puts on linear nodes: `mapped` or `loaded` (see `engine::weights`).
pub const ATTR_RESIDENCY: &str = "bitnetd_residency";
/// Attribute the loader puts on linear nodes: `screened` or `exact` (see [`screen`]; only a plain int8 product,
/// the output layer, is screened).
pub const ATTR_OUTPUT_LAYER: &str = "bitnetd_output_layer";

/// How a fused linear's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// 2-bit packed ternary (`kernels::pack`), with one f32 scale per output.
    Bit,
    /// int8 rows with one f32 scale per row.
    Int8,
    /// 4-bit rows in groups of 128 columns, one f32 scale per group (`kernels::int4`).
    Int4,
    /// f32 rows, no activation quantization.
    F32,
}

/// A gated linear unit on the two halves of the product: `act(first) * second`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Glu {
    /// `relu(x)²` (BitNet b1.58 2B-4T).
    Relu2,
    /// `x · sigmoid(x)` (Llama-style checkpoints).
    Silu,
}

/// The structure of a fused linear, as its op type spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinearSpec {
    pub weights: WeightFormat,
    /// RMSNorm of the input first (input `N`, attribute `epsilon`).
    pub norm: bool,
    pub glu: Option<Glu>,
    /// Adds input `R` to the result.
    pub residual: bool,
}

impl LinearSpec {
    /// The op type, e.g. `BitLinearNormRelu2Glu`.
    pub fn op_type(&self) -> String {
        let w = match self.weights {
            WeightFormat::Bit => "Bit",
            WeightFormat::Int8 => "Int8",
            WeightFormat::Int4 => "Int4",
            WeightFormat::F32 => "F32",
        };
        let glu = match self.glu {
            None => "",
            Some(Glu::Relu2) => "Relu2Glu",
            Some(Glu::Silu) => "SiluGlu",
        };
        format!(
            "{w}Linear{}{glu}{}",
            if self.norm { "Norm" } else { "" },
            if self.residual { "Add" } else { "" }
        )
    }

    /// The spec an op type spells, if it is a fused linear.
    pub fn parse(op_type: &str) -> Option<LinearSpec> {
        let (weights, rest) = [
            ("BitLinear", WeightFormat::Bit),
            ("Int8Linear", WeightFormat::Int8),
            ("Int4Linear", WeightFormat::Int4),
            ("F32Linear", WeightFormat::F32),
        ]
        .into_iter()
        .find_map(|(p, w)| op_type.strip_prefix(p).map(|r| (w, r)))?;
        let (norm, rest) = match rest.strip_prefix("Norm") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let (glu, rest) = if let Some(r) = rest.strip_prefix("Relu2Glu") {
            (Some(Glu::Relu2), r)
        } else if let Some(r) = rest.strip_prefix("SiluGlu") {
            (Some(Glu::Silu), r)
        } else {
            (None, rest)
        };
        let (residual, rest) = match rest.strip_prefix("Add") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        rest.is_empty().then_some(LinearSpec {
            weights,
            norm,
            glu,
            residual,
        })
    }

    /// Every fused linear the exporter can write.
    pub fn all() -> Vec<LinearSpec> {
        let mut v = vec![];
        for weights in [
            WeightFormat::Bit,
            WeightFormat::Int8,
            WeightFormat::Int4,
            WeightFormat::F32,
        ] {
            for norm in [false, true] {
                for glu in [None, Some(Glu::Relu2), Some(Glu::Silu)] {
                    for residual in [false, true] {
                        v.push(LinearSpec {
                            weights,
                            norm,
                            glu,
                            residual,
                        });
                    }
                }
            }
        }
        v
    }

    /// The ONNX input names, in order (`W` is the weights).
    pub fn inputs(&self) -> Vec<&'static str> {
        let mut v = vec!["X"];
        if self.norm {
            v.push("N");
        }
        v.push("W");
        if self.weights != WeightFormat::F32 {
            v.push("S");
        }
        if self.residual {
            v.push("R");
        }
        v
    }
}

/// Where the weights the loader took off `node` are: (file, offset, length) (see `engine::prepare`).
fn weight_location(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(std::path::PathBuf, usize, usize)> {
    let location: String = node
        .get_attr(ATTR_WEIGHT_LOCATION)
        .with_context(|| format!("{}: weights not prepared by bitnetd's loader", node.name))?;
    let offset: usize = node.get_attr(ATTR_WEIGHT_OFFSET)?;
    let length: usize = node.get_attr(ATTR_WEIGHT_LENGTH)?;
    let dir = ctx.model_dir.context("the model directory is unknown")?;
    Ok((std::path::Path::new(dir).join(location), offset, length))
}

/// The weights of a product node, aligned to `align` bytes, held as the node says.
pub(crate) fn node_weights(
    ctx: &ParsingContext,
    node: &NodeProto,
    align: usize,
) -> TractResult<Arc<Weights>> {
    let (path, offset, length) = weight_location(ctx, node)?;
    let name: String = node.get_attr(ATTR_RESIDENCY)?;
    let residency =
        WeightResidency::parse(&name).with_context(|| format!("weight residency {name:?}"))?;
    Weights::open(&path, offset, length, align, residency)
        .with_context(|| format!("weights of {}", node.name))
}

/// The weights of a table node, read by rows from the file.
pub(crate) fn node_rows(ctx: &ParsingContext, node: &NodeProto) -> TractResult<Arc<Weights>> {
    let (path, offset, length) = weight_location(ctx, node)?;
    Weights::rows(&path, offset, length).with_context(|| format!("table of {}", node.name))
}

/// Registers every op with a tract ONNX parser.
pub fn register(reg: &mut OnnxOpRegister) {
    for spec in LinearSpec::all() {
        reg.0.insert(spec.op_type(), linear::parse);
    }
    reg.insert(ATTENTION, attention::parse);
    reg.insert(EMBEDDING, embedding::parse);
    reg.insert(INT8_EMBEDDING, embedding::parse);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_types_spell_their_structure_and_parse_back() {
        let all = LinearSpec::all();
        assert_eq!(all.len(), 48);
        for s in &all {
            assert_eq!(LinearSpec::parse(&s.op_type()), Some(*s), "{}", s.op_type());
        }
        let s = LinearSpec::parse("BitLinearNormRelu2Glu").unwrap();
        assert_eq!(
            (s.weights, s.norm, s.glu, s.residual),
            (WeightFormat::Bit, true, Some(Glu::Relu2), false)
        );
        assert_eq!(s.inputs(), ["X", "N", "W", "S"]);
        assert_eq!(
            LinearSpec::parse("F32LinearNorm").unwrap().inputs(),
            ["X", "N", "W"]
        );
        for bad in ["BitLinearAddNorm", "Linear", "BitLinearNormX", "Attention"] {
            assert_eq!(LinearSpec::parse(bad), None, "{bad}");
        }
    }
}
