//! The ONNX graph of a BitNet b1.58 decoder, as transformers computes it, in bitnetd's fused ops (see
//! `onnx::functions` for their definitions in standard ops, which onnxruntime runs):
//! - `Embedding` / `Int8Embedding` for the token lookup;
//! - per layer: `BitLinearNorm` (input norm, quantization, fused Q/K/V product), `KvAttention` (RoPE, GQA, the KV
//!   cache as explicit past/present tensors), `BitLinear[Norm]Add` (attention sub-norm, O projection, residual),
//!   `BitLinearNorm{Relu2,Silu}Glu` (post-attention norm, fused gate/up product, activation),
//!   `BitLinear[Norm]Add` (FFN sub-norm, down projection, residual);
//! - the last position's final norm and output layer, `Int8LinearNorm`, `Int4LinearNorm` or `F32LinearNorm`.
//!
//! Inputs: `input_ids`, `attention_mask` (`[1, past + seq]`), `position_ids`, `past_key_values.{i}.key|value`
//! (`[1, kv_heads, past, head_dim]`). Outputs: `logits` for the last position only (`[1, 1, vocab]`) and
//! `present.{i}.key|value`. Batch is 1: bitnetd runs one sequence per session.

use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{ModelProto, ValueInfoProto};

use super::builder::{attr_f, attr_i, value_info, Dim, GraphBuilder};
use super::functions::{self, AttentionShape, DOMAIN_VERSION};
use crate::engine::ops::{
    Glu, LinearSpec, WeightFormat, ATTENTION, DOMAIN, EMBEDDING, INT8_EMBEDDING,
};
use crate::hf::{Activation, Architecture, Family, HfError, TernaryMatrix, Weights};
use crate::kernels::int4;
use crate::kernels::pack::{self, PackError};

/// The opset the graph is written for (ONNX `Attention`, used by the `KvAttention` body, is opset 23).
pub const OPSET: i64 = 23;

/// Errors building the graph.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error(transparent)]
    Hf(#[from] HfError),
    #[error("writing external data: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Pack(#[from] PackError),
}

/// Progress of a long export, reported after each layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerDone {
    pub layer: usize,
    pub layers: usize,
}

/// How the output layer is stored.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum HeadFormat {
    /// f32 rows: logits as transformers computes them.
    #[default]
    F32,
    /// int8 with one scale per vocabulary row, on int8 activations (per-token absmax, like the BitLinear
    /// layers): a quarter of the bytes read per token. Logits move by about 1% of their range
    /// (`tests/reference.rs`).
    Int8,
    /// 4 bits per weight in groups of 128 columns, each group with its own scale (`kernels::int4`), on int8
    /// activations: half of int8's bytes per token. Not offered by `bitnetd export`: alone it moves logits by
    /// 8-15% of their range and changes greedy continuations of the reference fixtures
    /// (`tests/reference.rs`); it needs the exact rescoring of its best candidates before it is an option.
    #[value(skip)]
    Int4,
}

/// How the token embedding (lookup table) is stored.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingFormat {
    /// f16 when every value fits (bf16 and f16 checkpoints; see `fits_f16`), else f32.
    #[default]
    Float,
    /// int8 with one scale per row, shared with an int8 output layer when tied: the smallest model. The input
    /// perturbation crosses many activation-quantization boundaries downstream, so logits move by 3-9% of their
    /// range on the reference fixtures (`tests/reference.rs`).
    Int8,
}

/// How the vocabulary-sized tables are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableFormats {
    pub head: HeadFormat,
    pub embedding: EmbeddingFormat,
}

impl std::fmt::Display for HeadFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HeadFormat::F32 => "f32",
            HeadFormat::Int8 => "int8",
            HeadFormat::Int4 => "int4",
        })
    }
}

impl std::fmt::Display for EmbeddingFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EmbeddingFormat::Float => "float",
            EmbeddingFormat::Int8 => "int8",
        })
    }
}

/// A quantized table and its f32 scales (one per row for int8, one per group of a row for int4).
struct ScaledTable {
    data: String,
    scale: String,
}

/// The output layer's constant.
enum Head {
    /// `[vocab, hidden]` f32 rows.
    F32(String),
    Int8(ScaledTable),
    Int4(ScaledTable),
}

struct Ctx<'a> {
    g: GraphBuilder,
    arch: &'a Architecture,
    w: &'a Weights,
    specs: Vec<LinearSpec>,
}

