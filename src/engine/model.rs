//! A loaded model: the optimized tract plan, the tokenizer and the metadata, immutable and shared as
//! `Arc<Model>` by every session, with the worker team its forward passes run on (only the thread count in use
//! may change, see [`Model::set_threads`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokenizers::Tokenizer;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::RunOptions;

use super::chat::{ChatTemplate, Message};
use super::kv::{KvFormat, KvShape};
use super::ops::attention::KvAttention;
use super::ops::embedding::Lookup;
use super::ops::linear::FusedLinear;
use super::ops::screen::{OutputLayer, Planes};
use super::prepare::{self, PrepareOptions};
use super::request::{GenerateParams, Prompt, ValidatedRequest};
use super::session::Session;
use super::tuner::ThreadTuner;
use super::weights::WeightResidency;
use super::EngineError;
use crate::kernels::Kernel;
use crate::meta::{ModelMeta, ONNX_FILE, TOKENIZER_FILE};
use crate::team::Team;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Threads of a forward pass (1 runs it on the calling thread alone).
    pub threads: usize,
    /// How the KV cache stores keys and values.
    pub kv_format: KvFormat,
    /// How the products' weights are held (the embedding table is always mapped).
    pub residency: WeightResidency,
    /// How the int8 output layer runs (`ops::screen`).
    pub output_layer: OutputLayer,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kv_format: KvFormat::default(),
            residency: WeightResidency::default(),
            output_layer: OutputLayer::default(),
        }
    }
}

/// The graph inputs left after the KV cache became op state, in plan order.
pub(crate) struct InputSlots {
    pub input_ids: usize,
    pub attention_mask: usize,
    pub position_ids: usize,
}

/// What the loaded plan is made of, for `status`, logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanSummary {
    /// `KvAttention` layers (each holding its own KV cache).
    pub attention_layers: usize,
    /// Fused linears (`{Bit,Int8,F32}Linear*` ops).
    pub linears: usize,
    /// Of those, on int8 or 2-bit packed weights.
    pub packed_linears: usize,
    /// The kernel of the packed products.
    pub kernel: Option<Kernel>,
    pub kv: KvShape,
    /// Bytes of weights a forward pass reads once per token (the products), and whether they are mapped.
    pub product_bytes: u64,
    pub products_mapped: bool,
    /// Bytes of the embedding table (read a row per token from the file, never resident).
    pub embedding_bytes: u64,
    /// Whether the output layer is screened (`ops::screen`): `product_bytes` then counts its screen, and each
    /// candidate reads [`Model::screen_counts`]' `candidate_bytes` more.
    pub screened_output: bool,
}

/// What the screened output layer did since load (see [`Model::screen_counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScreenCounts {
    /// Token rows screened.
    pub steps: u64,
    /// Rows computed exactly over all those steps.
    pub rescored: u64,
    /// Bytes one exact row reads.
    pub candidate_bytes: u64,
}

/// An exported model, loaded and optimized once.
pub struct Model {
    pub meta: ModelMeta,
    pub dir: PathBuf,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) plan: Arc<TypedSimplePlan>,
    pub(crate) slots: InputSlots,
    chat: Option<ChatTemplate>,
    summary: PlanSummary,
    /// The screened output layer's planes, for their counts.
    planes: Option<Arc<Planes>>,
    /// The forward passes' helpers (`threads - 1` of them).
    pub(crate) team: Arc<Team>,
    /// Threads allowed now.
    threads: AtomicUsize,
    max_threads: usize,
    /// Decode steps' thread count within the allowance: a property of the board's load, so shared by sessions.
    pub(crate) tuner: Mutex<ThreadTuner>,
    /// Prompt tokens per prefill step (the governor lowers it when the board runs warm).
    prefill_chunk: AtomicUsize,
}

