//! `bitnetd check-config`'s look at the cloud: whether a key is found, and, when the cloud answers, whether
//! the account offers a model for `[cloud] model` (the daemon would otherwise keep its cloud route off).

use std::sync::Arc;

use super::key::{self, KeyError};
use super::models::Choice;
use super::{Connectivity, KimiClient};
use crate::config::CloudConfig;

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudCheck {
    /// The cloud route is off (disabled, or no key); the text says which.
    Off(&'static str),
    /// The cloud did not answer: the model is checked by the daemon once it does.
    Unreachable(String),
    /// Requests would go to this model.
    Chosen(String),
    /// The account offers no model for the setting: the daemon would keep the cloud off.
    Problem(String),
}

/// Finds the key the daemon would use (credentials directory, `api_key_file`, environment).
pub fn find_key(c: &CloudConfig) -> Result<Option<(key::ApiKey, key::KeySource)>, KeyError> {
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
    key::find(creds.as_deref(), c.api_key_file.as_deref(), &|v| {
        std::env::var(v).ok()
    })
}

/// Runs the check: one `GET /models` within `[cloud] probe_timeout_ms`. Blocking (its own small runtime).
pub fn check(c: &CloudConfig) -> Result<CloudCheck, KeyError> {
    if !c.enabled {
        return Ok(CloudCheck::Off("disabled in the configuration"));
    }
    let Some((api_key, _)) = find_key(c)? else {
        return Ok(CloudCheck::Off("no API key found"));
    };
    let client = match KimiClient::new(c, api_key, Arc::new(Connectivity::new())) {
        Ok(k) => k,
        Err(e) => return Ok(CloudCheck::Unreachable(e.message)),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    Ok(match rt.block_on(client.list_models(c.probe_timeout)) {
        Err(e) => CloudCheck::Unreachable(format!("{} ({})", e.message, e.cause.as_str())),
        Ok(models) => match client.apply_listing(&models) {
            Choice::Chosen(id) => CloudCheck::Chosen(id),
            other => CloudCheck::Problem(other.problem(&models).unwrap_or_default()),
        },
    })
}