/// What a fused linear adds to its product.
struct Around<'a> {
    /// Initializer of the RMSNorm weights, if the input is normalized first.
    norm: Option<String>,
    glu: Option<Glu>,
    residual: Option<&'a str>,
}

impl Ctx<'_> {
    fn norm_weight(&mut self, name: &str, dim: usize, hint: &str) -> Result<String, GraphError> {
        let w = self.w.floats(name, &[dim])?;
        Ok(self.g.f32s(&format!("{hint}.weight"), &[dim], &w)?)
    }

    /// A fused linear node over `x` with weights `w` (and scales `s`), `n` outputs of `k` inputs.
    #[allow(clippy::too_many_arguments)]
    fn linear_node(
        &mut self,
        weights: WeightFormat,
        x: &str,
        w: &str,
        s: Option<&str>,
        (n, k): (usize, usize),
        around: Around<'_>,
        hint: &str,
    ) -> String {
        let spec = LinearSpec {
            weights,
            norm: around.norm.is_some(),
            glu: around.glu,
            residual: around.residual.is_some(),
        };
        let mut inputs = vec![x];
        if let Some(nw) = &around.norm {
            inputs.push(nw);
        }
        inputs.push(w);
        if let Some(s) = s {
            inputs.push(s);
        }
        if let Some(r) = around.residual {
            inputs.push(r);
        }
        let mut attrs = vec![
            attr_i("in_features", k as i64),
            attr_i("out_features", n as i64),
        ];
        if spec.norm {
            attrs.push(attr_f("epsilon", self.arch.rms_norm_eps));
        }
        self.specs.push(spec);
        self.g
            .custom_op(DOMAIN, &spec.op_type(), hint, &inputs, attrs)
    }

    /// One fused ternary linear for several matrices sharing an input (their outputs concatenated).
    fn bitlinear(
        &mut self,
        x: &str,
        mats: &[TernaryMatrix],
        around: Around<'_>,
        hint: &str,
    ) -> Result<String, GraphError> {
        let k = mats[0].cols;
        let n: usize = mats.iter().map(|m| m.rows).sum();
        let mut values = Vec::with_capacity(k * n);
        let mut col_scale = Vec::with_capacity(n);
        for m in mats {
            values.extend_from_slice(&m.codes);
            col_scale.extend(std::iter::repeat_n(m.scale, m.rows));
        }
        let packed = pack::pack(&values, n, k)?;
        drop(values);
        let w = self.g.weights(
            &format!("{hint}.ternary"),
            DataType::Uint8,
            &[n, packed.len() / n.max(1)],
            &packed,
        )?;
        let s = self.g.f32s(&format!("{hint}.scale"), &[n], &col_scale)?;
        Ok(self.linear_node(WeightFormat::Bit, x, &w, Some(&s), (n, k), around, hint))
    }

    /// Writes `v` (`rows × cols`) as int8 rows with scale `max|row| / 127` each.
    fn int8_table(
        &mut self,
        hint: &str,
        v: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<ScaledTable, GraphError> {
        let mut q = Vec::with_capacity(v.len());
        let mut scales = Vec::with_capacity(rows);
        for row in v.chunks_exact(cols.max(1)).take(rows) {
            let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
            let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
            scales.push(scale);
            q.extend(
                row.iter()
                    .map(|&x| (x / scale).round().clamp(-127.0, 127.0) as i8 as u8),
            );
        }
        let data = self.g.weights(hint, DataType::Int8, &[rows, cols], &q)?;
        drop(q);
        let scale = self.g.f32s(&format!("{hint}.scale"), &[rows], &scales)?;
        Ok(ScaledTable { data, scale })
    }

    /// Writes `v` (`rows × cols`) as int4 rows in groups, see `kernels::int4`.
    fn int4_table(
        &mut self,
        hint: &str,
        v: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<ScaledTable, GraphError> {
        let (row_bytes, groups) = (int4::row_bytes(cols), int4::groups(cols));
        let mut q = Vec::with_capacity(rows * row_bytes);
        let mut scales = Vec::with_capacity(rows * groups);
        for row in v.chunks_exact(cols.max(1)).take(rows) {
            int4::quantize_row(row, &mut q, &mut scales);
        }
        let data = self
            .g
            .weights(hint, DataType::Uint8, &[rows, row_bytes], &q)?;
        drop(q);
        let scale = self
            .g
            .f32s(&format!("{hint}.scale"), &[rows, groups], &scales)?;
        Ok(ScaledTable { data, scale })
    }

    fn ternary(&self, prefix: &str, rows: usize, cols: usize) -> Result<TernaryMatrix, GraphError> {
        Ok(self.w.ternary(self.arch, prefix, rows, cols)?)
    }

    /// The sub-norm's weights (BitNet), or `None` for checkpoints without one (Llama-style 1bitLLM).
    fn sub_norm(
        &mut self,
        prefix: &str,
        names: &[&str],
        dim: usize,
        hint: &str,
    ) -> Result<Option<String>, GraphError> {
        for n in names {
            let name = format!("{prefix}.{n}.weight");
            if self.w.has(&name) {
                return self.norm_weight(&name, dim, hint).map(Some);
            }
        }
        if self.arch.family == Family::BitNet {
            return Err(HfError::MissingTensor(format!("{prefix}.{}.weight", names[0])).into());
        }
        Ok(None)
    }
}

/// Builds the whole graph, streaming weights to `dir/data_location`.
pub fn build(
    arch: &Architecture,
    w: &Weights,
    dir: &std::path::Path,
    data_location: &str,
    formats: TableFormats,
    progress: &mut dyn FnMut(LayerDone),
) -> Result<ModelProto, GraphError> {
    let g = GraphBuilder::new(dir, data_location)?;
    let mut cx = Ctx {
        g,
        arch,
        w,
        specs: vec![],
    };
    let (hd, h, kvh) = (arch.head_dim, arch.num_heads, arch.num_kv_heads);
    let (hidden, ffn, vocab) = (arch.hidden_size, arch.intermediate_size, arch.vocab_size);

    let embed = w.floats("model.embed_tokens.weight", &[vocab, hidden])?;
    let mut shared = None;
    let mut f32_table = None;
    let mut x = match formats.embedding {
        // f16 when every value fits (bf16 and f16 checkpoints), see `fits_f16`.
        EmbeddingFormat::Float => {
            let (table, is_f16) = embedding_table(&mut cx.g, &embed, vocab, hidden)?;
            if !is_f16 {
                f32_table = Some(table.clone());
            }
            cx.g.custom_op(DOMAIN, EMBEDDING, "embed", &["input_ids", &table], vec![])
        }
        EmbeddingFormat::Int8 => {
            let table = cx.int8_table("embed_tokens", &embed, vocab, hidden)?;
            let x = cx.g.custom_op(
                DOMAIN,
                INT8_EMBEDDING,
                "embed",
                &["input_ids", &table.data, &table.scale],
                vec![],
            );
            shared = Some(table);
            x
        }
    };
    // A tied output layer is written now, while the table is loaded; it shares the lookup table when both are
    // stored alike (the ops read weights in place, so one copy serves both).
    let tied_head = match (arch.tie_word_embeddings, formats.head) {
        (false, _) => None,
        (true, HeadFormat::F32) => Some(Head::F32(match f32_table {
            Some(t) => t,
            None => cx.g.weights(
                "lm_head",
                DataType::Float,
                &[vocab, hidden],
                &f32_bytes(&embed),
            )?,
        })),
        (true, HeadFormat::Int8) => Some(Head::Int8(match shared {
            Some(t) => t,
            None => cx.int8_table("lm_head", &embed, vocab, hidden)?,
        })),
        (true, HeadFormat::Int4) => {
            Some(Head::Int4(cx.int4_table("lm_head", &embed, vocab, hidden)?))
        }
    };
    drop(embed);

    // RoPE's inverse frequencies, as transformers' default rotary embedding computes them.
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / arch.rope_theta.powf((2 * i) as f32 / hd as f32))
        .collect();
    let inv_freq = cx.g.f32s("inv_freq", &[hd / 2], &inv_freq)?;

    for l in 0..arch.num_layers {
        let p = format!("model.layers.{l}");
        let hint = format!("layers.{l}");
        let norm = cx.norm_weight(
            &format!("{p}.input_layernorm.weight"),
            hidden,
            &format!("{hint}.input_norm"),
        )?;
        let mats = [
            cx.ternary(&format!("{p}.self_attn.q_proj"), h * hd, hidden)?,
            cx.ternary(&format!("{p}.self_attn.k_proj"), kvh * hd, hidden)?,
            cx.ternary(&format!("{p}.self_attn.v_proj"), kvh * hd, hidden)?,
        ];
        let qkv = cx.bitlinear(
            &x,
            &mats,
            Around {
                norm: Some(norm),
                glu: None,
                residual: None,
            },
            &format!("{hint}.qkv"),
        )?;
        drop(mats);
        let a = format!("{hint}.attn");
        let outs = [
            format!("{a}/attention"),
            format!("present.{l}.key"),
            format!("present.{l}.value"),
        ];
        let (pk, pv) = (
            format!("past_key_values.{l}.key"),
            format!("past_key_values.{l}.value"),
        );
        let attrs = vec![
            attr_i("heads", h as i64),
            attr_i("kv_heads", kvh as i64),
            attr_i("head_dim", hd as i64),
            attr_f("scale", (hd as f64).powf(-0.5) as f32),
        ];
        cx.g.op_into(
            ATTENTION,
            &a,
            &[&qkv, "position_ids", "attention_mask", &inv_freq, &pk, &pv],
            &outs,
            attrs,
        );
        cx.g.set_last_domain(DOMAIN);
        let norm = cx.sub_norm(
            &format!("{p}.self_attn"),
            &["attn_sub_norm", "inner_attn_ln"],
            h * hd,
            &format!("{hint}.attn_sub_norm"),
        )?;
        let o = [cx.ternary(&format!("{p}.self_attn.o_proj"), hidden, h * hd)?];
        x = cx.bitlinear(
            &outs[0],
            &o,
            Around {
                norm,
                glu: None,
                residual: Some(&x),
            },
            &format!("{hint}.o_proj"),
        )?;

        let norm = cx.norm_weight(
            &format!("{p}.post_attention_layernorm.weight"),
            hidden,
            &format!("{hint}.post_norm"),
        )?;
        let mats = [
            cx.ternary(&format!("{p}.mlp.gate_proj"), ffn, hidden)?,
            cx.ternary(&format!("{p}.mlp.up_proj"), ffn, hidden)?,
        ];
        let glu = match arch.activation {
            Activation::Relu2 => Glu::Relu2,
            Activation::Silu => Glu::Silu,
        };
        let y = cx.bitlinear(
            &x,
            &mats,
            Around {
                norm: Some(norm),
                glu: Some(glu),
                residual: None,
            },
            &format!("{hint}.gate_up"),
        )?;
        drop(mats);
        let norm = cx.sub_norm(
            &format!("{p}.mlp"),
            &["ffn_sub_norm", "ffn_layernorm"],
            ffn,
            &format!("{hint}.ffn_sub_norm"),
        )?;
        let d = [cx.ternary(&format!("{p}.mlp.down_proj"), hidden, ffn)?];
        x = cx.bitlinear(
            &y,
            &d,
            Around {
                norm,
                glu: None,
                residual: Some(&x),
            },
            &format!("{hint}.down_proj"),
        )?;
        progress(LayerDone {
            layer: l + 1,
            layers: arch.num_layers,
        });
    }

    let norm = cx.norm_weight("model.norm.weight", hidden, "norm")?;
    let (last, end, ax1) = (
        cx.g.i64s("start", &[-1]),
        cx.g.i64s("end", &[i64::MAX]),
        cx.g.i64s("axes", &[1]),
    );
    let x = cx.g.op("Slice", "head", &[&x, &last, &end, &ax1], vec![]);
    let head = match tied_head {
        Some(h) => h,
        None => {
            let lm = w.floats("lm_head.weight", &[vocab, hidden])?;
            match formats.head {
                HeadFormat::F32 => Head::F32(cx.g.weights(
                    "lm_head",
                    DataType::Float,
                    &[vocab, hidden],
                    &f32_bytes(&lm),
                )?),
                HeadFormat::Int8 => Head::Int8(cx.int8_table("lm_head", &lm, vocab, hidden)?),
                HeadFormat::Int4 => Head::Int4(cx.int4_table("lm_head", &lm, vocab, hidden)?),
            }
        }
    };
    let around = || Around {
        norm: Some(norm.clone()),
        glu: None,
        residual: None,
    };
    let logits = match head {
        Head::F32(t) => cx.linear_node(
            WeightFormat::F32,
            &x,
            &t,
            None,
            (vocab, hidden),
            around(),
            "head",
        ),
        Head::Int8(t) => cx.linear_node(
            WeightFormat::Int8,
            &x,
            &t.data,
            Some(&t.scale),
            (vocab, hidden),
            around(),
            "head",
        ),
        Head::Int4(t) => cx.linear_node(
            WeightFormat::Int4,
            &x,
            &t.data,
            Some(&t.scale),
            (vocab, hidden),
            around(),
            "head",
        ),
    };
    cx.g.op_into(
        "Identity",
        "head/logits",
        &[&logits],
        &["logits".to_string()],
        vec![],
    );

    let (inputs, outputs) = io(arch);
    let shape = AttentionShape {
        heads: h,
        kv_heads: kvh,
        head_dim: hd,
    };
    let functions = functions::definitions(OPSET, &cx.specs, shape);
    Ok(cx.g.finish(
        OPSET,
        &[(DOMAIN, DOMAIN_VERSION)],
        functions,
        inputs,
        outputs,
        "BitNet b1.58 exported by bitnetd",
    )?)
}