impl Model {
    /// Loads the model directory `dir` (as written by `bitnetd export`).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Arc<Model>, EngineError> {
        let err = |m: String| EngineError::Load {
            path: dir.display().to_string(),
            message: m,
        };
        if opts.threads == 0 {
            return Err(err("threads must be at least 1".into()));
        }
        super::alloc::tune();
        let meta = ModelMeta::read(dir).map_err(|e| err(e.to_string()))?;
        let tokenizer = Tokenizer::from_file(dir.join(TOKENIZER_FILE))
            .map_err(|e| err(format!("tokenizer.json: {e}")))?;
        let chat = match &meta.chat_template {
            Some(t) => Some(ChatTemplate::new(
                t,
                meta.bos_token.as_deref(),
                meta.eos_token.as_deref(),
            )?),
            None => None,
        };
        let mut onnx = tract_onnx::onnx();
        super::ops::register(&mut onnx.op_register);
        let mut proto = onnx
            .proto_model_for_path(dir.join(ONNX_FILE))
            .map_err(|e| err(format!("{e:#}")))?;
        prepare::prepare(
            &mut proto,
            PrepareOptions {
                kv_format: opts.kv_format,
                residency: opts.residency,
                output_layer: opts.output_layer,
            },
        )
        .map_err(|e| err(e.to_string()))?;
        let dir_str = dir
            .to_str()
            .ok_or_else(|| err("the path is not UTF-8".into()))?;
        let parsed = onnx
            .parse(&proto, Some(dir_str))
            .map_err(|e| err(format!("{e:#}")))?;
        drop(proto);
        let typed = parsed
            .model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .and_then(|m| m.into_optimized())
            .map_err(|e| err(format!("{e:#}")))?;
        let summary = summarize(&typed).map_err(err)?;
        let planes = typed
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<FusedLinear>())
            .find_map(|l| l.planes().cloned());
        let slots = input_slots(&typed).map_err(err)?;
        let plan = typed
            .into_runnable_with_options(&RunOptions::default())
            .map_err(|e| err(format!("{e:#}")))?;
        let team = Team::new(opts.threads - 1, "bitnetd-team")
            .map_err(|e| err(format!("starting the worker team: {e}")))?;
        log::info!(
            model = meta.name.as_str(), layers = meta.architecture.layers, threads = opts.threads,
            kernel = summary.kernel.map_or("none", Kernel::name), kv = summary.kv.format.name(),
            weights_mib = summary.product_bytes >> 20, mapped = summary.products_mapped; "model loaded"
        );
        Ok(Arc::new(Model {
            meta,
            dir: dir.to_path_buf(),
            tokenizer,
            plan,
            slots,
            chat,
            summary,
            planes,
            team: Arc::new(team),
            threads: AtomicUsize::new(opts.threads),
            max_threads: opts.threads,
            tuner: Mutex::new(ThreadTuner::new(opts.threads)),
            prefill_chunk: AtomicUsize::new(super::PREFILL_CHUNK),
        }))
    }

    /// Starts a session with an empty KV cache.
    pub fn session(self: &Arc<Self>) -> Result<Session, EngineError> {
        Session::new(self.clone())
    }

    /// What the plan is made of.
    pub fn summary(&self) -> PlanSummary {
        self.summary
    }

    /// What the screened output layer did since load; `None` when it is not screened.
    pub fn screen_counts(&self) -> Option<ScreenCounts> {
        self.planes.as_ref().map(|p| {
            let (steps, rescored) = p.counts();
            ScreenCounts {
                steps,
                rescored,
                candidate_bytes: p.candidate_bytes() as u64,
            }
        })
    }

    /// The kernel running the packed products.
    pub fn kernel(&self) -> Option<Kernel> {
        self.summary.kernel
    }

    /// Bytes of KV cache per token of one sequence, every layer.
    pub fn kv_bytes_per_token(&self) -> u64 {
        (self.summary.kv.bytes_per_position() * self.summary.attention_layers) as u64
    }

    /// Threads used by a forward pass.
    pub fn threads(&self) -> usize {
        self.threads.load(Ordering::Relaxed)
    }

    /// Prompt tokens fed per prefill step.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk.load(Ordering::Relaxed)
    }

    /// Sets the prefill step (1 to [`super::PREFILL_CHUNK`]), from the next prompt on. Smaller steps mean lower
    /// peak power and activation memory, at some prefill speed.
    pub fn set_prefill_chunk(&self, n: usize) {
        self.prefill_chunk
            .store(n.clamp(1, super::PREFILL_CHUNK), Ordering::Relaxed);
    }

    /// The most threads a forward pass may use (what [`LoadOptions`] asked for).
    pub fn max_threads(&self) -> usize {
        self.max_threads
    }

    /// Uses `n` threads (clamped to 1..=[`Model::max_threads`]) from the next forward pass on; returns the count
    /// now in use.
    pub fn set_threads(&self, n: usize) -> usize {
        let n = n.clamp(1, self.max_threads);
        self.threads.store(n, Ordering::Relaxed);
        n
    }

    /// What the worker team has done so far (jobs, chunks, chunks taken over from late helpers).
    pub fn team_totals(&self) -> crate::team::TeamTotals {
        self.team.totals()
    }

    /// Tokenizes text. `special` adds the tokenizer's special tokens (BOS), as transformers' `tokenizer(text)`.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, EngineError> {
        let enc = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, leaving out special tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Renders chat messages through the model's template.
    pub fn render_chat(&self, messages: &[Message]) -> Result<String, EngineError> {
        let t = self.chat.as_ref().ok_or_else(|| {
            EngineError::ChatTemplate(format!(
                "model {} has no chat template: send a prompt",
                self.meta.name
            ))
        })?;
        t.render(messages)
    }

    /// Validates a request against this model: parameters, tokenization, context length.
    pub fn prepare(
        &self,
        prompt: &Prompt,
        params: GenerateParams,
    ) -> Result<ValidatedRequest, EngineError> {
        params.validate()?;
        let ids = match prompt {
            Prompt::Text(t) => self.encode(t, true)?,
            Prompt::Chat(m) => {
                if m.is_empty() {
                    return Err(EngineError::EmptyPrompt);
                }
                self.encode(&self.render_chat(m)?, false)?
            }
            Prompt::Ids(ids) => {
                let vocab = self.meta.architecture.vocab_size as u32;
                if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                    return Err(EngineError::InvalidParam {
                        name: "prompt_ids",
                        message: format!("token {bad} >= vocab {vocab}"),
                    });
                }
                ids.clone()
            }
        };
        ValidatedRequest::new(
            ids,
            params,
            self.meta.context_length,
            &self.meta.stop_token_ids,
        )
    }
}

