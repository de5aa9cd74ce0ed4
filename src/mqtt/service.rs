//! The MQTT network loop: connect (and reconnect with backoff), subscribe after every ConnAck, keep the retained
//! status current, turn request messages into dispatcher work, and publish the replies: tokens at QoS 0, the
//! terminal reply at QoS 1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use rumqttc::Outgoing;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::deferred::{DeferredQueue, Deliver, ReplyTo, StoredResult};
use crate::dispatch::{Dispatcher, Origin, Ticket};
use crate::inflight::InFlight;
use crate::protocol::{self, ErrorCode, Incoming, Reply, WireError};

use super::addressing::{
    backoff, from_hex, hex, reply_address, request_key, Dedup, ReplyAddress, ReplyHints,
};
use super::options::mqtt_options;
use super::{MqttError, CONTENT_TYPE};

/// Requests remembered for duplicate detection, and for how long.
const DEDUP_CAPACITY: usize = 4096;
const DEDUP_TTL: Duration = Duration::from_secs(600);
/// Requests to the client's outgoing queue (drained by the network loop).
const CLIENT_QUEUE: usize = 512;
/// How often the retained status is recomputed (and republished when it changed).
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// On shutdown, how long to wait for replies and the offline status to go out.
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// A configured MQTT interface, ready to run.
pub struct Mqtt {
    shared: Arc<Shared>,
    events: EventLoop,
    /// Results of deferred MQTT requests to publish, and the queue to record their publication in.
    deliveries: Option<(Arc<DeferredQueue>, Deliver)>,
}

struct Shared {
    cfg: MqttConfig,
    client: AsyncClient,
    dispatcher: Arc<Dispatcher>,
    in_flight: InFlight<String>,
}

impl Mqtt {
    /// Checks the TLS files and credentials and prepares the connection (nothing is sent yet).
    pub fn new(
        cfg: MqttConfig,
        dispatcher: Arc<Dispatcher>,
        deliveries: Option<(Arc<DeferredQueue>, Deliver)>,
    ) -> Result<Mqtt, MqttError> {
        let offline = status_payload(&cfg, &dispatcher, "offline");
        let opts = mqtt_options(&cfg, &offline)?;
        let (client, events) = AsyncClient::new(opts, CLIENT_QUEUE);
        Ok(Mqtt {
            shared: Arc::new(Shared {
                cfg,
                client,
                dispatcher,
                in_flight: InFlight::default(),
            }),
            events,
            deliveries,
        })
    }

