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
use crate::dispatch::{Dispatcher, Origin};
use crate::errors::{Refusal, Scope};
use crate::handler::{Handled, Handler, Replies};
use crate::protocol::{self, id_text, Command, Id, Incoming, ParseError, Reply, WireError};

use super::addressing::{
    backoff, from_hex, hex, reply_address, request_key, Dedup, ReplyAddress, ReplyHints,
};
use super::clients::{client_of, ClientRates};
use super::options::mqtt_options;
use super::status::{discovery_configs, status_payload};
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
    /// Requests by reply address and id; `[mqtt] max_in_flight` for all clients together.
    handler: Handler<String>,
}

impl Mqtt {
    /// Checks the TLS files and credentials and prepares the connection (nothing is sent yet).
    pub fn new(
        cfg: MqttConfig,
        dispatcher: Arc<Dispatcher>,
        deliveries: Option<(Arc<DeferredQueue>, Deliver)>,
    ) -> Result<Mqtt, MqttError> {
        let offline = status_payload(&cfg, &dispatcher.status(None), "offline");
        let opts = mqtt_options(&cfg, &offline)?;
        let (client, events) = AsyncClient::new(opts, CLIENT_QUEUE);
        Ok(Mqtt {
            shared: Arc::new(Shared {
                handler: Handler::new(dispatcher.clone(), cfg.max_in_flight, Scope::Mqtt),
                cfg,
                client,
                dispatcher,
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
        let mut rates = cfg.client_requests_per_minute.map(ClientRates::new);
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
                            shared.handle(p, &mut dedup, rates.as_mut()).await;
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
                            shared.handler.cancel_all();
                            return;
                        }
                    }
                },
                _ = status_tick.tick(), if connected && !stopping => {
                    let now = shared.status_payload("online");
                    if published_status.as_ref() != Some(&now) {
                        shared.publish_status(now.clone());
                        published_status = Some(now);
                    }
                }
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    let _ = shared.client.try_unsubscribe(cfg.request_filter());
                    if connected {
                        shared.publish_status(shared.status_payload("draining"));
                    }
                }
                Some(r) = next_delivery(&mut deliveries), if connected && !stopping => {
                    shared.deliver(&r, queue.as_deref()).await;
                }
                // Every terminal reply queued for the broker.
                _ = shared.handler.finished(), if stopping => break,
            }
        }
        shared.publish_status(shared.status_payload("offline"));
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

    /// Handles one incoming message. Never waits for inference: replies to control messages and refusals are
    /// queued with `try_publish`.
    async fn handle(&self, p: Publish, dedup: &mut Dedup, rates: Option<&mut ClientRates>) {
        let received = Instant::now();
        let props = p.properties.unwrap_or_default();
        let user_properties = props.user_properties;
        let mut hints = ReplyHints {
            response_topic: props.response_topic,
            correlation: props.correlation_data,
            ..Default::default()
        };
        let parsed = if p.payload.len() > self.cfg.max_payload_bytes {
            Err(Refusal::PayloadTooLarge {
                size: p.payload.len(),
                limit: self.cfg.max_payload_bytes,
            }
            .into())
        } else {
            protocol::parse_json(&p.payload)
                .and_then(|v| take_reply_to(v, &mut hints))
                .map_err(WireError::from)
        };
        let Some(addr) = reply_address(&self.cfg.topic_prefix, &hints) else {
            return self.unaddressed(parsed, &p.topic);
        };
        let to = Publisher {
            client: self.client.clone(),
            addr,
        };
        let key = match &parsed {
            Ok(Incoming::Request(req)) => {
                let key = to.key(&req.id);
                // Still running, or seen lately: a redelivery (QoS 1), answered once by the first delivery.
                if self.handler.is_in_flight(&key) || !dedup.first_time(&key, received) {
                    log::info!(id:% = req.id; "MQTT redelivery of a request already taken: ignored");
                    return;
                }
                let client = client_of(&user_properties, &to.addr.topic);
                if let Some(Err(wait)) = rates.map(|r| r.check(&client, received)) {
                    dedup.forget(&key);
                    log::warn!(client = client.as_str(), wait_ms = wait.as_millis() as u64;
                        "MQTT client over its request rate: busy");
                    let per_minute = self.cfg.client_requests_per_minute.unwrap_or_default();
                    let e = WireError::from(Refusal::ClientRate { per_minute, wait });
                    self.dispatcher.record_rejected("mqtt", e.code);
                    return to.answer(e.with_id(&req.id).into()).await;
                }
                Some(key)
            }
            _ => None,
        };
        let origin = Origin {
            source: "mqtt",
            received,
            start_by: props
                .message_expiry_interval
                .map(|s| received + Duration::from_secs(s.into())),
            reply_to: ReplyTo::Mqtt {
                topic: to.addr.topic.clone(),
                correlation: to.addr.correlation.as_ref().map(|c| hex(c)),
            },
        };
        let handled = self.handler.handle(parsed, origin, to).await;
        if let (Some(key), Handled::Refused) = (key, handled) {
            // Refused, not taken: a redelivery may try again.
            dedup.forget(&key);
        }
    }

    /// A message with nowhere to answer: logged (and counted when refused), never run.
    fn unaddressed(&self, parsed: Result<Incoming, WireError>, topic: &Bytes) {
        let topic = String::from_utf8_lossy(topic);
        match parsed {
            Err(e) => {
                self.dispatcher.record_rejected("mqtt", e.code);
                log::warn!(topic:% = topic, code = e.code.as_str();
                    "MQTT message refused, no reply address: {}", e.message);
            }
            Ok(Incoming::Request(_)) => {
                log::warn!(topic:% = topic; "MQTT request without a reply address")
            }
            Ok(Incoming::Command { id, cmd }) => {
                if id.is_none() && cmd == Command::Result {
                    self.dispatcher
                        .record_rejected("mqtt", WireError::from(Refusal::ResultNeedsId).code);
                }
                log::warn!(topic:% = topic, cmd:? = cmd; "MQTT command without a reply address")
            }
            Ok(Incoming::Cancel { .. }) => {}
        }
    }

    fn status_payload(&self, state: &str) -> Vec<u8> {
        status_payload(&self.cfg, &self.dispatcher.status(None), state)
    }

    fn publish_status(&self, payload: Vec<u8>) {
        self.publish_retained(self.cfg.status_topic(), payload, "status");
    }

    fn announce_to_home_assistant(&self) {
        for (topic, payload) in discovery_configs(&self.cfg, &self.dispatcher.status(None)) {
            self.publish_retained(topic, payload, "discovery");
        }
    }

    fn publish_retained(&self, topic: String, payload: Vec<u8>, what: &str) {
        let props = PublishProperties {
            content_type: Some(CONTENT_TYPE.into()),
            ..Default::default()
        };
        let r =
            self.client
                .try_publish_with_properties(topic, QoS::AtLeastOnce, true, payload, props);
        if let Err(e) = r {
            log::warn!("MQTT {what} not published: {e}");
        }
    }
}

