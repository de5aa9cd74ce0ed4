//! ONNX function bodies for bitnetd's own ops, written into every exported model so that any ONNX runtime can run
//! it: tract runs the ops on bitnetd's kernels (`engine::ops`), others (onnxruntime) inline these standard-op
//! definitions, which are also what the ops mean.
//!
//! - `BitMatMul(X: int8[..., K], W: uint8[N, B*32]) -> int32[..., N]`, attribute `in_features` = K: unpacks the
//!   2-bit layout of `kernels::pack` (shift by 0/2/4/6, mask 3, flatten, drop the padding, subtract 1) and runs
//!   `MatMulInteger(X, Wᵀ)`.
//! - The fused linears (`engine::ops::LinearSpec`): RMSNorm (`N`, `epsilon`), per-token absmax int8 quantization,
//!   the product, `Div` by the activation scale and `Mul` by the weights' (`S`), the GLU and the residual (`R`).
//!   Int4 weights (`kernels::int4`) are unpacked and multiplied by their group scales (`S: [N, G]`) before an f32
//!   `MatMul` with the integer-valued activations.
//! - `KvAttention`: split of the fused projection, RoPE from `position_ids` and `inv_freq`, the causal mask from
//!   `attention_mask`, and ONNX `Attention` (opset 23) with grouped KV heads and explicit past/present tensors.
//!   Its reshapes use the model's head counts, so the exporter writes one body per model ([`definitions`]).
//! - `Embedding` (`Gather`, `Cast`) and `Int8Embedding` (times the row's scale).

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::*;

use super::builder::{attr_i, attr_ints};
use crate::engine::ops::{
    Glu, LinearSpec, WeightFormat, ATTENTION, BIT_MATMUL, DOMAIN, EMBEDDING, INT8_EMBEDDING,
};

/// Version of the `ai.bitnetd` operator set (2: fused linears, `KvAttention`, `Embedding`).
pub const DOMAIN_VERSION: i64 = 2;

/// The model-wide shape the attention body is written for.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Nodes of one function body; every value name is fresh.
#[derive(Default)]
struct Body {
    nodes: Vec<NodeProto>,
    count: usize,
}

impl Body {
    fn push(
        &mut self,
        op: &str,
        domain: &str,
        inputs: &[&str],
        outputs: &[String],
        attrs: Vec<AttributeProto>,
    ) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.to_vec(),
            name: format!("n{}", self.nodes.len()),
            op_type: op.into(),
            domain: domain.into(),
            attribute: attrs,
            ..Default::default()
        });
    }

    fn fresh(&mut self) -> String {
        self.count += 1;
        format!("t{}", self.count)
    }

    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh();
        self.push(op, "", inputs, std::slice::from_ref(&out), attrs);
        out
    }

    fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        n: usize,
        attrs: Vec<AttributeProto>,
    ) -> Vec<String> {
        let outs: Vec<String> = (0..n).map(|_| self.fresh()).collect();
        self.push(op, "", inputs, &outs, attrs);
        outs
    }

    fn constant(&mut self, dt: DataType, dims: &[i64], raw: Vec<u8>) -> String {
        let t = TensorProto {
            data_type: dt as i32,
            dims: dims.to_vec(),
            raw_data: raw,
            ..Default::default()
        };
        self.op(
            "Constant",
            &[],
            vec![AttributeProto {
                name: "value".into(),
                r#type: AttributeType::Tensor as i32,
                t: Some(t),
                ..Default::default()
            }],
        )
    }

    fn i64s(&mut self, v: &[i64]) -> String {
        self.constant(
            DataType::Int64,
            &[v.len() as i64],
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }

    fn f32(&mut self, v: f32) -> String {
        self.constant(DataType::Float, &[], v.to_le_bytes().to_vec())
    }

    /// A float constant holding the function's attribute `name`.
    fn f32_attr(&mut self, name: &str) -> String {
        self.op(
            "Constant",
            &[],
            vec![reference("value_float", name, AttributeType::Float)],
        )
    }

    /// Ends the body: `Identity(value) -> output`.
    fn output(&mut self, value: &str, output: &str) {
        self.push("Identity", "", &[value], &[output.to_string()], vec![]);
    }
}

