//! Reading facts out of an exported graph without loading it (for the memory estimate before a model loads).

use std::path::Path;

use prost::Message;
use tract_onnx::pb::{ModelProto, TensorProto};

use crate::engine::ops::{DOMAIN, EMBEDDING, INT8_EMBEDDING};

/// Bytes of the embedding table when only the lookup reads it (a table shared with the output layer is read in
/// full every token, so it is not counted here); 0 when there is none.
pub fn lookup_only_table_bytes(onnx: &Path) -> std::io::Result<u64> {
    let bytes = std::fs::read(onnx)?;
    let model = ModelProto::decode(&bytes[..])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(table_bytes(&model))
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
