//! A small ONNX graph builder over tract-onnx's protobuf types. Large initializers are streamed to an external
//! data file as they are added, so exporting a 2B-parameter model never holds all its weights in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::{DataLocation, DataType};
use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
use tract_onnx::pb::type_proto::{Tensor as TensorType, Value};
use tract_onnx::pb::*;

/// Initializers at least this large go to the external data file.
const EXTERNAL_THRESHOLD: usize = 1024;
/// Offsets of external tensors are aligned to this (page-friendly for runtimes that map the file).
const ALIGN: u64 = 64;

/// One dimension of a graph input or output.
pub enum Dim {
    Fixed(i64),
    Symbol(&'static str),
}

/// Builds a `GraphProto` node by node. Every value name it returns is unique in the graph.
pub struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counter: usize,
    data: BufWriter<File>,
    data_location: String,
    offset: u64,
    /// Bytes written to the external file so far.
    pub external_bytes: u64,
}

impl GraphBuilder {
    /// Starts a graph whose external data goes to `dir/data_location`.
    pub fn new(dir: &Path, data_location: &str) -> std::io::Result<Self> {
        let data = BufWriter::with_capacity(1 << 20, File::create(dir.join(data_location))?);
        Ok(GraphBuilder {
            nodes: vec![],
            initializers: vec![],
            counter: 0,
            data,
            data_location: data_location.to_string(),
            offset: 0,
            external_bytes: 0,
        })
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}/{}", self.counter)
    }

    /// Adds a node with one output, named after `hint`, and returns the output's name.
    pub fn op(
        &mut self,
        op_type: &str,
        hint: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) -> String {
        self.op_n(op_type, hint, inputs, 1, attrs)
            .pop()
            .expect("one output")
    }

    /// Adds a node with `n` outputs and returns their names.
    pub fn op_n(
        &mut self,
        op_type: &str,
        hint: &str,
        inputs: &[&str],
        n: usize,
        attrs: Vec<AttributeProto>,
    ) -> Vec<String> {
        let name = self.fresh(&format!("{hint}/{op_type}"));
        let outputs: Vec<String> = (0..n).map(|i| format!("{name}:{i}")).collect();
        self.op_into(op_type, &name, inputs, &outputs, attrs);
        outputs
    }

    /// Adds a node of a custom operator `domain` (defined by a function in the model) with one output.
    pub fn custom_op(
        &mut self,
        domain: &str,
        op_type: &str,
        hint: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
    ) -> String {
        let out = self.op(op_type, hint, inputs, attrs);
        self.nodes.last_mut().expect("just added").domain = domain.to_string();
        out
    }

    /// Adds a node writing to the given output names (for graph outputs).
    pub fn op_into(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[String],
        attrs: Vec<AttributeProto>,
    ) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.to_vec(),
            name: name.to_string(),
            op_type: op_type.to_string(),
            attribute: attrs,
            ..Default::default()
        });
    }

    /// Sets the domain of the node added last (a custom op written with [`GraphBuilder::op_into`]).
    pub fn set_last_domain(&mut self, domain: &str) {
        if let Some(n) = self.nodes.last_mut() {
            n.domain = domain.to_string();
        }
    }

    /// Adds an initializer from raw little-endian bytes; large ones are appended to the external file.
    pub fn initializer(
        &mut self,
        hint: &str,
        dt: DataType,
        dims: &[usize],
        raw: &[u8],
    ) -> std::io::Result<String> {
        self.initializer_in(hint, dt, dims, raw, raw.len() >= EXTERNAL_THRESHOLD)
    }

    /// Adds an initializer that always goes to the external file, whatever its size (weights that bitnetd's
    /// ops read in place from the file).
    pub fn weights(
        &mut self,
        hint: &str,
        dt: DataType,
        dims: &[usize],
        raw: &[u8],
    ) -> std::io::Result<String> {
        self.initializer_in(hint, dt, dims, raw, true)
    }

    fn initializer_in(
        &mut self,
        hint: &str,
        dt: DataType,
        dims: &[usize],
        raw: &[u8],
        external: bool,
    ) -> std::io::Result<String> {
        let name = self.fresh(hint);
        let mut t = TensorProto {
            name: name.clone(),
            data_type: dt as i32,
            dims: dims.iter().map(|&d| d as i64).collect(),
            ..Default::default()
        };
        if external {
            let pad = (ALIGN - self.offset % ALIGN) % ALIGN;
            self.data.write_all(&vec![0u8; pad as usize])?;
            self.offset += pad;
            self.data.write_all(raw)?;
            let kv = |k: &str, v: String| StringStringEntryProto {
                key: k.into(),
                value: v,
            };
            t.data_location = Some(DataLocation::External as i32);
            t.external_data = vec![
                kv("location", self.data_location.clone()),
                kv("offset", self.offset.to_string()),
                kv("length", raw.len().to_string()),
            ];
            self.offset += raw.len() as u64;
            self.external_bytes = self.offset;
        } else {
            t.raw_data = raw.to_vec();
        }
        self.initializers.push(t);
        Ok(name)
    }

    /// An f32 initializer.
    pub fn f32s(&mut self, hint: &str, dims: &[usize], v: &[f32]) -> std::io::Result<String> {
        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.initializer(hint, DataType::Float, dims, &raw)
    }

    /// An i64 initializer (shapes, axes).
    pub fn i64s(&mut self, hint: &str, v: &[i64]) -> String {
        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.initializer(hint, DataType::Int64, &[v.len()], &raw)
            .expect("small initializers stay inline")
    }

    /// An f32 scalar initializer.
    pub fn scalar(&mut self, hint: &str, v: f32) -> String {
        self.initializer(hint, DataType::Float, &[], &v.to_le_bytes())
            .expect("small initializers stay inline")
    }

    /// Finishes the graph into a model with the given standard opset, inputs and outputs, and the functions
    /// defining its custom operators (`(domain, version)` each in `custom`).
    pub fn finish(
        mut self,
        opset: i64,
        custom: &[(&str, i64)],
        functions: Vec<FunctionProto>,
        inputs: Vec<ValueInfoProto>,
        outputs: Vec<ValueInfoProto>,
        doc: &str,
    ) -> std::io::Result<ModelProto> {
        self.data.flush()?;
        let graph = GraphProto {
            node: self.nodes,
            name: "bitnet".into(),
            initializer: self.initializers,
            input: inputs,
            output: outputs,
            ..Default::default()
        };
        Ok(ModelProto {
            ir_version: 10,
            opset_import: std::iter::once(("", opset))
                .chain(custom.iter().copied())
                .map(|(domain, version)| OperatorSetIdProto {
                    domain: domain.to_string(),
                    version,
                })
                .collect(),
            functions,
            producer_name: "bitnetd".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc.into(),
            graph: Some(graph),
            ..Default::default()
        })
    }
}

/// A graph input or output of tensor type with a known rank; `dims: None` leaves the shape unstated.
pub fn value_info(name: &str, dt: DataType, dims: Option<&[Dim]>) -> ValueInfoProto {
    let shape = dims.map(|dims| {
        let dim = dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d {
                    Dim::Fixed(v) => dimension::Value::DimValue(*v),
                    Dim::Symbol(s) => dimension::Value::DimParam(s.to_string()),
                }),
                ..Default::default()
            })
            .collect();
        TensorShapeProto { dim }
    });
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(Value::TensorType(TensorType {
                elem_type: dt as i32,
                shape,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An integer attribute.
pub fn attr_i(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

/// A float attribute.
pub fn attr_f(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

/// An integer-list attribute.
pub fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}
