//! What bitnetd publishes retained: its status (`online`, `draining`, `offline`, with the node, model, engine,
//! budget and cloud state) and the Home Assistant discovery configs that read it. Pure: the network loop
//! publishes what these return.

use serde_json::json;

use crate::config::MqttConfig;
use crate::protocol::Status;

/// The retained status payload for `state`, from the dispatcher's `status`.
pub fn status_payload(cfg: &MqttConfig, s: &Status, state: &str) -> Vec<u8> {
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

/// Home Assistant discovery: a device per board with sensors read from the retained status, available while
/// the status says `online`. Topic and payload of each retained config.
pub fn discovery_configs(cfg: &MqttConfig, s: &Status) -> Vec<(String, Vec<u8>)> {
    let device = json!({
        "identifiers": [format!("bitnetd_{}", cfg.node)],
        "name": format!("bitnetd {}", cfg.node),
        "manufacturer": "bitnetd",
        "model": s.model,
        "sw_version": s.version,
    });
    let sensors = [
        ("state", "State", "{{ value_json.state }}"),
        ("model", "Model", "{{ value_json.model }}"),
        (
            "engine",
            "Engine",
            "{{ 'alive' if value_json.engine_alive else 'stuck' }}",
        ),
    ];
    sensors
        .into_iter()
        .map(|(object, name, template)| {
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
            (topic, config.to_string().into_bytes())
        })
        .collect()
}
