//! Building the MQTT v5 connection options: client id, keep-alive, credentials, TLS, packet limits, and the
//! retained Last Will that marks the board offline if it vanishes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{MqttConfig, MqttTls};

use super::MqttError;

/// The systemd credential that holds the broker password (`LoadCredential=mqtt-password:...`).
pub const PASSWORD_CREDENTIAL: &str = "mqtt-password";

/// Connection options for `cfg`; `offline` is the Last Will payload for the status topic.
pub fn mqtt_options(cfg: &MqttConfig, offline: &[u8]) -> Result<MqttOptions, MqttError> {
    let mut o = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_clean_start(true);
    o.set_max_packet_size(Some(cfg.max_packet_bytes as u32));
    // Replies are small and latency matters: do not let Nagle's algorithm hold them for a delayed ACK (40 ms).
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    let will_props = LastWillProperties {
        delay_interval: None,
        payload_format_indicator: Some(1),
        message_expiry_interval: None,
        content_type: Some(super::CONTENT_TYPE.into()),
        response_topic: None,
        correlation_data: None,
        user_properties: vec![],
    };
    o.set_last_will(LastWill::new(
        cfg.status_topic(),
        offline.to_vec(),
        QoS::AtLeastOnce,
        true,
        Some(will_props),
    ));
    if let Some(user) = &cfg.username {
        o.set_credentials(user.clone(), password(cfg)?.unwrap_or_default());
    }
    if let Some(tls) = &cfg.tls {
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
            tls_config(tls)?,
        ))));
    }
    Ok(o)
}

/// The broker password: the systemd credential when present, else `password_file`.
fn password(cfg: &MqttConfig) -> Result<Option<String>, MqttError> {
    let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|d| PathBuf::from(d).join(PASSWORD_CREDENTIAL))
        .filter(|p| p.exists());
    let Some(path) = credential.or_else(|| cfg.password_file.clone()) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| MqttError::Credentials {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()))
}

fn tls_config(tls: &MqttTls) -> Result<rustls::ClientConfig, MqttError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    match &tls.ca_file {
        Some(ca) => {
            for cert in certs(ca)? {
                roots.add(cert).map_err(|e| tls_err(ca, e))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            if native.certs.is_empty() {
                return Err(MqttError::Tls(format!(
                    "no system root certificates ({:?}); set [mqtt] ca_file",
                    native.errors
                )));
            }
            roots.add_parsable_certificates(native.certs);
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match &tls.client_auth {
        Some((cert, key)) => {
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(key, e))?;
            builder
                .with_client_auth_cert(certs(cert)?, key)
                .map_err(|e| MqttError::Tls(e.to_string()))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, MqttError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(path, e))?;
    if certs.is_empty() {
        return Err(tls_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn tls_err(path: &Path, e: impl std::fmt::Display) -> MqttError {
    MqttError::Tls(format!("{}: {e}", path.display()))
}
