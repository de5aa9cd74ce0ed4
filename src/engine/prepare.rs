//! What the loader changes in an exported ONNX graph before tract parses it, as a pure function of the protobuf:
//! - the KV tensors (`past_key_values.*` inputs, `present.*` outputs) are cut from the graph and from every
//!   `KvAttention` node, whose cache is op state instead, and each attention node is told the cache format;
//! - the weights of bitnetd's ops (packed ternary matrices, int8 and f32 tables, the embedding) are taken out
//!   of the initializers, which tract would copy into memory, and each node gets where its weights are in the
//!   data file instead (`engine::weights` reads them in place), and how to hold them.
//!
//! The file on disk is never changed: other runtimes still see standard external-data initializers.

use std::collections::HashSet;

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataLocation;
use tract_onnx::pb::{AttributeProto, ModelProto, TensorProto};

use super::kv::KvFormat;
use super::ops::screen::OutputLayer;
use super::ops::{self, LinearSpec, ATTENTION, DOMAIN, EMBEDDING, INT8_EMBEDDING};
use super::weights::WeightResidency;

/// How the prepared graph should run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrepareOptions {
    pub kv_format: KvFormat,
    pub residency: WeightResidency,
    pub output_layer: OutputLayer,
}

/// Errors preparing a graph: it is not one bitnetd exported (or of an older format).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrepareError {
    #[error("the graph has no {DOMAIN}.{ATTENTION} layers: it was exported by an older bitnetd; re-export it with `bitnetd export`")]
    OldFormat,
    #[error("the model proto has no graph")]
    NoGraph,
    #[error("{node}: weights {name:?} are not an initializer")]
    MissingWeights { node: String, name: String },
    #[error("{node}: weights {name:?} are not stored in the external data file")]
    NotExternal { node: String, name: String },
    #[error("weights {name:?}: bad external data entry {key:?} = {value:?}")]
    BadExternal {
        name: String,
        key: String,
        value: String,
    },
}

/// What [`prepare`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Attention layers whose cache became op state.
    pub attention_layers: usize,
    /// Initializers now read in place.
    pub mapped_weights: usize,
}

/// Prepares `proto` for tract (see the module docs).
pub fn prepare(proto: &mut ModelProto, opts: PrepareOptions) -> Result<Prepared, PrepareError> {
    let graph = proto.graph.as_mut().ok_or(PrepareError::NoGraph)?;
    let mut cut: HashSet<String> = HashSet::new();
    let mut taken: HashSet<String> = HashSet::new();
    let mut done = Prepared::default();
    for node in graph.node.iter_mut().filter(|n| n.domain == DOMAIN) {
        let weight_input = if node.op_type == ATTENTION {
            for slot in node
                .input
                .iter_mut()
                .skip(4)
                .chain(node.output.iter_mut().skip(1))
            {
                cut.insert(std::mem::take(slot));
            }
            node.attribute
                .push(attr_s(ops::ATTR_KV_FORMAT, opts.kv_format.name()));
            done.attention_layers += 1;
            None
        } else if node.op_type == EMBEDDING || node.op_type == INT8_EMBEDDING {
            Some(1)
        } else {
            LinearSpec::parse(&node.op_type).map(|s| {
                node.attribute.extend([
                    attr_s(ops::ATTR_RESIDENCY, opts.residency.name()),
                    attr_s(ops::ATTR_OUTPUT_LAYER, opts.output_layer.name()),
                ]);
                s.inputs()
                    .iter()
                    .position(|&i| i == "W")
                    .expect("every linear has W")
            })
        };
        let Some(i) = weight_input else { continue };
        let name = node.input.get(i).cloned().unwrap_or_default();
        let init = graph
            .initializer
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| PrepareError::MissingWeights {
                node: node.name.clone(),
                name: name.clone(),
            })?;
        let (location, offset, length) =
            external(init).ok_or_else(|| PrepareError::NotExternal {
                node: node.name.clone(),
                name: name.clone(),
            })??;
        node.attribute.extend([
            attr_s(ops::ATTR_WEIGHT_LOCATION, &location),
            attr_i(ops::ATTR_WEIGHT_OFFSET, offset as i64),
            attr_i(ops::ATTR_WEIGHT_LENGTH, length as i64),
            attr_i(ops::ATTR_WEIGHT_DTYPE, init.data_type as i64),
            attr_ints(ops::ATTR_WEIGHT_DIMS, &init.dims),
        ]);
        node.input[i] = String::new();
        taken.insert(name);
    }
    if done.attention_layers == 0 {
        return Err(PrepareError::OldFormat);
    }
    cut.remove("");
    // An initializer some other node still reads stays (none do in an export).
    let still_read: HashSet<&String> = graph.node.iter().flat_map(|n| n.input.iter()).collect();
    let taken: HashSet<String> = taken
        .into_iter()
        .filter(|n| !still_read.contains(n))
        .collect();
    graph.initializer.retain(|t| !taken.contains(&t.name));
    done.mapped_weights = taken.len();
    graph.input.retain(|i| !cut.contains(&i.name));
    graph.output.retain(|o| !cut.contains(&o.name));
    Ok(done)
}

