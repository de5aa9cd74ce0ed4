//! Real MQTT brokers for the tests: Mosquitto from Debian (as on a Pi), started on a free loopback port, and
//! rumqttd embedded in the test process (always available). Plus a small synchronous test client.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};

/// A loopback port nothing listens on now and that this test process has not handed out before (the kernel may
/// give a just-released port to the next `bind(0)`, and two brokers of one test binary must not collide).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A running broker.
pub struct Broker {
    /// Port for MQTT v5 clients.
    pub port: u16,
    /// Port for MQTT 3.1.1 clients (the same on Mosquitto).
    pub port_v4: u16,
    pub kind: &'static str,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Broker {
    /// Mosquitto on a free port, or `None` when it is not installed (a failure under `CI=true`, see
    /// [`super::have_tool`]).
    pub fn mosquitto() -> Option<Broker> {
        Broker::mosquitto_on(free_port())
    }

    /// Mosquitto on `port` (to restart it where it was).
    pub fn mosquitto_on(port: u16) -> Option<Broker> {
        Broker::mosquitto_with(port, "")
    }

    /// Mosquitto on `port`, with more configuration (such as a second listener) after the first listener.
    pub fn mosquitto_with(port: u16, extra: &str) -> Option<Broker> {
        let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(exe) = exe else {
            // Fails under CI=true; says it is skipped elsewhere.
            super::have_tool("mosquitto", &["-h"]);
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        // Started as root, Mosquitto drops to its own user, which cannot read the test's temporary files.
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root\n"
        } else {
            ""
        };
        std::fs::write(
            &conf,
            format!(
                "{user}allow_anonymous true\npersistence false\nlistener {port} 127.0.0.1\n{extra}"
            ),
        )
        .unwrap();
        let child = Command::new(exe)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port);
        Some(Broker {
            port,
            port_v4: port,
            kind: "mosquitto",
            child: Some(child),
            _dir: Some(dir),
        })
    }

    /// rumqttd in this process (it lives until the test process ends). A port taken by another process between
    /// choosing it and rumqttd's bind only shows in rumqttd's log, so a broker that does not come up is replaced
    /// by one on new ports.
    pub fn rumqttd() -> Broker {
        for _ in 0..4 {
            if let Some(b) = Broker::try_rumqttd() {
                return b;
            }
        }
        panic!("rumqttd did not start on four pairs of free ports");
    }

    fn try_rumqttd() -> Option<Broker> {
        let (port, port_v4) = (free_port(), free_port());
        let server = |name: &str, p: u16| {
            format!(
                "name = \"{name}\"\nlisten = \"127.0.0.1:{p}\"\nnext_connection_delay_ms = 1\n\
                 [{name}.connections]\nconnection_timeout_ms = 60000\nmax_payload_size = 1048576\n\
                 max_inflight_count = 200\ndynamic_filters = true\n"
            )
        };
        let text = format!(
            "id = 0\n[router]\nid = 0\nmax_connections = 100\nmax_outgoing_packet_count = 200\n\
             max_segment_size = 10485760\nmax_segment_count = 10\n\
             [v5.1]\n{}\n[v4.1]\n{}",
            server("v5.1", port),
            server("v4.1", port_v4)
        );
        let config: rumqttd::Config = toml::from_str(&text).expect("rumqttd config");
        std::thread::spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let _ = broker.start();
        });
        if !(port_is_up(port) && port_is_up(port_v4)) {
            return None;
        }
        Some(Broker {
            port,
            port_v4,
            kind: "rumqttd",
            child: None,
            _dir: None,
        })
    }

    /// Stops a Mosquitto broker (SIGKILL, as a crash).
    pub fn kill(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The `[mqtt]` section for a daemon on this broker.
    pub fn daemon_config(&self, node: &str, extra: &str) -> String {
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nnode = \"{node}\"\nreconnect_min_ms = 50\n\
             reconnect_max_ms = 400\n{extra}",
            self.port
        )
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for_port(port: u16) {
    assert!(port_is_up(port), "broker on {port} did not start");
}

/// Whether something accepts connections on `port` within 10 s.
fn port_is_up(port: u16) -> bool {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// One received message.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub qos: QoS,
    pub props: Option<PublishProperties>,
}

impl Msg {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| panic!("{e}: {:?}", self.payload))
    }
}

/// A v5 test client: subscribe, publish, receive.
pub struct V5 {
    pub client: Client,
    rx: Receiver<Msg>,
    /// One message per SubAck received.
    subacks: Receiver<()>,
}

impl V5 {
    pub fn connect(port: u16, id: &str) -> V5 {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(Some(4 << 20));
        let (client, mut conn) = Client::new(o, 1000);
        let (tx, rx) = channel();
        let (ready_tx, ready_rx) = channel();
        let (suback_tx, subacks) = channel();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = suback_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let m = Msg {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                            qos: p.qos,
                            props: p.properties,
                        };
                        if tx.send(m).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("connected");
        V5 {
            client,
            rx,
            subacks,
        }
    }

    /// Subscribes and waits for the broker's SubAck: from then on, messages on `filter` reach this client.
    pub fn subscribe(&self, filter: &str) {
        self.client.subscribe(filter, QoS::AtLeastOnce).unwrap();
        self.subacks
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no SubAck for {filter} within 10 s"));
    }

    pub fn publish(&self, topic: &str, payload: &[u8], props: PublishProperties) {
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_vec(), props)
            .unwrap();
    }

    /// The next message, or `None` after `wait`.
    pub fn next(&self, wait: Duration) -> Option<Msg> {
        self.rx.recv_timeout(wait).ok()
    }

    /// The next message on `topic` (others are skipped), panicking after `wait`.
    pub fn expect_on(&self, topic: &str, wait: Duration) -> Msg {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self
                .next(left)
                .unwrap_or_else(|| panic!("nothing on {topic}"));
            if m.topic == topic {
                return m;
            }
        }
    }

    /// Waits for the retained status of `prefix` to say `state`.
    pub fn wait_status(&self, prefix: &str, state: &str, wait: Duration) -> serde_json::Value {
        let topic = format!("{prefix}/status");
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self
                .next(left)
                .unwrap_or_else(|| panic!("no status {state} on {topic}"));
            if m.topic == topic && m.json()["state"] == state {
                return m.json();
            }
        }
    }

    /// Reads the replies on `topic` for request `id` until the terminal one: (token texts, terminal, messages).
    pub fn answer(
        &self,
        topic: &str,
        id: &serde_json::Value,
        wait: Duration,
    ) -> (Vec<String>, Msg) {
        let mut tokens = vec![];
        loop {
            let m = self.expect_on(topic, wait);
            let v = m.json();
            if &v["id"] != id {
                continue;
            }
            if v["type"] == "token" {
                tokens.push(v["text"].as_str().unwrap().to_string());
            } else {
                return (tokens, m);
            }
        }
    }
}