fn summarize(model: &TypedModel) -> Result<PlanSummary, String> {
    let linears: Vec<&FusedLinear> = model
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<FusedLinear>())
        .collect();
    let attention: Vec<&KvAttention> = model
        .nodes()
        .iter()
        .filter_map(|n| n.op_as::<KvAttention>())
        .collect();
    let kv = attention
        .first()
        .map(|a| a.shape())
        .ok_or("the plan has no attention layers")?;
    let packed: Vec<&&FusedLinear> = linears
        .iter()
        .filter(|l| l.spec().weights != super::ops::WeightFormat::F32)
        .collect();
    Ok(PlanSummary {
        attention_layers: attention.len(),
        linears: linears.len(),
        packed_linears: packed.len(),
        kernel: packed.first().map(|l| l.kernel()),
        kv,
        product_bytes: linears.iter().map(|l| l.weight_bytes() as u64).sum(),
        products_mapped: linears.iter().all(|l| l.is_mapped()),
        embedding_bytes: model
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<Lookup>())
            .map(|l| l.weights().len() as u64)
            .sum(),
        screened_output: linears.iter().any(|l| l.planes().is_some()),
    })
}

fn input_slots(model: &TypedModel) -> Result<InputSlots, String> {
    let names: Vec<&str> = model
        .input_outlets()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|o| model.node(o.node).name.as_str())
        .collect();
    let find = |n: &str| {
        names
            .iter()
            .position(|x| *x == n)
            .ok_or_else(|| format!("graph has no input {n:?}"))
    };
    if names.len() != 3 || model.output_outlets().map_err(|e| e.to_string())?.len() != 1 {
        return Err(format!(
            "the plan should have three inputs and one output (inputs: {names:?})"
        ));
    }
    Ok(InputSlots {
        input_ids: find("input_ids")?,
        attention_mask: find("attention_mask")?,
        position_ids: find("position_ids")?,
    })
}
