//! The ONNX graph of a BitNet b1.58 decoder, op for op as transformers computes it:
//! per-token absmax int8 activation quantization, `ai.bitnetd.BitLinear` (2-bit packed ternary weights, see
//! `onnx::functions` for its definition in standard ops) with the weights' scale, RMSNorm with the model's eps, rotate-half RoPE with the model's theta, and ONNX `Attention` (opset 23)
//! with GQA and explicit past/present KV tensors, which tract turns into a stateful in-place cache.
//!
//! Inputs: `input_ids`, `attention_mask` (`[1, past + seq]`), `position_ids`, `past_key_values.{i}.key|value`
//! (`[1, kv_heads, past, head_dim]`). Outputs: `logits` for the last position only (`[1, 1, vocab]`) and
//! `present.{i}.key|value`. Batch is 1: bitnetd runs one sequence per session.

use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{ModelProto, ValueInfoProto};

use super::builder::{attr_f, attr_i, value_info, Dim, GraphBuilder};
use super::functions::{self, DOMAIN_VERSION};
use crate::engine::linear_op::{BIT_LINEAR, DOMAIN, INT8_LINEAR};
use crate::hf::{Activation, Architecture, Family, HfError, TernaryMatrix, Weights};
use crate::kernels::pack::{self, PackError};

/// The opset the graph is written for (ONNX `Attention` is opset 23).
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
    /// f32, run by tract's f32 matmul: logits as transformers computes them.
    #[default]
    F32,
    /// int8 with one scale per vocabulary row, run by `Int8Linear` on int8 activations (per-token absmax, like
    /// the BitLinear layers): a quarter of the bytes read per token. Logits move by about 1% of their range
    /// (`tests/reference.rs`).
    Int8,
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

/// An int8 table with one f32 scale per row.
struct Int8Table {
    data: String,
    scale: String,
}

/// The output layer's constant.
enum Head {
    /// `[hidden, vocab]`.
    F32(String),
    Int8(Int8Table),
}

/// Per-token activation quantization: `(int8 values, scale)` with `scale = 127 / max(|x|, 1e-5)`.
struct QuantizedAct {
    q: String,
    scale: String,
}

struct Ctx<'a> {
    g: GraphBuilder,
    arch: &'a Architecture,
    w: &'a Weights,
    axis_last: String,
    eps: String,
}

