use super::raw::RawConfig;
use super::*;

fn env() -> Env {
    Env::empty("/work")
}

fn err(text: &str) -> ConfigError {
    Config::from_toml(text, Some(Path::new("bitnetd.toml")), &env()).unwrap_err()
}

/// The template with every `# key = value` and `# [section]` line uncommented.
fn uncommented_template() -> String {
    DEFAULTS_TOML
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| !k.contains(' ')) =>
            {
                rest
            }
            Some(rest) if rest.starts_with('[') && rest.ends_with(']') => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn keys(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    if let serde_json::Value::Object(m) = v {
        for (k, v) in m {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_object() {
                keys(v, &key, out);
            } else {
                out.push(key);
            }
        }
    }
}

#[test]
fn the_printed_defaults_are_the_defaults() {
    let parsed: RawConfig = toml::from_str(DEFAULTS_TOML).unwrap();
    assert_eq!(parsed, RawConfig::default());
}

#[test]
fn every_option_is_documented_in_the_printed_defaults() {
    // The commented-out examples must be real keys, and every key must appear in the template.
    let all: RawConfig = toml::from_str(&uncommented_template()).unwrap();
    assert!(all.model.path.is_some() && all.model.threads.is_some() && all.socket.group.is_some());
    // Commented-out values of options that have a default are that default.
    let (m, d) = (all.mqtt.clone().unwrap(), raw::RawMqtt::default());
    assert_eq!(
        (
            m.host,
            m.keep_alive_secs,
            m.tls,
            m.max_payload_bytes,
            m.max_packet_bytes
        ),
        (
            d.host,
            d.keep_alive_secs,
            d.tls,
            d.max_payload_bytes,
            d.max_packet_bytes
        )
    );
    assert_eq!(
        (
            m.max_in_flight,
            m.reconnect_min_ms,
            m.reconnect_max_ms,
            m.home_assistant
        ),
        (
            d.max_in_flight,
            d.reconnect_min_ms,
            d.reconnect_max_ms,
            d.home_assistant
        )
    );
    let mut names = vec![];
    let every_section = RawConfig {
        mqtt: Some(Default::default()),
        ..Default::default()
    };
    keys(
        &serde_json::to_value(every_section).unwrap(),
        "",
        &mut names,
    );
    let template = uncommented_template();
    for key in names {
        let leaf = key.rsplit('.').next().unwrap();
        assert!(
            template
                .lines()
                .any(|l| l.starts_with(&format!("{leaf} = "))),
            "{key} is not documented in defaults.toml"
        );
    }
}

#[test]
fn no_file_gives_the_defaults() {
    let c = Config::from_toml("", None, &env()).unwrap();
    assert_eq!(c.engine.slots, 1);
    assert_eq!(c.engine.queue, 8);
    assert_eq!(c.budget.memory_bytes, 4 << 30);
    assert_eq!(c.budget.default_deadline, None);
    assert_eq!(c.socket.mode, 0o660);
    assert_eq!(c.socket.max_line_bytes, 1 << 20);
    assert_eq!(c.socket.path, PathBuf::from("/work/bitnetd.sock"));
    assert!(c.model.threads >= 1);
    assert_eq!(c.logging.target, LogTarget::Auto);
}

#[test]
fn socket_path_prefers_runtime_directory_then_xdg() {
    let e = env().with(Env::XDG_RUNTIME_DIR, "/run/user/1000");
    let c = Config::from_toml("", None, &e).unwrap();
    assert_eq!(c.socket.path, PathBuf::from("/run/user/1000/bitnetd.sock"));
    let e = e.with(Env::RUNTIME_DIRECTORY, "/run/bitnetd:/run/other");
    let c = Config::from_toml("", None, &e).unwrap();
    assert_eq!(c.socket.path, PathBuf::from("/run/bitnetd/bitnetd.sock"));
    let c = Config::from_toml("[socket]\npath = \"/tmp/x.sock\"\n", None, &e).unwrap();
    assert_eq!(c.socket.path, PathBuf::from("/tmp/x.sock"));
}

#[test]
fn environment_overrides_the_file() {
    let e = env()
        .with(Env::MODEL, "/models/2b")
        .with(Env::THREADS, "3")
        .with(Env::SOCKET, "/tmp/s.sock")
        .with(Env::LOG, "debug");
    let text = "[model]\npath = \"/models/small\"\nthreads = 1\n[logging]\nlevel = \"warn\"\n";
    let c = Config::from_toml(text, None, &e).unwrap();
    assert_eq!(c.model.path, PathBuf::from("/models/2b"));
    assert_eq!(c.model.threads, 3);
    assert_eq!(c.socket.path, PathBuf::from("/tmp/s.sock"));
    assert_eq!(c.logging.filter, "debug");
    let bad = Config::from_toml("", None, &env().with(Env::THREADS, "many")).unwrap_err();
    assert!(
        matches!(
            bad,
            ConfigError::Env {
                var: "BITNETD_THREADS",
                ..
            }
        ),
        "{bad}"
    );
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let e = err("[engine]\nslots = 1\nslotz = 2\n");
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(e.to_string().contains("unknown field `slotz`"), "{e}");
    assert!(e.to_string().starts_with("bitnetd.toml:3"), "{e}");
    let e = err("[mqttt]\nhost = \"x\"\n");
    assert_eq!(e.line(), Some(1), "{e}");
}

