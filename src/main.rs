//! The `bitnetd` command: parse the command line, set up logging, and hand over to the library.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use bitnetd::client::Answer;
use bitnetd::config::{Config, Env};
use bitnetd::onnx::bitnet::{EmbeddingFormat, HeadFormat};
use bitnetd::protocol::{Reply, Route};

use bitnetd::default_model::default_model_dir;
use bitnetd::engine::{
    FinishReason, GenerateParams, LoadOptions, Message, Model, Prompt, SamplingParams,
};

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
    /// Run the daemon: serve the Unix socket API until SIGTERM.
    Run {
        /// Config file (default: $BITNETD_CONFIG, else built-in defaults; see `print-config`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Ask the running daemon: streams the answer to stdout.
    Ask(AskArgs),
    /// Print the running daemon's status as JSON.
    Status {
        /// Socket path (default: from the config, as `run` would use it).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Config file to take the socket path from.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the result of a deferred request (`ask --defer --id ID`) as JSON.
    Result {
        /// The request's id.
        id: String,
        /// Socket path (default: from the config, as `run` would use it).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Config file to take the socket path from.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the default configuration, every option with its documentation.
    PrintConfig,
    /// Validate a config file (and that its model fits the memory budget).
    CheckConfig {
        /// The file to check.
        path: PathBuf,
    },
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
        /// Storage of the output layer: f32 (logits as transformers computes them) or int8 (a quarter of the
        /// bytes read per token, logits within about 1%). Without it: f32 up to 256 MiB, else int8.
        #[arg(long, value_enum)]
        head: Option<HeadFormat>,
        /// Storage of the embedding table: float (f16 when exact) or int8 (smallest model; logits move by a
        /// few percent, see tests/reference.rs).
        #[arg(long, value_enum, default_value_t)]
        embedding: EmbeddingFormat,
    },
    /// Generate text with a model, without the daemon.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct AskArgs {
    /// The question.
    text: String,
    /// Socket path (default: from the config, as `run` would use it).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Config file to take the socket path from.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to run it: auto, local or cloud.
    #[arg(long, default_value = "auto")]
    route: String,
    /// Never let the request leave the board.
    #[arg(long)]
    private: bool,
    /// Send the text as a plain prompt, not as a chat message.
    #[arg(long)]
    raw: bool,
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long)]
    temperature: Option<f32>,
    /// Milliseconds the answer may take.
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// If it must go to the cloud while it is offline, keep it and forward it later (`bitnetd result ID`).
    #[arg(long)]
    defer: bool,
    /// Request id (default: ask-<pid>); give one with --defer to fetch the result later.
    #[arg(long)]
    id: Option<String>,
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
    /// How the int8 output layer runs (as `[model] output_layer`).
    #[arg(long, value_enum, default_value_t)]
    output_layer: bitnetd::engine::OutputLayer,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Under systemd, stderr goes to the journal too.
            eprintln!("bitnetd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    let env = Env::from_process();
    match cli.command {
        Command::Run { config } => {
            let config = Config::load(config.as_deref(), &env)?;
            bitnetd::logging::init(&config.logging).map_err(anyhow::Error::msg)?;
            run(config)
        }
        Command::Ask(a) => ask(a, &env),
        Command::Status { socket, config } => {
            let socket = socket_path(socket, config, &env)?;
            let status = Reply::Status(Box::new(bitnetd::client::status(&socket)?));
            println!("{}", serde_json::to_string_pretty(&status)?);
            Ok(())
        }
        Command::Result { id, socket, config } => {
            let socket = socket_path(socket, config, &env)?;
            let reply = Reply::from(bitnetd::client::result(&socket, &id)?);
            println!("{}", serde_json::to_string_pretty(&reply)?);
            Ok(())
        }
        Command::PrintConfig => {
            print!("{}", bitnetd::config::DEFAULTS_TOML);
            Ok(())
        }
        Command::CheckConfig { path } => {
            let config = Config::load(Some(&path), &env)?;
            let (meta, estimate) = config.check_model()?;
            println!(
                "{}: ok (model {} in {}, about {} MiB of a {} MiB budget, socket {})",
                path.display(),
                meta.name,
                config.model.path.display(),
                estimate.total() >> 20,
                config.budget.memory_bytes >> 20,
                config.socket.path.display()
            );
            use bitnetd::cloud::check::CloudCheck;
            match bitnetd::cloud::check::check(&config.cloud)? {
                CloudCheck::Off(why) => println!("cloud: off ({why})"),
                CloudCheck::Unreachable(why) => {
                    println!("cloud: not reachable now, the model is checked once it is: {why}")
                }
                CloudCheck::Chosen(id) => {
                    println!(
                        "cloud: model {id} (from [cloud] model = {:?})",
                        config.cloud.model
                    )
                }
                CloudCheck::Problem(why) => anyhow::bail!("{why}"),
            }
            Ok(())
        }
        Command::Export {
            from,
            out,
            name,
            head,
            embedding,
        } => {
            init_cli_logging();
            let opts = bitnetd::export::ExportOptions {
                name,
                head,
                embedding,
            };
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
        Command::Generate(args) => {
            init_cli_logging();
            generate(args)
        }
    }
}

fn init_cli_logging() {
    env_logger::Builder::from_env(
        env_logger::Env::default().filter_or("BITNETD_LOG", "warn,tract_onnx::model=error"),
    )
    .init();
}

/// Runs the daemon on its own runtime until SIGTERM or SIGINT (a second one exits at once).
fn run(config: Config) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bitnetd-io")
        .enable_all()
        .build()?;
    let shutdown = CancellationToken::new();
    let result: Result<()> = rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let token = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            token.cancel();
            // Repeated SIGTERMs (systemd, `timeout`) keep draining; a second Ctrl-C means "now".
            int.recv().await;
            log::warn!("second interrupt: exiting without draining");
            std::process::exit(130);
        });
        Ok(bitnetd::daemon::run(config, shutdown).await?)
    });
    // A model still loading on a blocking thread must not hold up the exit.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The socket of the installed service (bitnetd.socket).