/// An attribute taking the value of the calling node's attribute `from`.
fn reference(name: &str, from: &str, ty: AttributeType) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ref_attr_name: from.into(),
        r#type: ty as i32,
        ..Default::default()
    }
}

/// `BitShift`'s `direction = "RIGHT"`.
fn shift_right() -> AttributeProto {
    AttributeProto {
        name: "direction".into(),
        r#type: AttributeType::String as i32,
        s: b"RIGHT".to_vec(),
        ..Default::default()
    }
}

fn to(dt: DataType) -> AttributeProto {
    attr_i("to", dt as i64)
}

fn function(
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attributes: &[&str],
    body: Body,
    opset: i64,
) -> FunctionProto {
    FunctionProto {
        name: Some(name.into()),
        domain: Some(DOMAIN.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attributes.iter().map(|s| s.to_string()).collect(),
        node: body.nodes,
        opset_import: vec![
            OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            },
            OperatorSetIdProto {
                domain: DOMAIN.into(),
                version: DOMAIN_VERSION,
            },
        ],
        ..Default::default()
    }
}

/// `BitMatMul(X, W)`, see the module docs.
fn bit_matmul(opset: i64) -> FunctionProto {
    let mut b = Body::default();
    let shape = b.i64s(&[0, -1, 1, 32]);
    let blocks = b.op("Reshape", &["W", &shape], vec![]);
    let shifts = b.constant(DataType::Uint8, &[4, 1], vec![0, 2, 4, 6]);
    let shifted = b.op("BitShift", &[&blocks, &shifts], vec![shift_right()]);
    let three = b.constant(DataType::Uint8, &[], vec![3]);
    let codes = b.op("BitwiseAnd", &[&shifted, &three], vec![]);
    let rows = b.i64s(&[0, -1]);
    let codes = b.op("Reshape", &[&codes, &rows], vec![]);
    let k = b.op("Shape", &["X"], vec![attr_i("start", -1)]);
    let (zero, axis1) = (b.i64s(&[0]), b.i64s(&[1]));
    let codes = b.op("Slice", &[&codes, &zero, &k, &axis1], vec![]);
    let codes = b.op("Cast", &[&codes], vec![to(DataType::Int32)]);
    let one = b.constant(DataType::Int32, &[], 1i32.to_le_bytes().to_vec());
    let w = b.op("Sub", &[&codes, &one], vec![]);
    let w = b.op("Cast", &[&w], vec![to(DataType::Int8)]);
    let wt = b.op("Transpose", &[&w], vec![attr_ints("perm", &[1, 0])]);
    let y = b.op("MatMulInteger", &["X", &wt], vec![]);
    b.output(&y, "Y");
    function(BIT_MATMUL, &["X", "W"], &["Y"], &["in_features"], b, opset)
}

/// `x / sqrt(mean(x²) + epsilon) * n` over the last axis.
fn rms_norm(b: &mut Body, x: &str, n: &str) -> String {
    let axes = b.i64s(&[-1]);
    let sq = b.op("Mul", &[x, x], vec![]);
    let var = b.op("ReduceMean", &[&sq, &axes], vec![attr_i("keepdims", 1)]);
    let eps = b.f32_attr("epsilon");
    let var = b.op("Add", &[&var, &eps], vec![]);
    let rms = b.op("Sqrt", &[&var], vec![]);
    let y = b.op("Div", &[x, &rms], vec![]);
    b.op("Mul", &[&y, n], vec![])
}