/// Whether `v` survives f16 without a loss that matters: exactly, or, below f16's normal range (|v| < 2^-14),
/// within half a subnormal step (2^-25 ≈ 3e-8 absolute). bf16 checkpoints (2B-4T) hold such tiny values, and
/// storing their table as f32 instead would double it (657 MB → 1.3 GB).
fn fits_f16(v: f32) -> bool {
    let h = half::f16::from_f32(v).to_f32();
    h == v || (v.abs() < f32::powi(2.0, -14) && (h - v).abs() <= f32::powi(2.0, -25))
}

/// The embedding lookup table: f16 when every value fits (see [`fits_f16`]), else f32. Returns (name, is_f16).
fn embedding_table(
    g: &mut GraphBuilder,
    embed: &[f32],
    vocab: usize,
    hidden: usize,
) -> std::io::Result<(String, bool)> {
    if embed.iter().all(|&v| fits_f16(v)) {
        let raw: Vec<u8> = embed
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        Ok((
            g.weights("embed_tokens", DataType::Float16, &[vocab, hidden], &raw)?,
            true,
        ))
    } else {
        Ok((
            g.weights(
                "embed_tokens",
                DataType::Float,
                &[vocab, hidden],
                &f32_bytes(embed),
            )?,
            false,
        ))
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn io(arch: &Architecture) -> (Vec<ValueInfoProto>, Vec<ValueInfoProto>) {
    use Dim::{Fixed, Symbol};
    let past = [
        Fixed(1),
        Fixed(arch.num_kv_heads as i64),
        Symbol("past_sequence_length"),
        Fixed(arch.head_dim as i64),
    ];
    let mut inputs = vec![
        value_info(
            "input_ids",
            DataType::Int64,
            Some(&[Fixed(1), Symbol("sequence_length")]),
        ),
        value_info(
            "attention_mask",
            DataType::Int64,
            Some(&[Fixed(1), Symbol("total_sequence_length")]),
        ),
        value_info(
            "position_ids",
            DataType::Int64,
            Some(&[Fixed(1), Symbol("sequence_length")]),
        ),
    ];
    let mut outputs = vec![value_info(
        "logits",
        DataType::Float,
        Some(&[Fixed(1), Fixed(1), Fixed(arch.vocab_size as i64)]),
    )];
    for l in 0..arch.num_layers {
        for kind in ["key", "value"] {
            inputs.push(value_info(
                &format!("past_key_values.{l}.{kind}"),
                DataType::Float,
                Some(&past),
            ));
            outputs.push(value_info(
                &format!("present.{l}.{kind}"),
                DataType::Float,
                None,
            ));
        }
    }
    (inputs, outputs)
}

#[cfg(test)]
mod tests {
    use super::fits_f16;

    #[test]
    fn f16_tables_lose_nothing_that_matters() {
        // Exact: every bf16 value in f16's normal range.
        assert!(fits_f16(0.0) && fits_f16(-1.5) && fits_f16(0.0078125) && fits_f16(60000.0));
        // Below the normal range: within half a subnormal step.
        assert!(fits_f16(1e-6) && fits_f16(-3e-7) && fits_f16(1e-9));
        // f32 precision f16 cannot hold, and values out of its range.
        assert!(!fits_f16(1.0 + f32::EPSILON) && !fits_f16(0.1) && !fits_f16(70000.0));
    }
}
