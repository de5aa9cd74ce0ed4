//! bitnetd: an edge daemon that runs BitNet b1.58 models through tract.
//!
//! Module map:
//! - [`hf`]: reading Hugging Face BitNet checkpoints (config, safetensors, ternary weights).
//! - [`onnx`]: writing the ONNX graph (builder, BitNet decoder).
//! - [`export`]: `bitnetd export`, checkpoint directory to model directory.
//! - [`meta`]: `bitnetd.json`, the metadata beside the ONNX file.
//! - [`kernels`]: int8 × 2-bit ternary and int8 × int8 products (scalar, AVX2, VNNI, NEON, NEON dotprod), the
//!   linears' prologue, attention over int8/f16/f32 KV pages.
//! - [`team`]: the worker team that runs each op's parallel part (chunks taken, late chunks taken over).
//! - [`engine`]: loading a model, bitnetd's tract ops, sessions with their paged KV cache, sampling, chat
//!   templates, the engine thread.
//! - [`default_model`]: where the shipped default model lives.
//! - [`config`]: the TOML configuration, raw then validated.
//! - [`daemon`]: `bitnetd run`, wiring everything below together under a shutdown token; systemd's `STATUS=` line.
//! - [`protocol`]: the JSON wire format shared by every source: requests, replies, status, error codes (a leaf:
//!   it depends on no module of the request path).
//! - [`errors`]: the one table from internal errors to wire codes and retry hints.
//! - [`handler`]: what every source shares: control messages, per-client limits, submit, in-flight tracking.
//! - [`dispatch`]: from a request to a run: routing facts, admission, local or cloud start, fallback,
//!   deferral, the completion guard, `status`.
//! - [`tasks`]: the integration plan's request types as prompts (`context`, `reason`, `validate`) and the
//!   reading of a validation's result.
//! - [`router`]: where a request runs, as a pure function (and the complexity heuristic it uses).
//! - [`admission`]: whether a local run may start now (governor, deadline, KV budget), as a pure function.
//! - [`cloud`]: the Kimi client, its limits, and the connectivity monitor.
//! - [`deferred`]: the durable store-and-forward queue and the forwarder.
//! - [`inflight`]: a set of requests in flight (by key, cancellable, awaitable until empty).
//! - [`server`]: the Unix socket (listener, connections, line reading); [`mqtt`]: the MQTT network loop and
//!   its pure addressing/dedup/backoff rules; [`http`]: the OpenAI-compatible HTTP API.
//! - [`metrics`]: the Prometheus counters, histograms and gauges behind `GET /metrics`.
//! - [`budget`]: memory estimates and the process's resident size.
//! - [`governor`]: board telemetry (temperature, throttling, memory, pressure) and the pure budget policy.
//! - [`systemd`]: readiness, status, watchdog; [`logging`]: journald or stderr.
//! - [`backoff`]: exponential backoff with jitter.
//! - [`client`]: the blocking clients behind `bitnetd ask` and `bitnetd status`.
//!
//! The request path, the same for every source:
//!
//! ```text
//! server::connection, mqtt::service,   transport and addressing only
//! http::complete
//!   -> handler::Handler                  parse result, control messages, per-client limit, in-flight set
//!   -> dispatch::Dispatcher::submit      tasks::shape, validation (Backend::prepare), routing facts
//!   -> router::decide                    local, cloud (with fallback), defer, or refuse
//!   -> admission::admit                  for local runs: governor, deadline fit, KV reservation
//!   -> engine (Backend) | cloud::KimiClient | deferred::DeferredQueue
//!   -> dispatch's Completion guard       exactly one terminal reply, counters, reservation freed
//! ```
//! Every refusal on the way becomes a wire error in [`errors`].

pub mod admission;
pub mod backoff;
pub mod budget;
pub mod client;
pub mod cloud;
pub mod config;
pub mod daemon;
pub mod default_model;
pub mod deferred;
pub mod dispatch;
pub mod engine;
pub mod errors;
pub mod export;
pub mod governor;
pub mod handler;
pub mod hf;
pub mod http;
pub mod inflight;
pub mod kernels;
pub mod logging;
pub mod meta;
pub mod metrics;
pub mod mqtt;
pub mod onnx;
pub mod protocol;
pub mod router;
pub mod server;
pub mod systemd;
pub mod tasks;
pub mod team;