/// Per-token absmax int8 quantization: `(int8 values, 127 / max(max|x|, 1e-5))`.
fn quantize(b: &mut Body, x: &str) -> (String, String) {
    let axes = b.i64s(&[-1]);
    let a = b.op("Abs", &[x], vec![]);
    let m = b.op("ReduceMax", &[&a, &axes], vec![attr_i("keepdims", 1)]);
    let floor = b.f32(crate::kernels::act::ABSMAX_FLOOR);
    let m = b.op("Max", &[&m, &floor], vec![]);
    let (qp, qn) = (b.f32(127.0), b.f32(-128.0));
    let scale = b.op("Div", &[&qp, &m], vec![]);
    let r = b.op("Mul", &[x, &scale], vec![]);
    let r = b.op("Round", &[&r], vec![]);
    let r = b.op("Clip", &[&r, &qn, &qp], vec![]);
    (b.op("Cast", &[&r], vec![to(DataType::Int8)]), scale)
}

/// `W: uint8[N, G*64]` and `S: float[N, G]` of an int4 linear as `float[N, K]` weights: per group, the low
/// nibbles then the high ones, minus 8, times the group's scale; the padding columns dropped.
fn int4_weights(b: &mut Body) -> String {
    let groups = b.i64s(&[0, -1, crate::kernels::int4::GROUP as i64 / 2]);
    let bytes = b.op("Reshape", &["W", &groups], vec![]);
    let (fifteen, four) = (
        b.constant(DataType::Uint8, &[], vec![15]),
        b.constant(DataType::Uint8, &[], vec![4]),
    );
    let lo = b.op("BitwiseAnd", &[&bytes, &fifteen], vec![]);
    let hi = b.op("BitShift", &[&bytes, &four], vec![shift_right()]);
    let codes = b.op("Concat", &[&lo, &hi], vec![attr_i("axis", -1)]);
    let codes = b.op("Cast", &[&codes], vec![to(DataType::Float)]);
    let eight = b.f32(8.0);
    let levels = b.op("Sub", &[&codes, &eight], vec![]);
    let last = b.i64s(&[-1]);
    let s = b.op("Unsqueeze", &["S", &last], vec![]);
    let w = b.op("Mul", &[&levels, &s], vec![]);
    let rows = b.i64s(&[0, -1]);
    let w = b.op("Reshape", &[&w, &rows], vec![]);
    let k = b.op("Shape", &["X"], vec![attr_i("start", -1)]);
    let (zero, axis1) = (b.i64s(&[0]), b.i64s(&[1]));
    b.op("Slice", &[&w, &zero, &k, &axis1], vec![])
}

/// The fused linear `spec`.
fn linear(spec: LinearSpec, opset: i64) -> FunctionProto {
    let mut b = Body::default();
    let x = if spec.norm {
        rms_norm(&mut b, "X", "N")
    } else {
        "X".to_string()
    };
    let mut y = match spec.weights {
        WeightFormat::F32 => {
            let wt = b.op("Transpose", &["W"], vec![attr_ints("perm", &[1, 0])]);
            b.op("MatMul", &[&x, &wt], vec![])
        }
        WeightFormat::Bit | WeightFormat::Int8 => {
            let (q, scale) = quantize(&mut b, &x);
            let acc = if spec.weights == WeightFormat::Bit {
                let out = b.fresh();
                b.push(
                    BIT_MATMUL,
                    DOMAIN,
                    &[&q, "W"],
                    std::slice::from_ref(&out),
                    vec![reference("in_features", "in_features", AttributeType::Int)],
                );
                out
            } else {
                let wt = b.op("Transpose", &["W"], vec![attr_ints("perm", &[1, 0])]);
                b.op("MatMulInteger", &[&q, &wt], vec![])
            };
            let y = b.op("Cast", &[&acc], vec![to(DataType::Float)]);
            let y = b.op("Div", &[&y, &scale], vec![]);
            b.op("Mul", &[&y, "S"], vec![])
        }
        WeightFormat::Int4 => {
            // The integer-valued activations against the weights times their group scales, in f32: the same
            // sum as the kernels' exact group sums times the scales, up to float rounding.
            let (q, scale) = quantize(&mut b, &x);
            let q = b.op("Cast", &[&q], vec![to(DataType::Float)]);
            let w = int4_weights(&mut b);
            let wt = b.op("Transpose", &[&w], vec![attr_ints("perm", &[1, 0])]);
            let y = b.op("MatMul", &[&q, &wt], vec![]);
            b.op("Div", &[&y, &scale], vec![])
        }
    };
    if let Some(glu) = spec.glu {
        let parts = b.op_n(
            "Split",
            &[&y],
            2,
            vec![attr_i("axis", -1), attr_i("num_outputs", 2)],
        );
        let act = match glu {
            Glu::Relu2 => {
                let r = b.op("Relu", &[&parts[0]], vec![]);
                b.op("Mul", &[&r, &r], vec![])
            }
            Glu::Silu => {
                let s = b.op("Sigmoid", &[&parts[0]], vec![]);
                b.op("Mul", &[&parts[0], &s], vec![])
            }
        };
        y = b.op("Mul", &[&act, &parts[1]], vec![]);
    }
    if spec.residual {
        y = b.op("Add", &["R", &y], vec![]);
    }
    b.output(&y, "Y");
    let mut attrs = vec!["in_features", "out_features"];
    if spec.norm {
        attrs.push("epsilon");
    }
    function(&spec.op_type(), &spec.inputs(), &["Y"], &attrs, b, opset)
}

