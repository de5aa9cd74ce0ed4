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
                "power_level": b.state.power_level,
                "on_battery": b.power.on_battery,
                "battery_percent": b.power.battery_percent.map(f32::round),
                // To a tenth of a watt: the retained status is published again only when it changes.
                "watts": b.power.watts.map(|w| (w * 10.0).round() / 10.0),
                "threads": b.directive.threads,
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
    // (object, name, template, device class and unit for numeric sensors)
    let sensors = [
        ("state", "State", "{{ value_json.state }}", None),
        ("model", "Model", "{{ value_json.model }}", None),
        (
            "engine",
            "Engine",
            "{{ 'alive' if value_json.engine_alive else 'stuck' }}",
            None,
        ),
        (
            "battery",
            "Battery",
            "{{ value_json.budget.battery_percent }}",
            Some(("battery", "%")),
        ),
        (
            "power",
            "Power",
            "{{ value_json.budget.watts }}",
            Some(("power", "W")),
        ),
    ];
    let has_battery = s
        .budget
        .as_ref()
        .is_some_and(|b| b.power.battery_percent.is_some());
    let has_power = s.budget.as_ref().is_some_and(|b| b.power.watts.is_some());
    sensors
        .into_iter()
        .filter(|(object, ..)| match *object {
            "battery" => has_battery,
            "power" => has_power,
            _ => true,
        })
        .map(|(object, name, template, class)| {
            let mut config = json!({
                "name": name,
                "unique_id": format!("bitnetd_{}_{object}", cfg.node),
                "object_id": format!("bitnetd_{}_{object}", cfg.node),
                "state_topic": cfg.status_topic(),
                "value_template": template,
                "availability_topic": cfg.status_topic(),
                "availability_template": "{{ 'online' if value_json.state == 'online' else 'offline' }}",
                "device": device,
            });
            if let Some((class, unit)) = class {
                config["device_class"] = json!(class);
                config["unit_of_measurement"] = json!(unit);
                config["state_class"] = json!("measurement");
            }
            let topic = format!("homeassistant/sensor/{}/{object}/config", cfg.node);
            (topic, config.to_string().into_bytes())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(power: serde_json::Value) -> Status {
        serde_json::from_value(json!({
            "version": "0.1.0", "model": "m", "state": "ready", "uptime_s": 1.0,
            "engine": {"alive": true, "slots": 1, "running": 0, "queue_depth": 0, "threads": 2, "kernel": "neon"},
            "requests": {"accepted": 0, "served": 0, "failed": 0, "rejected": 0, "deferred": 0, "in_flight": 0,
                         "tokens_generated": 0, "routes": {}, "fallbacks": {}},
            "tokens_per_s": null, "ttft_ms": null,
            "memory": {"rss_bytes": null, "rss_before_model_bytes": null, "budget_bytes": 1},
            "latency": {"local": {"ttft_ms": null, "tokens_per_s": null},
                        "cloud": {"ttft_ms": null, "tokens_per_s": null}},
            "budget": {"thermal": "normal", "under_voltage": false, "memory_pressure": false, "memory_budget": 1,
                       "cgroup_limited": false, "power_level": "economy", "power_threads": 2,
                       "temperature_c": null, "rss_bytes": null, "mem_available_bytes": null, "power": power,
                       "directive": {"threads": 1, "local_paused": false, "admit_local": true,
                                     "retry_after_ms": null, "prefill_chunk": 64, "max_new_tokens": 64,
                                     "free_caches": false, "prefer_cloud": true, "battery_critical": false}},
            "cloud": null
        }))
        .unwrap()
    }

    fn mqtt() -> MqttConfig {
        let env = crate::config::Env::empty("/");
        crate::config::Config::from_toml("[mqtt]\nnode = \"pi-1\"\n", None, &env)
            .unwrap()
            .mqtt
            .unwrap()
    }

    #[test]
    fn the_status_carries_the_power_level_battery_and_draw() {
        let s = status(
            json!({"on_battery": true, "battery_percent": 17.4, "battery_status": "Discharging",
                              "battery_critical": false, "watts": 6.04, "sensors": []}),
        );
        let v: serde_json::Value =
            serde_json::from_slice(&status_payload(&mqtt(), &s, "online")).unwrap();
        let b = &v["budget"];
        assert_eq!(b["power_level"], "economy");
        assert_eq!(
            (b["on_battery"].as_bool(), b["battery_percent"].as_f64()),
            (Some(true), Some(17.0))
        );
        assert_eq!(
            (b["watts"].as_f64(), b["threads"].as_u64()),
            (Some(6.0), Some(1))
        );
    }

    #[test]
    fn home_assistant_gets_battery_and_power_sensors_only_where_the_board_has_them() {
        let objects = |s: &Status| -> Vec<String> {
            discovery_configs(&mqtt(), s)
                .into_iter()
                .map(|(t, _)| t.split('/').nth(3).unwrap().to_string())
                .collect()
        };
        let mains = status(
            json!({"on_battery": null, "battery_percent": null, "battery_status": null,
                                  "battery_critical": false, "watts": null, "sensors": []}),
        );
        assert_eq!(objects(&mains), ["state", "model", "engine"]);
        let ups = status(
            json!({"on_battery": true, "battery_percent": 50.0, "battery_status": "Discharging",
                                "battery_critical": false, "watts": 4.0, "sensors": []}),
        );
        assert_eq!(
            objects(&ups),
            ["state", "model", "engine", "battery", "power"]
        );
        let (_, battery) = &discovery_configs(&mqtt(), &ups)[3];
        let battery: serde_json::Value = serde_json::from_slice(battery).unwrap();
        assert_eq!(
            (
                battery["device_class"].as_str(),
                battery["unit_of_measurement"].as_str()
            ),
            (Some("battery"), Some("%"))
        );
    }
}
