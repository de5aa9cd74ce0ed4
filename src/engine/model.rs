//! A loaded model: the optimized tract plan, the tokenizer and the metadata, immutable and shared as
//! `Arc<Model>` by every session (only the thread count in use may change, see [`Model::set_threads`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokenizers::Tokenizer;
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::RunOptions;
use tract_onnx::tract_core::transform::get_transform;
use tract_transformers::ops::inplace_kv_cache::InPlaceKvSdpa;

use super::chat::{ChatTemplate, Message};
use super::linear_op::PackedLinear;
use super::request::{GenerateParams, Prompt, ValidatedRequest};
use super::session::Session;
use super::EngineError;
use crate::kernels::Kernel;
use crate::meta::{ModelMeta, ONNX_FILE, TOKENIZER_FILE};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Threads for tract's matrix products (1 runs on the calling thread).
    pub threads: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// The graph inputs left after tract folds the KV cache into its own state, in plan order.
pub(crate) struct InputSlots {
    pub input_ids: usize,
    pub attention_mask: usize,
    pub position_ids: usize,
}

/// An exported model, loaded and optimized once.
pub struct Model {
    pub meta: ModelMeta,
    pub dir: PathBuf,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) plan: Arc<TypedSimplePlan>,
    pub(crate) slots: InputSlots,
    chat: Option<ChatTemplate>,
    inplace_kv_layers: usize,
    kernel: Option<Kernel>,
    packed_linear_ops: usize,
    /// Threads in use now (one of `executors`).
    threads: AtomicUsize,
    /// Prompt tokens per prefill step (the governor lowers it when the board runs warm).
    prefill_chunk: AtomicUsize,
    /// (threads, executor), the configured count first.
    executors: Vec<(usize, Executor)>,
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
        super::linear_op::register(&mut onnx.op_register);
        let mut typed = onnx
            .model_for_path(dir.join(ONNX_FILE))
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
            .map_err(|e| err(format!("{e:#}")))?;
        let detect = get_transform("transformers_detect_all")
            .map_err(|e| err(format!("{e:#}")))?
            .ok_or_else(|| err("tract-transformers is not linked".into()))?;
        detect
            .transform(&mut typed)
            .map_err(|e| err(format!("KV cache detection: {e:#}")))?;
        typed
            .optimize()
            .map_err(|e| err(format!("optimizing: {e:#}")))?;
        let inplace_kv_layers = typed
            .nodes()
            .iter()
            .filter(|n| n.op_is::<InPlaceKvSdpa>())
            .count();
        let packed_linears: Vec<&PackedLinear> = typed
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<PackedLinear>())
            .collect();
        let kernel = packed_linears.first().map(|op| op.kernel());
        let packed_linear_ops = packed_linears.len();
        let slots = input_slots(&typed).map_err(err)?;
        // The plan has no executor of its own: each run picks one of these (see `Model::executor`), so that the
        // governor can lower the thread count while the model stays loaded.
        let mut executors = vec![(opts.threads, executor(opts.threads))];
        if opts.threads > 1 {
            let half = opts.threads / 2;
            executors.push((half, executor(half)));
        }
        let plan = typed
            .into_runnable_with_options(&RunOptions::default())
            .map_err(|e| err(format!("{e:#}")))?;
        log::info!(
            model = meta.name.as_str(), layers = meta.architecture.layers, threads = opts.threads,
            inplace_kv = inplace_kv_layers, packed_linear_ops = packed_linear_ops,
            kernel = kernel.map_or("none (int8 export)", Kernel::name); "model loaded"
        );
        Ok(Arc::new(Model {
            meta,
            dir: dir.to_path_buf(),
            tokenizer,
            plan,
            slots,
            chat,
            inplace_kv_layers,
            kernel,
            packed_linear_ops,
            threads: AtomicUsize::new(opts.threads),
            prefill_chunk: AtomicUsize::new(super::PREFILL_CHUNK),
            executors,
        }))
    }

    /// Starts a session with an empty KV cache.
    pub fn session(self: &Arc<Self>) -> Result<Session, EngineError> {
        Session::new(self.clone())
    }

    /// How many attention layers run tract's fused in-place KV cache (`InPlaceKvSdpa`); equal to the layer count
    /// when decode cost grows linearly with the context.
    pub fn inplace_kv_layers(&self) -> usize {
        self.inplace_kv_layers
    }

    /// The kernel running the packed products (`None` for models exported before 2-bit packing).
    pub fn kernel(&self) -> Option<Kernel> {
        self.kernel
    }

    /// How many products run on packed weights (`BitLinear` and `Int8Linear`).
    pub fn packed_linear_ops(&self) -> usize {
        self.packed_linear_ops
    }

    /// Threads used for matrix products.
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

    /// The most threads loaded for this model (what [`LoadOptions`] asked for).
    pub fn max_threads(&self) -> usize {
        self.executors[0].0
    }

    /// Uses the largest prepared thread count not above `n` (at least the smallest) from the next forward pass
    /// on; returns the count now in use.
    pub fn set_threads(&self, n: usize) -> usize {
        let chosen = self
            .executors
            .iter()
            .map(|(t, _)| *t)
            .filter(|&t| t <= n)
            .max()
            .unwrap_or_else(|| self.executors.iter().map(|(t, _)| *t).min().unwrap_or(1));
        self.threads.store(chosen, Ordering::Relaxed);
        chosen
    }

    /// The executor for the current thread count.
    pub(crate) fn executor(&self) -> Executor {
        let n = self.threads();
        self.executors
            .iter()
            .find(|(t, _)| *t == n)
            .map_or(Executor::SingleThread, |(_, e)| e.clone())
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

/// One thread runs on the calling thread: tract's `multithread(1)` would use rayon's global pool.
fn executor(threads: usize) -> Executor {
    if threads <= 1 {
        Executor::SingleThread
    } else {
        Executor::multithread_with_name(threads, &format!("bitnetd-mm{threads}"))
    }
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
        return Err(format!("the KV cache was not folded into tract state (inputs left: {names:?}); re-export the model"));
    }
    Ok(InputSlots {
        input_ids: find("input_ids")?,
        attention_mask: find("attention_mask")?,
        position_ids: find("position_ids")?,
    })
}