/// Rotate-half RoPE of `x` (`[1, heads, S, D]`) with `cos`/`sin` (`[1, 1, S, D]`).
fn rope(b: &mut Body, x: &str, cos: &str, sin: &str, head_dim: usize) -> String {
    let half = (head_dim / 2) as i64;
    let (axes, zero, h, end) = (
        b.i64s(&[3]),
        b.i64s(&[0]),
        b.i64s(&[half]),
        b.i64s(&[2 * half]),
    );
    let x1 = b.op("Slice", &[x, &zero, &h, &axes], vec![]);
    let x2 = b.op("Slice", &[x, &h, &end, &axes], vec![]);
    let nx2 = b.op("Neg", &[&x2], vec![]);
    let rot = b.op("Concat", &[&nx2, &x1], vec![attr_i("axis", 3)]);
    let a = b.op("Mul", &[x, cos], vec![]);
    let r = b.op("Mul", &[&rot, sin], vec![]);
    b.op("Add", &[&a, &r], vec![])
}

/// `KvAttention` for the model's `shape`.
fn attention(shape: AttentionShape, opset: i64) -> FunctionProto {
    let (h, kvh, hd) = (
        shape.heads as i64,
        shape.kv_heads as i64,
        shape.head_dim as i64,
    );
    let mut b = Body::default();
    let sizes = b.i64s(&[h * hd, kvh * hd, kvh * hd]);
    let parts = b.op_n("Split", &["QKV", &sizes], 3, vec![attr_i("axis", -1)]);
    let heads = |b: &mut Body, x: &str, n: i64| {
        let s = b.i64s(&[1, -1, n, hd]);
        let r = b.op("Reshape", &[x, &s], vec![]);
        b.op("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 1, 3])])
    };
    let q = heads(&mut b, &parts[0], h);
    let k = heads(&mut b, &parts[1], kvh);
    let v = heads(&mut b, &parts[2], kvh);
    // RoPE tables for the given positions, as transformers' default rotary embedding computes them.
    let (ax1, ax2) = (b.i64s(&[1]), b.i64s(&[2]));
    let pos = b.op("Cast", &["P"], vec![to(DataType::Float)]);
    let pos = b.op("Unsqueeze", &[&pos, &ax2], vec![]);
    let freqs = b.op("Mul", &[&pos, "F"], vec![]);
    let emb = b.op("Concat", &[&freqs, &freqs], vec![attr_i("axis", -1)]);
    let cos = b.op("Cos", &[&emb], vec![]);
    let cos = b.op("Unsqueeze", &[&cos, &ax1], vec![]);
    let sin = b.op("Sin", &[&emb], vec![]);
    let sin = b.op("Unsqueeze", &[&sin, &ax1], vec![]);
    let q = rope(&mut b, &q, &cos, &sin, shape.head_dim);
    let k = rope(&mut b, &k, &cos, &sin, shape.head_dim);
    // Additive mask [1, 1, S, T]: key j is visible to query i iff kpos(j) <= position_ids(i) and mask(j) != 0.
    let one = b.constant(DataType::Int64, &[], 1i64.to_le_bytes().to_vec());
    let cs = b.op("CumSum", &["M", &one], vec![]);
    let kpos = b.op("Sub", &[&cs, &one], vec![]);
    let kpos = b.op("Unsqueeze", &[&kpos, &ax1], vec![]);
    let qpos = b.op("Unsqueeze", &["P", &ax2], vec![]);
    let causal = b.op("LessOrEqual", &[&kpos, &qpos], vec![]);
    let valid = b.op("Cast", &["M"], vec![to(DataType::Bool)]);
    let valid = b.op("Unsqueeze", &[&valid, &ax1], vec![]);
    let allowed = b.op("And", &[&causal, &valid], vec![]);
    let (zero, min) = (b.f32(0.0), b.f32(f32::MIN));
    let mask = b.op("Where", &[&allowed, &zero, &min], vec![]);
    let mask = b.op("Unsqueeze", &[&mask, &ax1], vec![]);
    let att = b.fresh();
    b.push(
        "Attention",
        "",
        &[&q, &k, &v, &mask, "PK", "PV"],
        &[att.clone(), "K".to_string(), "V".to_string()],
        vec![
            reference("scale", "scale", AttributeType::Float),
            attr_i("is_causal", 0),
        ],
    );
    let y = b.op("Transpose", &[&att], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let s = b.i64s(&[1, -1, h * hd]);
    let y = b.op("Reshape", &[&y, &s], vec![]);
    b.output(&y, "Y");
    function(
        ATTENTION,
        &["QKV", "P", "M", "F", "PK", "PV"],
        &["Y", "K", "V"],
        &["heads", "kv_heads", "head_dim", "scale"],
        b,
        opset,
    )
}

fn embedding(opset: i64) -> FunctionProto {
    let mut b = Body::default();
    let rows = b.op("Gather", &["W", "I"], vec![attr_i("axis", 0)]);
    let y = b.op("Cast", &[&rows], vec![to(DataType::Float)]);
    b.output(&y, "Y");
    function(EMBEDDING, &["I", "W"], &["Y"], &[], b, opset)
}

fn int8_embedding(opset: i64) -> FunctionProto {
    let mut b = Body::default();
    let rows = b.op("Gather", &["W", "I"], vec![attr_i("axis", 0)]);
    let rows = b.op("Cast", &[&rows], vec![to(DataType::Float)]);
    let s = b.op("Gather", &["S", "I"], vec![attr_i("axis", 0)]);
    let last = b.i64s(&[-1]);
    let s = b.op("Unsqueeze", &[&s, &last], vec![]);
    let y = b.op("Mul", &[&rows, &s], vec![]);
    b.output(&y, "Y");
    function(INT8_EMBEDDING, &["I", "W", "S"], &["Y"], &[], b, opset)
}

/// The definitions a model uses: its linears, its attention shape, both embeddings and `BitMatMul`, for a model
/// of the given standard opset (at least 23, for `Attention`).
pub fn definitions(
    opset: i64,
    linears: &[LinearSpec],
    shape: AttentionShape,
) -> Vec<FunctionProto> {
    let mut specs: Vec<LinearSpec> = vec![];
    for s in linears {
        if !specs.contains(s) {
            specs.push(*s);
        }
    }
    let mut f = vec![
        bit_matmul(opset),
        attention(shape, opset),
        embedding(opset),
        int8_embedding(opset),
    ];
    f.extend(specs.into_iter().map(|s| linear(s, opset)));
    f
}