impl Ctx<'_> {
    fn rms_norm(
        &mut self,
        x: &str,
        weight: &str,
        dim: usize,
        hint: &str,
    ) -> Result<String, GraphError> {
        let w = self.w.floats(weight, &[dim])?;
        let w = self.g.f32s(&format!("{hint}.weight"), &[dim], &w)?;
        let g = &mut self.g;
        let sq = g.op("Mul", hint, &[x, x], vec![]);
        let var = g.op(
            "ReduceMean",
            hint,
            &[&sq, &self.axis_last],
            vec![attr_i("keepdims", 1)],
        );
        let var = g.op("Add", hint, &[&var, &self.eps], vec![]);
        let rms = g.op("Sqrt", hint, &[&var], vec![]);
        let y = g.op("Div", hint, &[x, &rms], vec![]);
        Ok(g.op("Mul", hint, &[&y, &w], vec![]))
    }

    fn quantize(&mut self, x: &str, hint: &str) -> QuantizedAct {
        let g = &mut self.g;
        let (floor, qp, qn) = (
            g.scalar("1e-5", 1e-5),
            g.scalar("127", 127.0),
            g.scalar("-128", -128.0),
        );
        let a = g.op("Abs", hint, &[x], vec![]);
        let m = g.op(
            "ReduceMax",
            hint,
            &[&a, &self.axis_last],
            vec![attr_i("keepdims", 1)],
        );
        let m = g.op("Max", hint, &[&m, &floor], vec![]);
        let scale = g.op("Div", hint, &[&qp, &m], vec![]);
        let r = g.op("Mul", hint, &[x, &scale], vec![]);
        let r = g.op("Round", hint, &[&r], vec![]);
        let r = g.op("Clip", hint, &[&r, &qn, &qp], vec![]);
        let q = g.op(
            "Cast",
            hint,
            &[&r],
            vec![attr_i("to", DataType::Int8 as i64)],
        );
        QuantizedAct { q, scale }
    }

    /// One `BitLinear` (2-bit packed ternary weights) for several linears sharing an input; returns one output per
    /// matrix.
    fn bitlinear(
        &mut self,
        x: &QuantizedAct,
        mats: &[TernaryMatrix],
        hint: &str,
    ) -> Result<Vec<String>, GraphError> {
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
        let w = self.g.initializer(
            &format!("{hint}.ternary"),
            DataType::Uint8,
            &[n, packed.len() / n.max(1)],
            &packed,
        )?;
        let y = self.g.custom_op(
            DOMAIN,
            BIT_LINEAR,
            hint,
            &[&x.q, &w],
            vec![attr_i("in_features", k as i64)],
        );
        let s = self.g.f32s(&format!("{hint}.scale"), &[n], &col_scale)?;
        let g = &mut self.g;
        let y = g.op(
            "Cast",
            hint,
            &[&y],
            vec![attr_i("to", DataType::Float as i64)],
        );
        let y = g.op("Div", hint, &[&y, &x.scale], vec![]);
        let y = g.op("Mul", hint, &[&y, &s], vec![]);
        if mats.len() == 1 {
            return Ok(vec![y]);
        }
        let sizes: Vec<i64> = mats.iter().map(|m| m.rows as i64).collect();
        let split = g.i64s("split", &sizes);
        Ok(g.op_n(
            "Split",
            hint,
            &[&y, &split],
            mats.len(),
            vec![attr_i("axis", -1)],
        ))
    }

    /// Writes `v` (`rows × cols`) as int8 rows with scale `max|row| / 127` each.
    fn int8_table(
        &mut self,
        hint: &str,
        v: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Int8Table, GraphError> {
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
        let data = self
            .g
            .initializer(hint, DataType::Int8, &[rows, cols], &q)?;
        drop(q);
        let scale = self.g.f32s(&format!("{hint}.scale"), &[rows], &scales)?;
        Ok(Int8Table { data, scale })
    }

    /// `table[input_ids] * scale[input_ids]`, as f32 `[1, S, hidden]`.
    fn embed_int8(&mut self, t: &Int8Table) -> String {
        let g = &mut self.g;
        let rows = g.op(
            "Gather",
            "embed",
            &[&t.data, "input_ids"],
            vec![attr_i("axis", 0)],
        );
        let rows = g.op(
            "Cast",
            "embed",
            &[&rows],
            vec![attr_i("to", DataType::Float as i64)],
        );
        let s = g.op(
            "Gather",
            "embed",
            &[&t.scale, "input_ids"],
            vec![attr_i("axis", 0)],
        );
        let s = g.op("Unsqueeze", "embed", &[&s, &self.axis_last], vec![]);
        g.op("Mul", "embed", &[&rows, &s], vec![])
    }

    fn ternary(&self, prefix: &str, rows: usize, cols: usize) -> Result<TernaryMatrix, GraphError> {
        Ok(self.w.ternary(self.arch, prefix, rows, cols)?)
    }

    /// `[1, S, heads*D]` -> `[1, heads, S, D]`
    fn heads(&mut self, x: &str, heads: usize, hint: &str) -> String {
        let shape = self
            .g
            .i64s("shape", &[1, -1, heads as i64, self.arch.head_dim as i64]);
        let r = self.g.op("Reshape", hint, &[x, &shape], vec![]);
        self.g.op(
            "Transpose",
            hint,
            &[&r],
            vec![super::builder::attr_ints("perm", &[0, 2, 1, 3])],
        )
    }

    fn rope(&mut self, x: &str, cos: &str, sin: &str, hint: &str) -> String {
        let half = (self.arch.head_dim / 2) as i64;
        let g = &mut self.g;
        let (ax, z, h, e) = (
            g.i64s("axes", &[3]),
            g.i64s("start", &[0]),
            g.i64s("half", &[half]),
            g.i64s("end", &[2 * half]),
        );
        let x1 = g.op("Slice", hint, &[x, &z, &h, &ax], vec![]);
        let x2 = g.op("Slice", hint, &[x, &h, &e, &ax], vec![]);
        let nx2 = g.op("Neg", hint, &[&x2], vec![]);
        let rot = g.op("Concat", hint, &[&nx2, &x1], vec![attr_i("axis", 3)]);
        let a = g.op("Mul", hint, &[x, cos], vec![]);
        let b = g.op("Mul", hint, &[&rot, sin], vec![]);
        g.op("Add", hint, &[&a, &b], vec![])
    }

    fn sub_norm(
        &mut self,
        x: &str,
        prefix: &str,
        names: &[&str],
        dim: usize,
        hint: &str,
    ) -> Result<String, GraphError> {
        for n in names {
            let name = format!("{prefix}.{n}.weight");
            if self.w.has(&name) {
                return self.rms_norm(x, &name, dim, hint);
            }
        }
        if self.arch.family == Family::BitNet {
            return Err(HfError::MissingTensor(format!("{prefix}.{}.weight", names[0])).into());
        }
        Ok(x.to_string())
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
    let mut g = GraphBuilder::new(dir, data_location)?;
    let axis_last = g.i64s("axes", &[-1]);
    let eps = g.scalar("eps", arch.rms_norm_eps);
    let mut cx = Ctx {
        g,
        arch,
        w,
        axis_last,
        eps,
    };
    let (hd, h, kvh) = (arch.head_dim, arch.num_heads, arch.num_kv_heads);
    let (hidden, ffn, vocab) = (arch.hidden_size, arch.intermediate_size, arch.vocab_size);

    let embed = w.floats("model.embed_tokens.weight", &[vocab, hidden])?;
    let mut shared = None;
    let mut x = match formats.embedding {
        // f16 when every value fits (bf16 and f16 checkpoints), see `fits_f16`.
        EmbeddingFormat::Float => {
            let lookup = embedding_table(&mut cx.g, &embed, vocab, hidden)?;
            let x = cx.g.op(
                "Gather",
                "embed",
                &[&lookup.0, "input_ids"],
                vec![attr_i("axis", 0)],
            );
            if lookup.1 {
                cx.g.op(
                    "Cast",
                    "embed",
                    &[&x],
                    vec![attr_i("to", DataType::Float as i64)],
                )
            } else {
                x
            }
        }
        EmbeddingFormat::Int8 => {
            let table = cx.int8_table("embed_tokens", &embed, vocab, hidden)?;
            let x = cx.embed_int8(&table);
            shared = Some(table);
            x
        }
    };
    // A tied output layer is written now, while the table is loaded. The f32 one gets its own [hidden, vocab]
    // constant so that tract packs it once at load (a constant shared by two ops is never folded and would be
    // re-packed every step); an int8 one shares the int8 lookup table if there is one, since `Int8Linear` reads
    // its constant in place.
    let tied_head = match (arch.tie_word_embeddings, formats.head) {
        (false, _) => None,
        (true, HeadFormat::F32) => Some(Head::F32(cx.g.f32s(
            "lm_head_t",
            &[hidden, vocab],
            &transpose(&embed, vocab, hidden),
        )?)),
        (true, HeadFormat::Int8) => Some(Head::Int8(match shared {
            Some(t) => t,
            None => cx.int8_table("lm_head", &embed, vocab, hidden)?,
        })),
    };
    drop(embed);
    let g = &mut cx.g;

    // Additive mask [1, 1, S, T]: key j is visible to query i iff kpos(j) <= position_ids(i) and mask(j) != 0.
    let one = g.initializer("one", DataType::Int64, &[], &1i64.to_le_bytes())?;
    let ax1 = g.i64s("axes", &[1]);
    let ax2 = g.i64s("axes", &[2]);
    let cs = g.op("CumSum", "mask", &["attention_mask", &one], vec![]);
    let kpos = g.op("Sub", "mask", &[&cs, &one], vec![]);
    let kpos = g.op("Unsqueeze", "mask", &[&kpos, &ax1], vec![]);
    let qpos = g.op("Unsqueeze", "mask", &["position_ids", &ax2], vec![]);
    let causal = g.op("LessOrEqual", "mask", &[&kpos, &qpos], vec![]);
    let valid = g.op(
        "Cast",
        "mask",
        &["attention_mask"],
        vec![attr_i("to", DataType::Bool as i64)],
    );
    let valid = g.op("Unsqueeze", "mask", &[&valid, &ax1], vec![]);
    let allowed = g.op("And", "mask", &[&causal, &valid], vec![]);
    let (zero, neg) = (g.scalar("zero", 0.0), g.scalar("min", f32::MIN));
    let mask = g.op("Where", "mask", &[&allowed, &zero, &neg], vec![]);
    let mask = g.op("Unsqueeze", "mask", &[&mask, &ax1], vec![]);

    // RoPE tables for the given positions, as transformers' default rotary embedding computes them.
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / arch.rope_theta.powf((2 * i) as f32 / hd as f32))
        .collect();
    let inv_freq = g.f32s("inv_freq", &[hd / 2], &inv_freq)?;
    let pos = g.op(
        "Cast",
        "rope",
        &["position_ids"],
        vec![attr_i("to", DataType::Float as i64)],
    );
    let pos = g.op("Unsqueeze", "rope", &[&pos, &ax2], vec![]);
    let freqs = g.op("Mul", "rope", &[&pos, &inv_freq], vec![]);
    let emb = g.op(
        "Concat",
        "rope",
        &[&freqs, &freqs],
        vec![attr_i("axis", -1)],
    );
    let cos = g.op("Cos", "rope", &[&emb], vec![]);
    let cos = g.op("Unsqueeze", "rope", &[&cos, &ax1], vec![]);
    let sin = g.op("Sin", "rope", &[&emb], vec![]);
    let sin = g.op("Unsqueeze", "rope", &[&sin, &ax1], vec![]);

    for l in 0..arch.num_layers {
        let p = format!("model.layers.{l}");
        let hint = format!("layers.{l}");
        let a = format!("{hint}.attn");
        let n = cx.rms_norm(
            &x,
            &format!("{p}.input_layernorm.weight"),
            hidden,
            &format!("{hint}.input_norm"),
        )?;
        let qa = cx.quantize(&n, &a);
        let mats = [
            cx.ternary(&format!("{p}.self_attn.q_proj"), h * hd, hidden)?,
            cx.ternary(&format!("{p}.self_attn.k_proj"), kvh * hd, hidden)?,
            cx.ternary(&format!("{p}.self_attn.v_proj"), kvh * hd, hidden)?,
        ];
        let qkv = cx.bitlinear(&qa, &mats, &format!("{hint}.qkv"))?;
        drop(mats);
        let q = cx.heads(&qkv[0], h, &a);
        let k = cx.heads(&qkv[1], kvh, &a);
        let v = cx.heads(&qkv[2], kvh, &a);
        let q = cx.rope(&q, &cos, &sin, &a);
        let k = cx.rope(&k, &cos, &sin, &a);
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
            attr_f("scale", (hd as f64).powf(-0.5) as f32),
            attr_i("is_causal", 0),
        ];
        cx.g.op_into(
            "Attention",
            &a,
            &[&q, &k, &v, &mask, &pk, &pv],
            &outs,
            attrs,
        );
        let y = cx.g.op(
            "Transpose",
            &a,
            &[&outs[0]],
            vec![super::builder::attr_ints("perm", &[0, 2, 1, 3])],
        );
        let shape = cx.g.i64s("shape", &[1, -1, (h * hd) as i64]);
        let y = cx.g.op("Reshape", &a, &[&y, &shape], vec![]);
        let y = cx.sub_norm(
            &y,
            &format!("{p}.self_attn"),
            &["attn_sub_norm", "inner_attn_ln"],
            h * hd,
            &format!("{hint}.attn_sub_norm"),
        )?;
        let ya = cx.quantize(&y, &a);
        let o = [cx.ternary(&format!("{p}.self_attn.o_proj"), hidden, h * hd)?];
        let o = cx.bitlinear(&ya, &o, &format!("{hint}.o_proj"))?;
        x = cx.g.op("Add", &hint, &[&x, &o[0]], vec![]);

        let m = format!("{hint}.mlp");
        let n = cx.rms_norm(
            &x,
            &format!("{p}.post_attention_layernorm.weight"),
            hidden,
            &format!("{hint}.post_norm"),
        )?;
        let na = cx.quantize(&n, &m);
        let mats = [
            cx.ternary(&format!("{p}.mlp.gate_proj"), ffn, hidden)?,
            cx.ternary(&format!("{p}.mlp.up_proj"), ffn, hidden)?,
        ];
        let gu = cx.bitlinear(&na, &mats, &format!("{hint}.gate_up"))?;
        drop(mats);
        let act = match arch.activation {
            Activation::Relu2 => {
                let r = cx.g.op("Relu", &m, &[&gu[0]], vec![]);
                cx.g.op("Mul", &m, &[&r, &r], vec![])
            }
            Activation::Silu => {
                let s = cx.g.op("Sigmoid", &m, &[&gu[0]], vec![]);
                cx.g.op("Mul", &m, &[&gu[0], &s], vec![])
            }
        };
        let y = cx.g.op("Mul", &m, &[&act, &gu[1]], vec![]);
        let y = cx.sub_norm(
            &y,
            &format!("{p}.mlp"),
            &["ffn_sub_norm", "ffn_layernorm"],
            ffn,
            &format!("{hint}.ffn_sub_norm"),
        )?;
        let ya = cx.quantize(&y, &m);
        let d = [cx.ternary(&format!("{p}.mlp.down_proj"), hidden, ffn)?];
        let d = cx.bitlinear(&ya, &d, &format!("{hint}.down_proj"))?;
        x = cx.g.op("Add", &hint, &[&x, &d[0]], vec![]);
        progress(LayerDone {
            layer: l + 1,
            layers: arch.num_layers,
        });
    }

    let x = cx.rms_norm(&x, "model.norm.weight", hidden, "norm")?;
    let g = &mut cx.g;
    let (last, end) = (g.i64s("start", &[-1]), g.i64s("end", &[i64::MAX]));
    let x = g.op("Slice", "head", &[&x, &last, &end, &ax1], vec![]);
    let head = match tied_head {
        Some(h) => h,
        None => {
            let lm = w.floats("lm_head.weight", &[vocab, hidden])?;
            match formats.head {
                HeadFormat::F32 => Head::F32(cx.g.f32s(
                    "lm_head_t",
                    &[hidden, vocab],
                    &transpose(&lm, vocab, hidden),
                )?),
                HeadFormat::Int8 => Head::Int8(cx.int8_table("lm_head", &lm, vocab, hidden)?),
            }
        }
    };
    match head {
        Head::F32(head_t) => {
            cx.g.op_into(
                "MatMul",
                "head/logits",
                &[&x, &head_t],
                &["logits".to_string()],
                vec![],
            );
        }
        Head::Int8(table) => {
            let xq = cx.quantize(&x, "head");
            let g = &mut cx.g;
            let y = g.custom_op(DOMAIN, INT8_LINEAR, "head", &[&xq.q, &table.data], vec![]);
            let y = g.op(
                "Cast",
                "head",
                &[&y],
                vec![attr_i("to", DataType::Float as i64)],
            );
            let y = g.op("Div", "head", &[&y, &xq.scale], vec![]);
            g.op_into(
                "Mul",
                "head/logits",
                &[&y, &table.scale],
                &["logits".to_string()],
                vec![],
            );
        }
    }

    let (inputs, outputs) = io(arch);
    Ok(cx.g.finish(
        OPSET,
        &[(DOMAIN, DOMAIN_VERSION)],
        functions::definitions(OPSET),
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
            g.initializer("embed_tokens", DataType::Float16, &[vocab, hidden], &raw)?,
            true,
        ))
    } else {
        Ok((g.f32s("embed_tokens", &[vocab, hidden], embed)?, false))
    }
}

/// `[rows, cols]` row-major to `[cols, rows]` row-major.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    for (r, row) in v.chunks_exact(cols).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            t[c * rows + r] = x;
        }
    }
    t
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
