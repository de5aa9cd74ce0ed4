//! Reading facts out of an exported graph without loading it (for the memory estimate before a model loads).

use std::path::Path;

use prost::Message;
use tract_onnx::pb::{ModelProto, TensorProto};

use crate::engine::ops::{LinearSpec, WeightFormat, DOMAIN, EMBEDDING, INT8_EMBEDDING};

/// What the memory estimate reads from a graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphFacts {
    /// Bytes of the embedding table when only the lookup reads it (a table shared with the output layer is
    /// read in full every token, so it is not counted here); 0 when there is none.
    pub lookup_only_table: u64,
    /// Bytes of the int8 weights of plain int8 products (the output layer), which the screened output layer
    /// holds as their high 4 bits only (`engine::ops::screen`).
    pub int8_output_layer: u64,
}

/// Reads the [`GraphFacts`] of the ONNX file `onnx`.
pub fn graph_facts(onnx: &Path) -> std::io::Result<GraphFacts> {
    let bytes = std::fs::read(onnx)?;
    let model = ModelProto::decode(&bytes[..])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(GraphFacts {
        lookup_only_table: table_bytes(&model),
        int8_output_layer: int8_output_bytes(&model),
    })
}

fn int8_output_bytes(model: &ModelProto) -> u64 {
    let Some(g) = &model.graph else { return 0 };
    g.node
        .iter()
        .filter(|n| n.domain == DOMAIN)
        .filter_map(|n| {
            let spec = LinearSpec::parse(&n.op_type)?;
            if spec.weights != WeightFormat::Int8 || spec.glu.is_some() || spec.residual {
                return None;
            }
            let w = spec.inputs().iter().position(|&i| i == "W")?;
            let name = n.input.get(w)?;
            g.initializer
                .iter()
                .find(|t| &t.name == name)
                .map(stored_len)
        })
        .sum()
}

fn table_bytes(model: &ModelProto) -> u64 {
    let Some(g) = &model.graph else { return 0 };
    let Some(lookup) = g
        .node
        .iter()
        .find(|n| n.domain == DOMAIN && (n.op_type == EMBEDDING || n.op_type == INT8_EMBEDDING))
    else {
        return 0;
    };
    let Some(table) = lookup.input.get(1) else {
        return 0;
    };
    let readers = g
        .node
        .iter()
        .filter(|n| n.input.iter().any(|i| i == table))
        .count();
    if readers > 1 {
        return 0;
    }
    g.initializer
        .iter()
        .find(|t| &t.name == table)
        .map_or(0, stored_len)
}

fn stored_len(t: &TensorProto) -> u64 {
    t.external_data
        .iter()
        .find(|e| e.key == "length")
        .and_then(|e| e.value.parse().ok())
        .unwrap_or(t.raw_data.len() as u64)
}
