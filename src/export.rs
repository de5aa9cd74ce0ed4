//! `bitnetd export`: a Hugging Face BitNet checkpoint directory in, a bitnetd model directory out
//! (`model.onnx` + `model.onnx.data`, `tokenizer.json`, `bitnetd.json`, `README.md`).

use std::path::{Path, PathBuf};

use prost::Message;
use serde_json::Value;

use crate::hf::{Architecture, HfError, Weights};
use crate::meta::{
    ArchitectureMeta, GenerationDefaults, ModelMeta, DATA_FILE, FORMAT_VERSION, ONNX_FILE,
    TOKENIZER_FILE,
};
use crate::onnx::bitnet::{self, EmbeddingFormat, GraphError, HeadFormat, LayerDone, TableFormats};

/// Tokens that end a turn or a text in the tokenizers of the BitNet family and its peers.
const STOP_TOKENS: &[&str] = &[
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|im_end|>",
    "</s>",
    "<|endoftext|>",
];

/// Errors of an export. Each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Checkpoint(#[from] HfError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("{path}: {message}")]
    Tokenizer { path: String, message: String },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Export options.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// The model's name in `bitnetd.json` (default: the source directory's name).
    pub name: Option<String>,
    /// How the output layer is stored; `None` chooses by size (see [`head_for`]).
    pub head: Option<HeadFormat>,
    /// How the embedding table is stored.
    pub embedding: EmbeddingFormat,
}

/// What an export produced.
#[derive(Debug)]
pub struct ExportSummary {
    pub out: PathBuf,
    pub meta: ModelMeta,
    pub onnx_bytes: u64,
    pub data_bytes: u64,
}

/// An f32 output layer larger than this is exported as int8 unless asked otherwise.
pub const AUTO_INT8_HEAD_BYTES: u64 = 256 << 20;

/// The output layer's default storage: f32 (logits as transformers computes them) while it is small, int8 beyond
/// [`AUTO_INT8_HEAD_BYTES`]. For 2B-4T the f32 layer alone is 1.3 GB and its load peaks past a 4 GB budget; int8
/// reads a quarter of the bytes per token and moves logits by about 1% (tests/reference.rs).
pub fn head_for(arch: &Architecture) -> HeadFormat {
    let f32_bytes = (arch.vocab_size * arch.hidden_size * 4) as u64;
    if f32_bytes > AUTO_INT8_HEAD_BYTES {
        HeadFormat::Int8
    } else {
        HeadFormat::F32
    }
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// Exports the checkpoint in `from` to a model directory `out` (created if needed). `progress` gets one line per
/// finished step (layers, files).
pub fn export(
    from: &Path,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ExportSummary, ExportError> {
    let arch = Architecture::from_dir(from)?;
    let tok_path = from.join(TOKENIZER_FILE);
    let tokenizer =
        tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| ExportError::Tokenizer {
            path: tok_path.display().to_string(),
            message: e.to_string(),
        })?;
    let tok_vocab = tokenizer.get_vocab_size(true);
    if tok_vocab > arch.vocab_size {
        return Err(ExportError::Tokenizer {
            path: tok_path.display().to_string(),
            message: format!(
                "{tok_vocab} tokens but the model's vocab_size is {}",
                arch.vocab_size
            ),
        });
    }
    let weights = Weights::open(from)?;
    std::fs::create_dir_all(out).map_err(write_err(out))?;
    progress(&format!(
        "exporting {} layers, hidden {}, {}/{} heads, vocab {}",
        arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.vocab_size
    ));
    let tables = TableFormats {
        head: opts.head.unwrap_or_else(|| head_for(&arch)),
        embedding: opts.embedding,
    };
    let model = bitnet::build(
        &arch,
        &weights,
        out,
        DATA_FILE,
        tables,
        &mut |d: LayerDone| progress(&format!("layer {}/{}", d.layer, d.layers)),
    )?;
    let onnx_path = out.join(ONNX_FILE);
    let bytes = model.encode_to_vec();
    std::fs::write(&onnx_path, &bytes).map_err(write_err(&onnx_path))?;
    std::fs::copy(&tok_path, out.join(TOKENIZER_FILE))
        .map_err(write_err(&out.join(TOKENIZER_FILE)))?;

    let tok_cfg = read_json(&from.join("tokenizer_config.json"));
    let gen_cfg = read_json(&from.join("generation_config.json"));
    let chat_template = std::fs::read_to_string(from.join("chat_template.jinja"))
        .ok()
        .or_else(|| template_of(&tok_cfg));
    let mut eos = arch.eos_token_ids.clone();
    for id in ids_of(gen_cfg.get("eos_token_id")) {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    let mut stop = eos.clone();
    for t in STOP_TOKENS {
        if let Some(id) = tokenizer.token_to_id(t) {
            if !stop.contains(&id) {
                stop.push(id);
            }
        }
    }
    let token_name = |key: &str| match tok_cfg.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    };
    let name = opts.name.clone().or_else(|| {
        let p = from.canonicalize().ok()?;
        Some(p.file_name()?.to_string_lossy().into_owned())
    });
    let meta = ModelMeta {
        format_version: FORMAT_VERSION,
        name: name.unwrap_or_else(|| "bitnet".into()),
        architecture: ArchitectureMeta {
            family: arch.family,
            layers: arch.num_layers,
            hidden_size: arch.hidden_size,
            intermediate_size: arch.intermediate_size,
            heads: arch.num_heads,
            kv_heads: arch.num_kv_heads,
            head_dim: arch.head_dim,
            vocab_size: arch.vocab_size,
            activation: arch.activation,
            rope_theta: arch.rope_theta,
            rms_norm_eps: arch.rms_norm_eps,
            tied_embeddings: arch.tie_word_embeddings,
            linear_class: arch.linear_class,
            ternary_storage: "2bit".into(),
            head_format: tables.head,
            embedding_format: tables.embedding,
        },
        context_length: arch.context_length,
        bos_token_id: arch
            .bos_token_id
            .or_else(|| ids_of(gen_cfg.get("bos_token_id")).first().copied()),
        eos_token_ids: eos,
        stop_token_ids: stop,
        chat_template,
        bos_token: token_name("bos_token"),
        eos_token: token_name("eos_token"),
        parameters: parameter_count(&arch),
        exported_by: format!("bitnetd {}", env!("CARGO_PKG_VERSION")),
        generation_defaults: GenerationDefaults::from_generation_config(&gen_cfg),
    };
    meta.write(out).map_err(write_err(out))?;
    let card = out.join("README.md");
    let mut card_text = model_card(&meta, from);
    if let Ok(source_card) = std::fs::read_to_string(from.join("README.md")) {
        card_text.push_str("\n## Source model card\n\n");
        card_text.push_str(&source_card);
    }
    std::fs::write(&card, card_text).map_err(write_err(&card))?;
    let data_bytes = std::fs::metadata(out.join(DATA_FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    progress(&format!(
        "wrote {} ({} + {} bytes)",
        out.display(),
        bytes.len(),
        data_bytes
    ));
    Ok(ExportSummary {
        out: out.to_path_buf(),
        meta,
        onnx_bytes: bytes.len() as u64,
        data_bytes,
    })
}

fn read_json(path: &Path) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|i| vec![i as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|n| n.as_u64().map(|i| i as u32))
            .collect(),
        _ => vec![],
    }
}

/// `chat_template` from tokenizer_config.json: a string, or a list of named templates (take "default").
fn template_of(cfg: &Value) -> Option<String> {
    match cfg.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(String::from)),
        _ => None,
    }
}