    /// Runs until `stop`, then answers what is in flight, publishes the retained `offline` status and
    /// disconnects cleanly.
    pub async fn run(self, stop: CancellationToken) {
        let Mqtt {
            shared,
            mut events,
            deliveries,
        } = self;
        let (queue, mut deliveries) = match deliveries {
            Some((q, d)) => (Some(q), Some(d)),
            None => (None, None),
        };
        let cfg = &shared.cfg;
        let broker = format!("{}:{}", cfg.host, cfg.port);
        let mut dedup = Dedup::new(DEDUP_CAPACITY, DEDUP_TTL);
        let mut rng = SmallRng::seed_from_u64(seed());
        let (mut attempt, mut connected, mut stopping) = (0u32, false, false);
        let mut published_status: Option<Vec<u8>> = None;
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        loop {
            tokio::select! {
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        attempt = 0;
                        connected = true;
                        log::info!(broker = broker.as_str(), filter = cfg.request_filter().as_str(); "MQTT connected");
                        if !stopping {
                            // A clean session forgets subscriptions: subscribe after every ConnAck.
                            if let Err(e) = shared.client.try_subscribe(cfg.request_filter(), QoS::AtLeastOnce) {
                                log::error!("MQTT subscribe: {e}");
                            }
                        }
                        published_status = None;
                        if cfg.home_assistant {
                            shared.announce_to_home_assistant();
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if !stopping {
                            shared.handle(p, &mut dedup);
                        }
                    }
                    Ok(Event::Incoming(Packet::Disconnect(d))) => {
                        log::warn!(broker = broker.as_str(); "MQTT broker disconnected us: {:?}", d.reason_code);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if connected || attempt == 0 {
                            log::warn!(broker = broker.as_str(); "MQTT connection: {e}");
                        }
                        connected = false;
                        let wait = backoff(attempt, cfg.reconnect_min, cfg.reconnect_max, rng.random());
                        attempt = attempt.saturating_add(1);
                        log::debug!(wait_ms = wait.as_millis() as u64; "MQTT reconnecting");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stop.cancelled() => {}
                        }
                        if stop.is_cancelled() && !connected {
                            // Nothing can be published; the broker already shows the Last Will.
                            shared.in_flight.cancel_all();
                            return;
                        }
                    }
                },
                _ = status_tick.tick(), if connected && !stopping => {
                    let now = status_payload(cfg, &shared.dispatcher, "online");
                    if published_status.as_ref() != Some(&now) {
                        shared.publish_status(now.clone());
                        published_status = Some(now);
                    }
                }
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    let _ = shared.client.try_unsubscribe(cfg.request_filter());
                    if connected {
                        shared.publish_status(status_payload(cfg, &shared.dispatcher, "draining"));
                    }
                }
                Some(r) = next_delivery(&mut deliveries), if connected && !stopping => {
                    shared.deliver(&r, queue.as_deref()).await;
                }
                _ = shared.in_flight.empty(), if stopping => break,
            }
        }
        shared.publish_status(status_payload(cfg, &shared.dispatcher, "offline"));
        let _ = shared.client.try_disconnect();
        let flush = async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        if tokio::time::timeout(FLUSH_GRACE, flush).await.is_err() {
            log::warn!("MQTT: could not flush the last replies before shutdown");
        }
        log::info!("MQTT disconnected");
    }
}

