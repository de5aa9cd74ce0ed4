//! The `bitnetd` command: parse the command line, set up logging, and hand over to the library.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use bitnetd::default_model::default_model_dir;
use bitnetd::engine::{GenerateParams, LoadOptions, Message, Model, Prompt, SamplingParams};

#[derive(Parser)]
#[command(
    name = "bitnetd",
    version,
    about = "Edge AI daemon for BitNet b1.58 models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export a Hugging Face BitNet checkpoint directory to a bitnetd model directory (ONNX).
    Export {
        /// Checkpoint directory: config.json, *.safetensors, tokenizer.json.
        #[arg(long)]
        from: PathBuf,
        /// Model directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Model name recorded in bitnetd.json (default: the checkpoint directory's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Generate text with a model, without the daemon.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model directory (default: $BITNETD_MODEL, else the shipped default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Send the prompt as a user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy (default: the model's generation_config, else 0).
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep only the k most likely tokens, 0 keeps all (default: the model's, else 0).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold, 1 is off (default: the model's, else 1).
    #[arg(long)]
    top_p: Option<f32>,
    /// Repetition penalty, 1 is off (default: the model's, else 1).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Threads for matrix products (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(
        env_logger::Env::default().filter_or("BITNETD_LOG", "warn,tract_onnx::model=error"),
    )
    .init();
    match Cli::parse().command {
        Command::Export { from, out, name } => {
            let opts = bitnetd::export::ExportOptions { name };
            let summary =
                bitnetd::export::export(&from, &out, &opts, &mut |line| eprintln!("{line}"))
                    .with_context(|| format!("exporting {}", from.display()))?;
            eprintln!(
                "exported {} parameters to {}",
                summary.meta.parameters,
                summary.out.display()
            );
            Ok(())
        }
        Command::Generate(args) => generate(args),
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    let dir = a.model.clone().unwrap_or_else(default_model_dir);
    let mut opts = LoadOptions::default();
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    let model = Model::load(&dir, &opts)?;
    let prompt = if a.chat {
        Prompt::Chat(vec![Message {
            role: "user".into(),
            content: a.prompt.clone(),
        }])
    } else {
        Prompt::Text(a.prompt.clone())
    };
    let d = &model.meta.generation_defaults;
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature.or(d.temperature).unwrap_or(0.0),
            top_k: a.top_k.or(d.top_k).unwrap_or(0),
            top_p: a.top_p.or(d.top_p).unwrap_or(1.0),
            repetition_penalty: a.repetition_penalty.or(d.repetition_penalty).unwrap_or(1.0),
            seed: a.seed,
        },
        stop: a.stop.clone(),
        stop_ids: vec![],
    };
    let req = model.prepare(&prompt, params)?;
    let mut session = model.session()?;
    let stdout = std::io::stdout();
    let g = session.generate(&req, &mut |t| {
        if !a.json {
            let mut out = stdout.lock();
            let _ = out.write_all(t.text.as_bytes());
            let _ = out.flush();
        }
        ControlFlow::Continue(())
    })?;
    if a.json {
        let v = serde_json::json!({
            "model": model.meta.name,
            "prompt_ids": req.prompt_ids(),
            "token_ids": g.token_ids,
            "text": g.text,
            "finish_reason": g.finish_reason,
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens(),
            "ttft_ms": g.ttft.as_secs_f64() * 1e3,
            "total_ms": g.total.as_secs_f64() * 1e3,
            "tokens_per_second": g.decode_tokens_per_second(),
        });
        println!("{v}");
    } else {
        println!("{}", g.trailing_text);
        eprintln!(
            "[{} prompt + {} generated tokens, first token {:.0} ms, {:.1} tokens/s, {:?}]",
            g.prompt_tokens,
            g.completion_tokens(),
            g.ttft.as_secs_f64() * 1e3,
            g.decode_tokens_per_second(),
            g.finish_reason
        );
    }
    Ok(())
}
