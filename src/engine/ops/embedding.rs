//! `Embedding(input_ids, table)` and `Int8Embedding(input_ids, table, scale)`: the token lookup, reading one row
//! per token from the model's data file (`pread`; the table is never resident) in f16, f32, or int8 with one scale
//! per row, into f32 `[1, S, hidden]`. Ids outside the vocabulary are an error.

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::{node_rows, ATTR_WEIGHT_DIMS, ATTR_WEIGHT_DTYPE, INT8_EMBEDDING};
use crate::engine::weights::Weights;
use crate::kernels::f16;

/// How the table stores a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableType {
    F16,
    F32,
    Int8,
}

impl TableType {
    fn bytes(self) -> usize {
        match self {
            TableType::F16 => 2,
            TableType::F32 => 4,
            TableType::Int8 => 1,
        }
    }
}

pub(crate) fn parse(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let dims: Vec<usize> = node.get_attr_vec(ATTR_WEIGHT_DIMS)?;
    ensure!(
        dims.len() == 2,
        "{}: the table must be 2-D, got {dims:?}",
        node.name
    );
    let dtype: i64 = node.get_attr(ATTR_WEIGHT_DTYPE)?;
    let int8 = node.op_type == INT8_EMBEDDING;
    let table = match dtype {
        d if d == DataType::Float16 as i64 && !int8 => TableType::F16,
        d if d == DataType::Float as i64 && !int8 => TableType::F32,
        d if d == DataType::Int8 as i64 && int8 => TableType::Int8,
        d => bail!(
            "{}: {} cannot read a table of ONNX type {d}",
            node.name,
            node.op_type
        ),
    };
    let weights = node_rows(ctx, node)?;
    let (vocab, hidden) = (dims[0], dims[1]);
    ensure!(
        weights.len() == vocab * hidden * table.bytes(),
        "{}: the table has {} bytes, not {vocab}×{hidden}",
        node.name,
        weights.len()
    );
    Ok((
        expand(EmbeddingExpansion(Lookup {
            table,
            vocab,
            hidden,
            weights,
            scale: None,
        })),
        vec![],
    ))
}

#[derive(Debug, Clone)]
struct EmbeddingExpansion(Lookup);

impl Expansion for EmbeddingExpansion {
    fn name(&self) -> StaticName {
        "Embedding".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1 + usize::from(self.0.table == TableType::Int8))?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, 3)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[1], &inputs[0].shape[1])?;
        s.equals(&outputs[0].shape[2], self.0.hidden.to_dim())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let mut op = self.0.clone();
        if op.table == TableType::Int8 {
            let s = model
                .outlet_fact(inputs[1])?
                .konst
                .clone()
                .with_context(|| format!("{prefix}: the row scales must be a constant"))?;
            let s = s.cast_to::<f32>()?;
            let plain = s.try_as_plain_ram()?;
            let s = plain.as_slice::<f32>()?;
            ensure!(
                s.len() == op.vocab,
                "{prefix}: {} row scales for {}",
                s.len(),
                op.vocab
            );
            op.scale = Some(s.into());
        }
        model.wire_node(prefix, op, &inputs[..1])
    }
}

/// The lookup, ready to run.
#[derive(Debug, Clone)]
pub struct Lookup {
    table: TableType,
    vocab: usize,
    hidden: usize,
    weights: Arc<Weights>,
    scale: Option<Arc<[f32]>>,
}

impl Lookup {
    /// The table, read by rows.
    pub fn weights(&self) -> &Arc<Weights> {
        &self.weights
    }

    pub fn table(&self) -> TableType {
        self.table
    }
}

impl PartialEq for Lookup {
    fn eq(&self, other: &Self) -> bool {
        self.table == other.table && Arc::ptr_eq(&self.weights, &other.weights)
    }
}

impl Eq for Lookup {}

impl Op for Lookup {
    fn name(&self) -> StaticName {
        "Embedding".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}×{} {:?} table, mapped",
            self.vocab, self.hidden, self.table
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Lookup {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let ids = inputs[0].cast_to::<i64>()?;
        let plain = ids.try_as_plain_ram()?;
        let ids = plain.as_slice::<i64>()?;
        let h = self.hidden;
        let mut shape: TVec<usize> = inputs[0].shape().into();
        shape.push(h);
        let mut out = Tensor::zero::<f32>(&shape)?;
        let mut op = out.try_as_plain_ram_mut()?;
        let dst = op.as_slice_mut::<f32>()?;
        let mut raw = Vec::new();
        for (t, &id) in ids.iter().enumerate() {
            ensure!(
                (0..self.vocab as i64).contains(&id),
                "token id {id} is outside the vocabulary of {}",
                self.vocab
            );
            let (id, row) = (id as usize, &mut dst[t * h..(t + 1) * h]);
            let size = self.table.bytes();
            raw.resize(h * size, 0);
            self.weights
                .read_at(id * h * size, &mut raw)
                .with_context(|| format!("reading embedding row {id}"))?;
            match self.table {
                TableType::F16 => {
                    let bits: Vec<u16> = raw
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]))
                        .collect();
                    f16::to_f32(&bits, row);
                }
                TableType::F32 => {
                    for (d, b) in row.iter_mut().zip(raw.chunks_exact(4)) {
                        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
                TableType::Int8 => {
                    let s = self.scale.as_ref().context("row scales")?[id];
                    for (d, &q) in row.iter_mut().zip(&raw) {
                        *d = q as i8 as f32 * s;
                    }
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Lookup {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        shape.push(self.hidden.into());
        Ok(tvec!(f32::fact(&shape)))
    }

    as_op!();
}