/// `(location, offset, length)` of an external initializer; `None` if it is stored inline.
fn external(t: &TensorProto) -> Option<Result<(String, usize, usize), PrepareError>> {
    if t.data_location != Some(DataLocation::External as i32) {
        return None;
    }
    let get = |key: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    };
    let bad = |key: &str, value: String| PrepareError::BadExternal {
        name: t.name.clone(),
        key: key.into(),
        value,
    };
    Some((|| {
        let location = get("location").ok_or_else(|| bad("location", String::new()))?;
        let p = std::path::Path::new(&location);
        if !p
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(bad("location", location));
        }
        let num = |key: &str| -> Result<usize, PrepareError> {
            let v = get(key).ok_or_else(|| bad(key, String::new()))?;
            v.parse().map_err(|_| bad(key, v))
        };
        Ok((location.clone(), num("offset")?, num("length")?))
    })())
}

fn attr_s(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn attr_i(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{GraphProto, NodeProto, StringStringEntryProto, ValueInfoProto};

    /// Inputs of the node that are now empty.
    fn blanked(n: &NodeProto) -> usize {
        n.input.iter().filter(|i| i.is_empty()).count()
    }

    fn ext(name: &str, offset: usize, length: usize) -> TensorProto {
        let kv = |k: &str, v: String| StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        TensorProto {
            name: name.into(),
            data_location: Some(DataLocation::External as i32),
            external_data: vec![
                kv("location", "model.onnx.data".into()),
                kv("offset", offset.to_string()),
                kv("length", length.to_string()),
            ],
            dims: vec![4, 32],
            data_type: 2,
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            domain: DOMAIN.into(),
            name: format!("{op}-node"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn io(name: &str) -> ValueInfoProto {
        ValueInfoProto {
            name: name.into(),
            ..Default::default()
        }
    }

    fn model() -> ModelProto {
        ModelProto {
            graph: Some(GraphProto {
                node: vec![
                    node(EMBEDDING, &["input_ids", "embed"], &["x"]),
                    node("BitLinearNorm", &["x", "n", "w", "s"], &["qkv"]),
                    node(
                        ATTENTION,
                        &[
                            "qkv",
                            "position_ids",
                            "attention_mask",
                            "inv_freq",
                            "past.k",
                            "past.v",
                        ],
                        &["y", "present.k", "present.v"],
                    ),
                ],
                initializer: vec![
                    ext("embed", 0, 256),
                    ext("w", 256, 128),
                    TensorProto {
                        name: "n".into(),
                        ..Default::default()
                    },
                ],
                input: vec![
                    io("input_ids"),
                    io("position_ids"),
                    io("attention_mask"),
                    io("past.k"),
                    io("past.v"),
                ],
                output: vec![io("y"), io("present.k"), io("present.v")],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn attr<'a>(n: &'a NodeProto, name: &str) -> &'a AttributeProto {
        n.attribute.iter().find(|a| a.name == name).unwrap()
    }

    #[test]
    fn the_cache_becomes_state_and_weights_become_references() {
        let mut m = model();
        let opts = PrepareOptions {
            kv_format: KvFormat::F16,
            residency: WeightResidency::Mapped,
            output_layer: OutputLayer::Exact,
        };
        let done = prepare(&mut m, opts).unwrap();
        assert_eq!(
            done,
            Prepared {
                attention_layers: 1,
                mapped_weights: 2
            }
        );
        let g = m.graph.unwrap();
        let names = |v: &[ValueInfoProto]| v.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&g.input),
            ["input_ids", "position_ids", "attention_mask"]
        );
        assert_eq!(names(&g.output), ["y"]);
        assert_eq!(g.initializer.len(), 1, "only the small norm weights stay");
        let (embed, linear, attention) = (&g.node[0], &g.node[1], &g.node[2]);
        assert_eq!(blanked(embed), 1);
        assert_eq!(linear.input, ["x", "n", "", "s"]);
        assert_eq!(attr(linear, ops::ATTR_WEIGHT_OFFSET).i, 256);
        assert_eq!(attr(linear, ops::ATTR_WEIGHT_LENGTH).i, 128);
        assert_eq!(
            attr(linear, ops::ATTR_WEIGHT_LOCATION).s,
            b"model.onnx.data"
        );
        assert_eq!(attr(linear, ops::ATTR_RESIDENCY).s, b"mapped");
        assert_eq!(attr(linear, ops::ATTR_OUTPUT_LAYER).s, b"exact");
        assert_eq!(attr(embed, ops::ATTR_WEIGHT_DIMS).ints, [4, 32]);
        assert_eq!(attention.input.iter().filter(|i| !i.is_empty()).count(), 4);
        assert_eq!(attention.output, ["y", "", ""]);
        assert_eq!(attr(attention, ops::ATTR_KV_FORMAT).s, b"f16");
    }

    #[test]
    fn graphs_bitnetd_cannot_run_in_place_are_refused() {
        let mut old = model();
        old.graph.as_mut().unwrap().node.remove(2);
        assert_eq!(
            prepare(&mut old, Default::default()),
            Err(PrepareError::OldFormat)
        );
        let mut inline = model();
        inline.graph.as_mut().unwrap().initializer[1].data_location = None;
        assert!(matches!(
            prepare(&mut inline, Default::default()),
            Err(PrepareError::NotExternal { .. })
        ));
        let mut escape = model();
        escape.graph.as_mut().unwrap().initializer[1].external_data[0].value = "../x".into();
        assert!(matches!(
            prepare(&mut escape, Default::default()),
            Err(PrepareError::BadExternal { .. })
        ));
    }
}