#[test]
fn wrong_types_are_named_with_their_line() {
    let e = err("[engine]\n\nqueue = \"eight\"\n");
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(e.to_string().contains("invalid type"), "{e}");
    let e = err("[socket]\nenabled = 1\n");
    assert_eq!(e.line(), Some(2), "{e}");
    let e = err("not toml at all");
    assert_eq!(e.line(), Some(1), "{e}");
}

#[test]
fn impossible_values_are_named_with_key_and_line() {
    for (text, key, line) in [
        ("[model]\nthreads = 0\n", "model.threads", 2),
        ("[engine]\nslots = 0\n", "engine.slots", 2),
        (
            "[engine]\nqueue = 1\ndefault_max_tokens = 0\n",
            "engine.default_max_tokens",
            3,
        ),
        ("[socket]\nmode = 0o1777\n", "socket.mode", 2),
        (
            "[socket]\nmax_line_bytes = 10\n",
            "socket.max_line_bytes",
            2,
        ),
        (
            "[budget]\nmemory_bytes = \"1M\"\n",
            "budget.memory_bytes",
            2,
        ),
        (
            "[budget]\nmemory_bytes = \"4Q\"\n",
            "budget.memory_bytes",
            2,
        ),
        ("[logging]\nlevel = \"loud\"\n", "logging.level", 2),
        (
            "[budget]\nsoft_temp_c = 80.0\nhard_temp_c = 70.0\n",
            "budget.hard_temp_c",
            3,
        ),
        ("[budget]\nsample_ms = 1\n", "budget.sample_ms", 2),
        ("[logging]\n\ntarget = \"syslog\"\n", "logging.target", 3),
    ] {
        let e = err(text);
        assert_eq!(e.key(), Some(key), "{text}: {e}");
        assert_eq!(e.line(), Some(line), "{text}: {e}");
        assert!(e.to_string().contains(key), "{e}");
    }
}

#[test]
fn negative_numbers_are_type_errors_not_panics() {
    let e = err("[engine]\nslots = -1\n");
    assert_eq!(e.line(), Some(2), "{e}");
}

#[test]
fn log_filters_accept_levels_and_module_directives() {
    assert!(check_filter("info").is_ok());
    assert!(check_filter("warn,bitnetd::server=debug").is_ok());
    assert!(check_filter("bitnetd::server").is_ok());
    assert!(check_filter("inof").is_err());
    assert!(check_filter("bitnetd=lots").is_err());
}

#[test]
fn mqtt_is_off_without_its_section_and_derives_names_from_the_node() {
    assert!(Config::from_toml("", None, &env()).unwrap().mqtt.is_none());
    let c = Config::from_toml("[mqtt]\nnode = \"pi-1\"\n", None, &env()).unwrap();
    let m = c.mqtt.unwrap();
    assert_eq!((m.host.as_str(), m.port), ("localhost", 1883));
    assert_eq!(m.client_id, "bitnetd-pi-1");
    assert_eq!(m.topic_prefix, "bitnetd/pi-1");
    assert_eq!(m.request_filter(), "bitnetd/pi-1/request");
    let c = Config::from_toml(
        "[mqtt]\ntls = true\nshared_group = \"g\"\ntopic_prefix = \"fleet/ai\"\n",
        None,
        &env(),
    )
    .unwrap();
    let m = c.mqtt.unwrap();
    assert_eq!(m.port, 8883);
    assert_eq!(m.request_filter(), "$share/g/fleet/ai/request");
}

#[test]
fn bad_mqtt_values_are_named() {
    for (text, key) in [
        ("[mqtt]\ntopic_prefix = \"a/#\"\n", "mqtt.topic_prefix"),
        ("[mqtt]\ntopic_prefix = \"a/\"\n", "mqtt.topic_prefix"),
        ("[mqtt]\nshared_group = \"a/b\"\n", "mqtt.shared_group"),
        ("[mqtt]\nport = 0\n", "mqtt.port"),
        (
            "[mqtt]\nclient_cert_file = \"/x.pem\"\n",
            "mqtt.client_cert_file",
        ),
        (
            "[mqtt]\nmax_payload_bytes = 2000000\n",
            "mqtt.max_payload_bytes",
        ),
        ("[mqtt]\nmax_in_flight = 0\n", "mqtt.max_in_flight"),
        (
            "[mqtt]\nreconnect_min_ms = 5000\nreconnect_max_ms = 100\n",
            "mqtt.reconnect_max_ms",
        ),
    ] {
        let e = err(text);
        assert_eq!(e.key(), Some(key), "{text}: {e}");
        assert_eq!(e.line(), Some(2).max(e.line()), "{e}");
    }
}
