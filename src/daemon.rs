//! `bitnetd run`: load the model, start the engine, serve the sockets, supervise with systemd, and shut down
//! cleanly when `shutdown` fires, answering every accepted request first.

use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::KvModel;
use crate::cloud::{self, key, Connectivity, KimiClient};
use crate::config::{Config, ConfigError};
use crate::deferred::{DeferredQueue, Deliver, Forwarder};
use crate::dispatch::{CloudRoute, DispatchOptions, Dispatcher};
use crate::engine::{Engine, EngineError, EngineOptions, Model};
use crate::governor::{self, policy::Limits, telemetry::Telemetry};
use crate::mqtt::{Mqtt, MqttError};
use crate::server::{self, ConnectionLimits, Listener, ServerError, SlotLimits};
use crate::systemd::{self, Notifier, START_EXTENSION};

mod status;

/// After the drain timeout cancels what is left, how long the cancelled requests get to send their replies.
const CANCEL_GRACE: Duration = Duration::from_secs(10);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    /// The model is missing or does not fit the budget.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The cloud client could not be set up (an unusable `ca_file`).
    #[error("cloud: {0}")]
    Cloud(#[from] cloud::CloudError),
    /// A configured API key file cannot be used.
    #[error(transparent)]
    Key(#[from] key::KeyError),
    /// The deferred queue's directory cannot be used.
    #[error(transparent)]
    Queue(#[from] crate::deferred::QueueError),
    /// The HTTP API cannot listen where configured.
    #[error(transparent)]
    Http(#[from] crate::http::ListenError),
}

/// The systemd credential holding the HTTP API key.
pub const HTTP_KEY_CREDENTIAL: &str = "http-api-key";

/// Runs the daemon until `shutdown` is cancelled. Returns once every accepted request is answered (or the
/// drain timeout cancelled it) and the socket file is removed.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let notify = Notifier;
    let dir = config.model.path.clone();
    let (meta, estimate) = config.check_model()?;
    log::info!(model = meta.name.as_str(), path:? = dir, threads = config.model.threads,
        estimate_bytes = estimate.total(); "loading model");
    notify.status(&format!("loading model {}", meta.name));
    let rss_before_model = crate::budget::process_rss_bytes();

    let tracker = TaskTracker::new();
    let stop_accepting = CancellationToken::new();
    // HTTP listens while the model loads (its /health says so); everything else starts after.
    let _stop_on_error = stop_accepting.clone().drop_guard();
    // HTTP stays up through the drain, so that /health says `draining` and new requests get 503.
    let stop_http = CancellationToken::new();
    let _stop_http_on_error = stop_http.clone().drop_guard();
    let (serving_tx, serving_rx) = tokio::sync::watch::channel(None);
    let http_where = start_http(&config, serving_rx, &stop_http, &tracker)?;

    let Some(model) = load(&config, &notify, &shutdown).await? else {
        notify.stopping("stopped while loading");
        return Ok(());
    };
    let engine = Engine::spawn(
        model.clone(),
        EngineOptions {
            slots: config.engine.slots,
            queue: config.engine.queue,
        },
    )?;
    let limits = Limits {
        soft_temp_c: config.budget.soft_temp_c,
        hard_temp_c: config.budget.hard_temp_c,
        hysteresis_c: config.budget.hysteresis_c,
        memory_bytes: config.budget.memory_bytes,
        max_threads: config.model.threads,
        warm_threads_percent: config.budget.warm_threads_percent,
        pressure_max_tokens: config.budget.pressure_max_tokens,
        power: config.budget.power,
        economy_max_tokens: config.budget.economy_max_tokens,
        ..Limits::default()
    };
    let budget = governor::spawn(
        limits,
        Telemetry::new(&config.budget.telemetry_root),
        config.budget.sample_every,
        shutdown.clone(),
    );
    let engine_ctl = engine.clone();
    let (cloud, deliveries) = match start_cloud(&config, &shutdown)? {
        Some((route, deliveries)) => (Some(route), Some(deliveries)),
        None => (None, None),
    };
    tokio::spawn(apply_directive(
        budget.clone(),
        model.clone(),
        engine_ctl,
        cloud.as_ref().map(|c| c.client.clone()),
    ));
    let dispatcher = Dispatcher::new(
        Arc::new(engine),
        DispatchOptions {
            default_max_tokens: config.engine.default_max_tokens,
            default_deadline: config.budget.default_deadline,
            stall_limit: config.engine.stall_limit,
            memory_budget: config.budget.memory_bytes,
            rss_before_model,
            budget: Some(budget.clone()),
            kv: Some(KvModel::for_estimate(&estimate, meta.context_length)),
            cloud: cloud.clone(),
            hot_action: config.budget.hot_action,
        },
    );

    serving_tx.send_replace(Some(dispatcher.clone()));
    let mut where_ = String::from("no socket");
    if config.socket.enabled {
        let listener = Listener::bind(&config.socket)?;
        where_ = match (&listener.path, listener.activated) {
            (Some(p), true) => format!("{} (socket activation)", p.display()),
            (None, true) => "a socket from systemd".into(),
            (Some(p), false) => format!("{} (from {})", p.display(), config.socket.path_origin),
            (None, false) => "an unnamed socket".into(),
        };
        let limits = ConnectionLimits {
            max_line_bytes: config.socket.max_line_bytes,
            max_requests: config.socket.max_requests_per_connection,
            idle_timeout: config.socket.idle_timeout,
        };
        let slots = SlotLimits {
            connections: config.socket.max_connections,
            status_connections: config.socket.status_connections,
            per_process: config.socket.max_connections_per_process,
        };
        tracker.spawn(server::serve(
            listener,
            dispatcher.clone(),
            limits,
            slots,
            stop_accepting.clone(),
            tracker.clone(),
        ));
    }
    if let Some(m) = config.mqtt.clone() {
        let broker = format!("MQTT {}:{} ({})", m.host, m.port, m.request_topic());
        let deliveries = cloud
            .as_ref()
            .zip(deliveries)
            .map(|(c, d)| (c.queue.clone(), d));
        let mqtt = Mqtt::new(m, dispatcher.clone(), deliveries)?;
        tracker.spawn(mqtt.run(stop_accepting.clone()));
        where_ = format!("{where_} and {broker}");
    }
    if let Some(h) = http_where {
        where_ = format!("{where_} and HTTP on {h}");
    }
    let serving = format!("serving {} on {where_}", meta.name);
    log::info!(model = meta.name.as_str(), socket = where_.as_str(); "ready");
    let link = cloud.as_ref().map(|c| c.link.subscribe());
    let first = status::current_line(&serving, &budget, link.as_ref());
    notify.ready(&first);
    let status_task = tokio::spawn(status::publish(serving, first, budget.clone(), link));
    let watchdog = tokio::spawn(watchdog(dispatcher.clone()));

    shutdown.cancelled().await;
    status_task.abort();
    let _ = status_task.await;
    let in_flight = dispatcher.in_flight();
    log::info!(in_flight; "shutting down");
    notify.stopping(&format!("draining {in_flight} request(s)"));
    dispatcher.begin_drain();
    stop_accepting.cancel();
    let drain = config.engine.drain_timeout;
    if tokio::time::timeout(drain, dispatcher.idle())
        .await
        .is_err()
    {
        log::warn!(in_flight = dispatcher.in_flight(); "drain timeout: cancelling what is left");
        dispatcher.cancel_all();
        let _ = tokio::time::timeout(CANCEL_GRACE, dispatcher.idle()).await;
    }
    stop_http.cancel();
    tracker.close();
    if tokio::time::timeout(CANCEL_GRACE, tracker.wait())
        .await
        .is_err()
    {
        log::warn!("connections did not close in time");
    }
    watchdog.abort();
    log::info!("stopped");
    Ok(())
}

/// Binds and serves the HTTP API when `[http]` is enabled (before the model is loaded: requests get 503
/// `loading` until `dispatcher` has one). Returns where it listens, for the logs.
fn start_http(
    config: &Config,
    dispatcher: tokio::sync::watch::Receiver<Option<Arc<Dispatcher>>>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Option<String>, DaemonError> {
    let h = &config.http;
    if !h.enabled {
        // A socket systemd passed for HTTP would take connections nobody answers: close it, and say why.
        let passed = crate::server::listener::take_passed(crate::server::listener::is_http_name)?;
        if !passed.is_empty() {
            log::warn!(sockets = passed.len();
                "systemd passed HTTP sockets but [http] is not enabled: closing them (see docs/http.md)");
            for fd in passed {
                // SAFETY: a passed descriptor, handed out once by `take_passed` and owned by nobody else.
                drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            }
        }
        return Ok(None);
    }
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    let key = key::find_secret(
        HTTP_KEY_CREDENTIAL,
        creds.as_deref(),
        h.api_key_file.as_deref(),
    )?;
    let listeners = crate::http::listen::bind(h, key.is_some())?;
    let names: Vec<String> = listeners.iter().map(|l| l.to_string()).collect();
    let key = key.map(|(k, source)| {
        log::info!(key_from:% = source; "HTTP API key set: TCP clients must send it");
        k
    });
    crate::http::serve(h, key, listeners, dispatcher, stop.clone(), tracker);
    Ok(Some(names.join(", ")))
}

/// Sets up the cloud route when `[cloud]` is enabled and a key is found: the client, the connectivity probes,
/// the deferred queue (recovered from disk) and its forwarder. `None`: everything runs locally.
fn start_cloud(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<(CloudRoute, Deliver)>, DaemonError> {
    let c = &config.cloud;
    if !c.enabled {
        log::info!("cloud disabled in the configuration: every request runs on the board");
        return Ok(None);
    }
    let found = crate::cloud::check::find_key(c)?;
    let Some((api_key, source)) = found else {
        log::info!(
            "no Kimi API key found: the cloud route is off (see [cloud] in the configuration)"
        );
        return Ok(None);
    };
    let link = Arc::new(Connectivity::new());
    let client = Arc::new(KimiClient::new(c, api_key, link.clone())?);
    let (queue, rec) = DeferredQueue::open(&config.defer)?;
    let queue = Arc::new(queue);
    log::info!(base_url = c.base_url.as_str(), model = c.model.as_str(), key_from:% = source,
        state_dir:? = config.defer.state_dir, deferred = rec.tasks, resent = rec.unknown_outcome,
        results = rec.results; "cloud route on");
    if rec.unknown_outcome > 0 {
        log::warn!(tasks = rec.unknown_outcome;
            "deferred tasks were being sent when bitnetd stopped; their outcome is unknown, so they are sent again");
    }
    {
        let (link, client, stop) = (link.clone(), client.clone(), shutdown.clone());
        let (every, timeout) = (c.probe_every, c.probe_timeout);
        tokio::spawn(async move { link.run_probes(&client, every, timeout, stop).await });
    }
    let (forwarder, deliveries) = Forwarder::new(queue.clone(), client.clone(), link.subscribe());
    tokio::spawn(forwarder.run(shutdown.clone()));
    Ok(Some((
        CloudRoute {
            client,
            link,
            queue,
            router: config.router.clone(),
        },
        deliveries,
    )))
}

/// Loads the model off the runtime, asking systemd for more start time while it takes. `None` when shutdown
/// came first.
async fn load(
    config: &Config,
    notify: &Notifier,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<Model>>, DaemonError> {
    let (dir, opts) = (config.model.path.clone(), config.model.load_options());
    let mut task = tokio::task::spawn_blocking(move || Model::load(&dir, &opts));
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(START_EXTENSION / 3);
    loop {
        tokio::select! {
            r = &mut task => {
                let model = r.map_err(|e| EngineError::Inference(format!("model loading panicked: {e}")))??;
                log::info!(seconds = started.elapsed().as_secs_f64(); "model loaded");
                return Ok(Some(model));
            }
            _ = tick.tick() => notify.extend_timeout(START_EXTENSION),
            _ = shutdown.cancelled() => return Ok(None),
        }
    }
}

/// Applies the governor's directive: the engine's thread count (from the next forward pass on), the pause
/// when hot, and under memory pressure the token cap of running generations and the freeing of caches.
async fn apply_directive(
    mut budget: tokio::sync::watch::Receiver<governor::Budget>,
    model: Arc<Model>,
    engine: Engine,
    cloud: Option<Arc<KimiClient>>,
) {
    loop {
        let d = budget.borrow_and_update().directive;
        let before = model.threads();
        let now = model.set_threads(d.threads);
        if now != before {
            log::warn!(threads = now, was = before; "inference threads changed by the governor");
        }
        model.set_prefill_chunk(d.prefill_chunk);
        engine.set_paused(d.local_paused);
        engine.set_token_cap(d.max_new_tokens);
        engine.set_free_idle(d.free_caches);
        if d.free_caches {
            if let Some(c) = &cloud {
                c.clear_cache();
            }
        }
        if budget.changed().await.is_err() {
            return;
        }
    }
}

/// Pings the systemd watchdog while the engine is alive. A stuck or dead engine stops the pings, and systemd
/// restarts the service.
async fn watchdog(dispatcher: Arc<Dispatcher>) {
    let Some(every) = systemd::watchdog_interval() else {
        return;
    };
    let notify = Notifier;
    let mut warned = false;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if dispatcher.engine_alive() {
            notify.watchdog();
            warned = false;
        } else if !warned {
            log::error!("the engine is stuck or dead: withholding the watchdog ping");
            warned = true;
        }
    }
}