const SYSTEM_SOCKET: &str = "/run/bitnetd/bitnetd.sock";

/// The socket the clients talk to: `--socket`, else the configuration's (`--config`, `$BITNETD_CONFIG`);
/// without either, when the default one does not exist but the installed service's does, that one, so that
/// `bitnetd status` works as is on a board where the package is installed.
fn socket_path(socket: Option<PathBuf>, config: Option<PathBuf>, env: &Env) -> Result<PathBuf> {
    if let Some(s) = socket {
        return Ok(s);
    }
    let explicit =
        config.is_some() || env.get(Env::CONFIG).is_some() || env.get(Env::SOCKET).is_some();
    let path = Config::load(config.as_deref(), env)?.socket.path;
    let system = PathBuf::from(SYSTEM_SOCKET);
    if !explicit && !path.exists() && system.exists() {
        return Ok(system);
    }
    Ok(path)
}

fn ask(a: AskArgs, env: &Env) -> Result<()> {
    let socket = socket_path(a.socket.clone(), a.config.clone(), env)?;
    let route: Route = serde_json::from_value(serde_json::json!(a.route))
        .map_err(|_| anyhow::anyhow!("--route must be auto, local or cloud"))?;
    let req = bitnetd::client::Ask {
        text: a.text,
        raw: a.raw,
        route,
        private: a.private,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        deadline_ms: a.deadline_ms,
        defer: a.defer,
        id: a.id,
    };
    let mut stdout = std::io::stdout();
    let done = match bitnetd::client::ask(&socket, &req, &mut stdout)? {
        Answer::Done(d) => *d,
        Answer::Deferred { id, .. } => {
            eprintln!(
                "[deferred until the cloud is reachable; fetch it with `bitnetd result {}`]",
                bitnetd::protocol::id_text(&id)
            );
            return Ok(());
        }
    };
    println!();
    let fallback = done.fallback.map_or(String::new(), |c| {
        format!(", cloud failed ({c}), ran locally")
    });
    eprintln!(
        "[{} via {} ({}{fallback}), {} tokens, first token {} ms, {}]",
        done.model,
        done.route.as_str(),
        done.route_reason,
        done.usage.completion_tokens,
        done.timing.ttft_ms,
        done.finish_reason.as_str()
    );
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let dir = a.model.clone().unwrap_or_else(default_model_dir);
    let mut opts = LoadOptions {
        output_layer: a.output_layer,
        ..Default::default()
    };
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
    let g = session.generate(&req, &mut |t: &bitnetd::engine::TokenEvent| {
        if !a.json {
            let mut out = stdout.lock();
            let _ = out.write_all(t.text.as_bytes());
            let _ = out.flush();
        }
        ControlFlow::<FinishReason>::Continue(())
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