/// One message's reply address, as the handler's [`Replies`]: tokens go out at QoS 0 (dropped if the link is
/// congested, as QoS 0 may be), every other reply at QoS 1 (queued until the broker is back).
struct Publisher {
    client: AsyncClient,
    addr: ReplyAddress,
}

impl Publisher {
    fn try_send(&self, reply: &Reply, qos: QoS) {
        let (topic, payload, props) = message(&self.addr, reply);
        let r = self
            .client
            .try_publish_with_properties(topic, qos, false, payload, props);
        if let Err(e) = r {
            log::debug!("MQTT reply dropped: {e}");
        }
    }
}

impl Replies for Publisher {
    type Key = String;

    fn key(&self, id: &Id) -> String {
        request_key(&self.addr, &id_text(id))
    }

    async fn answer(&self, reply: Reply) {
        self.try_send(&reply, QoS::AtLeastOnce)
    }

    async fn forward(&self, reply: Reply) -> bool {
        if !reply.is_terminal() {
            self.try_send(&reply, QoS::AtMostOnce);
            return true;
        }
        let (topic, payload, props) = message(&self.addr, &reply);
        let r = self
            .client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
            .await;
        if let Err(e) = r {
            log::error!("MQTT: the final reply could not be queued: {e}");
        }
        true
    }
}

/// Takes `reply_to` out of a request object (it is MQTT addressing, not part of the shared request format),
/// notes the id, and parses the rest.
fn take_reply_to(mut v: Value, hints: &mut ReplyHints) -> Result<Incoming, ParseError> {
    if let Some(obj) = v.as_object_mut() {
        hints.id = obj
            .get("id")
            .filter(|id| id.is_string() || id.is_number())
            .map(id_text);
        match obj.remove("reply_to") {
            None => {}
            Some(Value::String(t)) => hints.reply_to = Some(t),
            Some(_) => return Err(ParseError::new("`reply_to` must be a topic string")),
        }
    }
    let id = hints.id.clone();
    protocol::parse_value(v).map_err(|e| match (&e.id, id) {
        (None, Some(id)) => ParseError {
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

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
}