fn parameter_count(a: &Architecture) -> u64 {
    let (h, f, hd) = (
        a.hidden_size as u64,
        a.intermediate_size as u64,
        a.head_dim as u64,
    );
    let attn = h * (a.num_heads as u64 * hd) * 2 + h * (a.num_kv_heads as u64 * hd) * 2;
    let layer = attn + 3 * h * f + 3 * h + f;
    let embed = a.vocab_size as u64 * h * if a.tie_word_embeddings { 1 } else { 2 };
    layer * a.num_layers as u64 + embed + h
}

fn model_card(m: &ModelMeta, from: &Path) -> String {
    let a = &m.architecture;
    format!(
        "# {name}\n\nA BitNet b1.58 model exported for bitnetd by {by} from `{from}`.\n\n\
         | | |\n|---|---|\n| family | {family:?} |\n| parameters | {params} |\n| layers | {layers} |\n\
         | hidden / FFN | {hidden} / {ffn} |\n| heads / KV heads / head dim | {heads} / {kv} / {hd} |\n\
         | vocabulary | {vocab} |\n| activation | {act:?} |\n| context | {ctx} |\n| RoPE theta | {theta} |\n\
         | ternary weights | {storage}, per-tensor scale ({lc:?} convention) |\n\
         | output layer / embedding | {head} / {embedding} |\n\
         | tied embeddings | {tied} |\n\n\
         ## Files\n\n- `model.onnx` + `model.onnx.data`: the network, ONNX opset {opset}, in the `ai.bitnetd` ops \
         (fused linears on 2-bit packed ternary weights: RMSNorm, per-token absmax int8 activations, product, scales, \
         GLU and residual in one op; `KvAttention` with RoPE, GQA and past/present KV tensors; `Embedding`), each \
         defined in the file as a function in standard ops so any ONNX runtime can run it (bitnetd runs its own \
         kernels instead).\n- `tokenizer.json`: the checkpoint's tokenizer.\n- `bitnetd.json`: special tokens, context length, \
         chat template.\n\n## Inputs and outputs\n\n`input_ids`, `attention_mask` (`[1, past + seq]`), `position_ids`, \
         `past_key_values.N.key|value` (`[1, {kv}, past, {hd}]`) in; `logits` (`[1, 1, {vocab}]`, last position) and \
         `present.N.key|value` out. Batch 1.\n\nThe license of the weights is the license of the source checkpoint.\n",
        name = m.name,
        by = m.exported_by,
        from = from.display(),
        family = a.family,
        params = m.parameters,
        layers = a.layers,
        hidden = a.hidden_size,
        ffn = a.intermediate_size,
        heads = a.heads,
        kv = a.kv_heads,
        hd = a.head_dim,
        vocab = a.vocab_size,
        act = a.activation,
        ctx = m.context_length,
        theta = a.rope_theta,
        storage = a.ternary_storage,
        head = a.head_format,
        embedding = a.embedding_format,
        lc = a.linear_class,
        tied = a.tied_embeddings,
        opset = bitnet::OPSET,
    )
}
