//! The `[http]` section: the OpenAI-compatible HTTP API (`crate::http`), raw and validated.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[http]` as the file says it (each option is documented in `defaults.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    pub enabled: bool,
    /// `unix:/path` or `host:port` (an IP address or `localhost`).
    pub listen: Vec<String>,
    /// File holding the key clients send as `Authorization: Bearer <key>`.
    pub api_key_file: Option<PathBuf>,
    /// File mode of a Unix socket bitnetd creates.
    pub mode: u32,
    /// Group of a Unix socket bitnetd creates.
    pub group: Option<String>,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            enabled: false,
            listen: vec!["127.0.0.1:8080".into()],
            api_key_file: None,
            mode: 0o660,
            group: None,
            max_body_bytes: 1 << 20,
            max_in_flight: 16,
        }
    }
}

/// One address to serve HTTP on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpAddress {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl HttpAddress {
    /// Reads `unix:/path` or `host:port`, where host is an IP address (IPv6 in brackets) or `localhost`.
    pub fn parse(s: &str) -> Result<HttpAddress, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: a Unix socket needs an absolute path (unix:/run/...)"
                ));
            }
            return Ok(HttpAddress::Unix(PathBuf::from(path)));
        }
        if let Some(port) = s.strip_prefix("localhost:") {
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
            return Ok(HttpAddress::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        s.parse::<SocketAddr>().map(HttpAddress::Tcp).map_err(|_| {
            format!("{s:?} is neither unix:/path nor host:port with an IP address or localhost")
        })
    }

    /// True for a TCP address other clients on the network can reach (anything but loopback); such an address
    /// needs an API key.
    pub fn is_exposed(&self) -> bool {
        match self {
            HttpAddress::Unix(_) => false,
            HttpAddress::Tcp(a) => !match a.ip() {
                IpAddr::V4(ip) => ip.is_loopback(),
                IpAddr::V6(ip) => {
                    ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v| v.is_loopback())
                }
            },
        }
    }
}

impl std::fmt::Display for HttpAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            HttpAddress::Tcp(a) => write!(f, "http://{a}"),
        }
    }
}

/// The validated `[http]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub enabled: bool,
    /// At least one when enabled; no duplicates.
    pub listen: Vec<HttpAddress>,
    pub api_key_file: Option<PathBuf>,
    /// Permission bits (at most 0o777).
    pub mode: u32,
    pub group: Option<String>,
    /// At least 1024.
    pub max_body_bytes: usize,
    /// At least 1.
    pub max_in_flight: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        validate_http(&RawHttp::default(), &|k, m| ConfigError::Invalid {
            file: None,
            line: None,
            key: k.into(),
            message: m,
        })
        .expect("the defaults are valid")
    }
}

/// Validates `[http]`. Whether an exposed address has a key is checked when the daemon starts, since a
/// systemd credential can provide it.
pub(super) fn validate_http(
    raw: &RawHttp,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<HttpConfig, ConfigError> {
    let mut listen = Vec::new();
    for s in &raw.listen {
        let a = HttpAddress::parse(s.trim()).map_err(|m| invalid("http.listen", m))?;
        if listen.contains(&a) {
            return Err(invalid("http.listen", format!("{s:?} is listed twice")));
        }
        listen.push(a);
    }
    if raw.enabled && listen.is_empty() {
        return Err(invalid(
            "http.listen",
            "is empty: give at least one address, or set enabled = false".into(),
        ));
    }
    if raw.mode > 0o777 {
        return Err(invalid(
            "http.mode",
            format!("{:#o} is not a permission mode (at most 0o777)", raw.mode),
        ));
    }
    if raw.group.as_deref() == Some("") {
        return Err(invalid("http.group", "must not be empty (omit it)".into()));
    }
    if raw.max_body_bytes < 1024 {
        return Err(invalid(
            "http.max_body_bytes",
            format!("{} is below the minimum of 1024", raw.max_body_bytes),
        ));
    }
    if raw.max_in_flight == 0 {
        return Err(invalid("http.max_in_flight", "must be at least 1".into()));
    }
    Ok(HttpConfig {
        enabled: raw.enabled,
        listen,
        api_key_file: raw.api_key_file.clone(),
        mode: raw.mode,
        group: raw.group.clone(),
        max_body_bytes: raw.max_body_bytes,
        max_in_flight: raw.max_in_flight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_only_loopback_tcp_is_private() {
        let p = |s| HttpAddress::parse(s).unwrap();
        assert_eq!(
            p("unix:/run/b.sock"),
            HttpAddress::Unix("/run/b.sock".into())
        );
        assert!(!p("unix:/run/b.sock").is_exposed());
        assert!(!p("127.0.0.1:8080").is_exposed());
        assert!(!p("localhost:8080").is_exposed());
        assert!(!p("[::1]:8080").is_exposed());
        assert!(p("0.0.0.0:8080").is_exposed());
        assert!(p("192.168.1.4:80").is_exposed());
        assert!(p("[::]:8080").is_exposed());
        for bad in [
            "unix:rel.sock",
            "example.com:80",
            "127.0.0.1",
            "localhost:x",
            "",
        ] {
            assert!(HttpAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn invalid_sections_name_their_key() {
        let invalid = |k: &str, m: String| ConfigError::Invalid {
            file: None,
            line: None,
            key: k.into(),
            message: m,
        };
        let key = |raw: RawHttp| match validate_http(&raw, &invalid) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        let base = RawHttp::default();
        assert_eq!(
            key(RawHttp {
                enabled: true,
                listen: vec![],
                ..base.clone()
            }),
            "http.listen"
        );
        assert_eq!(
            key(RawHttp {
                listen: vec!["127.0.0.1:1".into(), "127.0.0.1:1".into()],
                ..base.clone()
            }),
            "http.listen"
        );
        assert_eq!(
            key(RawHttp {
                mode: 0o1777,
                ..base.clone()
            }),
            "http.mode"
        );
        assert_eq!(
            key(RawHttp {
                max_body_bytes: 10,
                ..base.clone()
            }),
            "http.max_body_bytes"
        );
        assert_eq!(
            key(RawHttp {
                max_in_flight: 0,
                ..base
            }),
            "http.max_in_flight"
        );
        assert!(!HttpConfig::default().enabled);
    }
}
