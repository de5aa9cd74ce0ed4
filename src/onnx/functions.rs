//! ONNX function bodies for bitnetd's own ops, written into every exported model so that any ONNX runtime can run
//! it: tract replaces the ops with its packed kernels (`engine::linear_op`), others (onnxruntime) inline these
//! standard-op definitions.
//!
//! - `BitLinear(X: int8[..., K], W: uint8[N, B*32]) -> int32[..., N]`, attribute `in_features` = K: unpacks the
//!   2-bit layout of `kernels::pack` (shift by 0/2/4/6, mask 3, flatten, drop the padding, subtract 1) and runs
//!   `MatMulInteger(X, Wᵀ)`.
//! - `Int8Linear(X: int8[..., K], W: int8[N, K]) -> int32[..., N]`: `MatMulInteger(X, Wᵀ)`.

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::*;

use super::builder::{attr_i, attr_ints};
use crate::engine::linear_op::{BIT_LINEAR, DOMAIN, INT8_LINEAR};

/// Version of the `ai.bitnetd` operator set.
pub const DOMAIN_VERSION: i64 = 1;

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: output.to_string(),
        op_type: op.to_string(),
        attribute,
        ..Default::default()
    }
}

/// A `Constant` node holding a tensor.
fn constant(output: &str, dt: DataType, dims: &[i64], raw: Vec<u8>) -> NodeProto {
    let t = TensorProto {
        data_type: dt as i32,
        dims: dims.to_vec(),
        raw_data: raw,
        ..Default::default()
    };
    let value = AttributeProto {
        name: "value".into(),
        r#type: AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    };
    node("Constant", &[], output, vec![value])
}

fn i64s(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn function(name: &str, attribute: &[&str], nodes: Vec<NodeProto>, opset: i64) -> FunctionProto {
    FunctionProto {
        name: Some(name.into()),
        domain: Some(DOMAIN.into()),
        input: vec!["X".into(), "W".into()],
        output: vec!["Y".into()],
        attribute: attribute.iter().map(|s| s.to_string()).collect(),
        node: nodes,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        ..Default::default()
    }
}

/// The definitions of both ops, for a model of the given standard opset (at least 18, for `BitwiseAnd`).
pub fn definitions(opset: i64) -> Vec<FunctionProto> {
    let bit_linear = vec![
        constant("blocks_shape", DataType::Int64, &[4], i64s(&[0, -1, 1, 32])),
        node("Reshape", &["W", "blocks_shape"], "blocks", vec![]),
        constant("shifts", DataType::Uint8, &[4, 1], vec![0, 2, 4, 6]),
        node(
            "BitShift",
            &["blocks", "shifts"],
            "shifted",
            vec![AttributeProto {
                name: "direction".into(),
                r#type: AttributeType::String as i32,
                s: b"RIGHT".to_vec(),
                ..Default::default()
            }],
        ),
        constant("three", DataType::Uint8, &[], vec![3]),
        node("BitwiseAnd", &["shifted", "three"], "codes4", vec![]),
        constant("rows_shape", DataType::Int64, &[2], i64s(&[0, -1])),
        node("Reshape", &["codes4", "rows_shape"], "codes_padded", vec![]),
        node("Shape", &["X"], "k", vec![attr_i("start", -1)]),
        constant("zero", DataType::Int64, &[1], i64s(&[0])),
        constant("axis1", DataType::Int64, &[1], i64s(&[1])),
        node(
            "Slice",
            &["codes_padded", "zero", "k", "axis1"],
            "codes",
            vec![],
        ),
        node(
            "Cast",
            &["codes"],
            "codes32",
            vec![attr_i("to", DataType::Int32 as i64)],
        ),
        constant("one", DataType::Int32, &[], 1i32.to_le_bytes().to_vec()),
        node("Sub", &["codes32", "one"], "w32", vec![]),
        node(
            "Cast",
            &["w32"],
            "w8",
            vec![attr_i("to", DataType::Int8 as i64)],
        ),
        node("Transpose", &["w8"], "wt", vec![attr_ints("perm", &[1, 0])]),
        node("MatMulInteger", &["X", "wt"], "Y", vec![]),
    ];
    let int8_linear = vec![
        node("Transpose", &["W"], "wt", vec![attr_ints("perm", &[1, 0])]),
        node("MatMulInteger", &["X", "wt"], "Y", vec![]),
    ];
    vec![
        function(BIT_LINEAR, &["in_features"], bit_linear, opset),
        function(INT8_LINEAR, &[], int8_linear, opset),
    ]
}