/// The next deferred result to publish; pending forever without a forwarder.
async fn next_delivery(d: &mut Option<Deliver>) -> Option<StoredResult> {
    match d {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Shared {
    /// Publishes a deferred request's result to its reply address (QoS 1) and records it as delivered.
    async fn deliver(&self, r: &StoredResult, queue: Option<&DeferredQueue>) {
        let ReplyTo::Mqtt { topic, correlation } = &r.reply_to else {
            return;
        };
        let addr = ReplyAddress {
            topic: topic.clone(),
            correlation: correlation.as_deref().and_then(from_hex).map(Bytes::from),
        };
        let (topic, payload, props) = message(&addr, &r.reply.clone().into());
        match self
            .client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
            .await
        {
            Ok(()) => {
                log::info!(seq = r.seq, id:% = r.id; "deferred result published");
                if let Some(q) = queue {
                    if let Err(e) = q.mark_delivered(r.seq) {
                        log::error!("{e}");
                    }
                }
            }
            Err(e) => log::error!(seq = r.seq; "deferred result not published: {e}"),
        }
    }

    /// Handles one incoming message. Never waits: replies that must be sent from here are queued with
    /// `try_publish`.
    fn handle(self: &Arc<Self>, p: Publish, dedup: &mut Dedup) {
        let received = Instant::now();
        let props = p.properties.unwrap_or_default();
        let mut hints = ReplyHints {
            response_topic: props.response_topic,
            correlation: props.correlation_data,
            ..Default::default()
        };
        let parsed = if p.payload.len() > self.cfg.max_payload_bytes {
            Err(WireError::new(
                ErrorCode::TooLarge,
                format!(
                    "payload of {} bytes is over the limit of {}",
                    p.payload.len(),
                    self.cfg.max_payload_bytes
                ),
            ))
        } else {
            protocol::parse_json(&p.payload).and_then(|v| take_reply_to(v, &mut hints))
        };
        let addr = reply_address(&self.cfg.topic_prefix, &hints);
        let id_text = hints.id.clone().unwrap_or_default();
        let incoming = match parsed {
            Ok(i) => i,
            Err(e) => return self.refuse(addr, e, &p.topic),
        };
        match incoming {
            Incoming::Command {
                id: Some(id),
                cmd: protocol::Command::Result,
            } => match addr {
                Some(a) => self.try_send(&a, &self.dispatcher.result(&id), QoS::AtLeastOnce),
                None => log::warn!("MQTT result request without a reply address"),
            },
            Incoming::Command {
                id: None,
                cmd: protocol::Command::Result,
            } => self.refuse(
                addr,
                WireError::new(
                    ErrorCode::BadRequest,
                    "`cmd: result` needs the `id` of the deferred request",
                ),
                &p.topic,
            ),
            Incoming::Command {
                id,
                cmd: protocol::Command::Status,
            } => match addr {
                Some(a) => self.try_send(
                    &a,
                    &Reply::Status(Box::new(self.dispatcher.status(id))),
                    QoS::AtLeastOnce,
                ),
                None => log::warn!("MQTT status request without a reply address"),
            },
            Incoming::Cancel { .. } => {
                if let Some(a) = addr {
                    self.in_flight.cancel(&request_key(&a, &id_text));
                }
            }
            Incoming::Request(req) => {
                let Some(addr) = addr else {
                    return log::warn!("MQTT request without a reply address");
                };
                let key = request_key(&addr, &id_text);
                if !dedup.first_time(&key, received) {
                    log::info!(id = id_text.as_str(); "MQTT redelivery of a request already taken: ignored");
                    return;
                }
                let id = req.id.clone();
                if self.in_flight.len() >= self.cfg.max_in_flight {
                    dedup.forget(&key);
                    let mut e = WireError::new(
                        ErrorCode::Busy,
                        format!("at most {} MQTT requests in flight", self.cfg.max_in_flight),
                    );
                    e.retry_after_ms = Some(1000);
                    self.dispatcher.record_rejected();
                    return self.try_send(&addr, &e.with_id(&id).into(), QoS::AtLeastOnce);
                }
                let origin = Origin {
                    source: "mqtt",
                    received,
                    start_by: props
                        .message_expiry_interval
                        .map(|s| received + Duration::from_secs(s.into())),
                    reply_to: ReplyTo::Mqtt {
                        topic: addr.topic.clone(),
                        correlation: addr.correlation.as_ref().map(|c| hex(c)),
                    },
                };
                match self.dispatcher.submit(*req, origin) {
                    Ok(ticket) => {
                        self.in_flight.insert(key.clone(), ticket.cancel_token());
                        tokio::spawn(self.clone().forward(ticket, addr, key));
                    }
                    Err(e) => {
                        dedup.forget(&key);
                        self.try_send(&addr, &e.into(), QoS::AtLeastOnce);
                    }
                }
            }
        }
    }

    fn refuse(&self, addr: Option<ReplyAddress>, e: WireError, topic: &Bytes) {
        self.dispatcher.record_rejected();
        match addr {
            Some(a) => self.try_send(&a, &e.into(), QoS::AtLeastOnce),
            None => log::warn!(
                topic:% = String::from_utf8_lossy(topic), code:? = e.code;
                "MQTT message refused, no reply address: {}", e.message
            ),
        }
    }

    /// Publishes one request's replies: tokens at QoS 0 (dropped if the link is congested, as QoS 0 may be),
    /// the terminal reply at QoS 1 (queued until the broker is back).
    async fn forward(self: Arc<Self>, mut ticket: Ticket, addr: ReplyAddress, key: String) {
        while let Some(reply) = ticket.replies.recv().await {
            if reply.is_terminal() {
                let (topic, payload, props) = message(&addr, &reply);
                if let Err(e) = self
                    .client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
                    .await
                {
                    log::error!("MQTT: the final reply could not be queued: {e}");
                }
                break;
            }
            self.try_send(&addr, &reply, QoS::AtMostOnce);
        }
        self.in_flight.remove(&key);
    }

    fn try_send(&self, addr: &ReplyAddress, reply: &Reply, qos: QoS) {
        let (topic, payload, props) = message(addr, reply);
        if let Err(e) = self
            .client
            .try_publish_with_properties(topic, qos, false, payload, props)
        {
            log::debug!("MQTT reply dropped: {e}");
        }
    }

    fn publish_status(&self, payload: Vec<u8>) {
        let props = PublishProperties {
            content_type: Some(CONTENT_TYPE.into()),
            ..Default::default()
        };
        let topic = self.cfg.status_topic();
        if let Err(e) =
            self.client
                .try_publish_with_properties(topic, QoS::AtLeastOnce, true, payload, props)
        {
            log::warn!("MQTT status not published: {e}");
        }
    }

    /// Publishes retained Home Assistant discovery configs: a device per board with sensors read from the
    /// retained status, available while the status says `online`.
    fn announce_to_home_assistant(&self) {
        let cfg = &self.cfg;
        let s = self.dispatcher.status(None);
        let device = json!({
            "identifiers": [format!("bitnetd_{}", cfg.node)],
            "name": format!("bitnetd {}", cfg.node),
            "manufacturer": "bitnetd",
            "model": s.model,
            "sw_version": s.version,
        });
        for (object, name, template) in [
            ("state", "State", "{{ value_json.state }}"),
            ("model", "Model", "{{ value_json.model }}"),
            (
                "engine",
                "Engine",
                "{{ 'alive' if value_json.engine_alive else 'stuck' }}",
            ),
        ] {
            let config = json!({
                "name": name,
                "unique_id": format!("bitnetd_{}_{object}", cfg.node),
                "object_id": format!("bitnetd_{}_{object}", cfg.node),
                "state_topic": cfg.status_topic(),
                "value_template": template,
                "availability_topic": cfg.status_topic(),
                "availability_template": "{{ 'online' if value_json.state == 'online' else 'offline' }}",
                "device": device,
            });
            let topic = format!("homeassistant/sensor/{}/{object}/config", cfg.node);
            let props = PublishProperties {
                content_type: Some(CONTENT_TYPE.into()),
                ..Default::default()
            };
            let payload = config.to_string().into_bytes();
            if let Err(e) = self.client.try_publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                true,
                payload,
                props,
            ) {
                log::warn!("MQTT discovery not published: {e}");
            }
        }
    }
}

/// Takes `reply_to` out of a request object (it is MQTT addressing, not part of the shared request format),
/// notes the id, and parses the rest.
fn take_reply_to(mut v: Value, hints: &mut ReplyHints) -> Result<Incoming, WireError> {
    if let Some(obj) = v.as_object_mut() {
        hints.id = match obj.get("id") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        match obj.remove("reply_to") {
            None => {}
            Some(Value::String(t)) => hints.reply_to = Some(t),
            Some(_) => {
                return Err(WireError::new(
                    ErrorCode::BadRequest,
                    "`reply_to` must be a topic string",
                ))
            }
        }
    }
    let id = hints.id.clone();
    protocol::parse_value(v).map_err(|e| match (&e.id, id) {
        (None, Some(id)) => WireError {
            id: Some(json!(id)),
            ..e
        },
        _ => e,
    })
}

/// The topic, payload and properties of one reply.
fn message(addr: &ReplyAddress, reply: &Reply) -> (String, Vec<u8>, PublishProperties) {
    let mut payload = reply.to_line();
    payload.pop();
    let props = PublishProperties {
        content_type: Some(CONTENT_TYPE.into()),
        correlation_data: addr.correlation.clone(),
        payload_format_indicator: Some(1),
        ..Default::default()
    };
    (addr.topic.clone(), payload, props)
}

/// The retained status: online/draining/offline, with the node, model and engine state.
fn status_payload(cfg: &MqttConfig, d: &Dispatcher, state: &str) -> Vec<u8> {
    let s = d.status(None);
    json!({
        "state": state,
        "node": cfg.node,
        "model": s.model,
        "version": s.version,
        "engine_alive": s.engine.alive,
        "budget": match &s.budget {
            Some(b) => json!({
                "memory_bytes": b.state.memory_budget,
                "thermal": b.state.thermal,
                "under_voltage": b.state.under_voltage,
                "memory_pressure": b.state.memory_pressure,
                "local_paused": b.directive.local_paused,
            }),
            None => json!({"memory_bytes": s.memory.budget_bytes}),
        },
        "cloud": s.cloud.as_ref().map_or(json!("disabled"), |c| json!(c.link.state)),
        "deferred_pending": s.cloud.as_ref().map_or(0, |c| c.deferred_pending),
    })
    .to_string()
    .into_bytes()
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}
