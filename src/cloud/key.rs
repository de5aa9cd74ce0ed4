//! The Kimi API key: where it comes from, and a type that cannot leak it. `Debug` and `Display` print
//! `ApiKey(<redacted>)`; the only way to the text is [`ApiKey::expose`], used once, for the HTTP header.

use std::fmt;
use std::path::{Path, PathBuf};

/// The credential name under systemd's `LoadCredential=` / `LoadCredentialEncrypted=`.
pub const CREDENTIAL_NAME: &str = "kimi-api-key";
/// Environment variables read, in this order, when no credential or file gives a key.
pub const ENV_VARS: [&str; 2] = ["KIMI_API_KEY", "MOONSHOT_API_KEY"];

/// A secret API key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// The key text, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Where the key was found (logged at startup instead of the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Credential(PathBuf),
    File(PathBuf),
    Env(&'static str),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Credential(p) => write!(f, "systemd credential {}", p.display()),
            KeySource::File(p) => write!(f, "file {}", p.display()),
            KeySource::Env(v) => write!(f, "${v}"),
        }
    }
}

/// A key file that exists but cannot be used. The message names the file, never its contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("API key file {path}: {message}")]
pub struct KeyError {
    pub path: PathBuf,
    pub message: String,
}

/// Finds the key, in order: `$CREDENTIALS_DIRECTORY/kimi-api-key`, `api_key_file`, `$KIMI_API_KEY`,
/// `$MOONSHOT_API_KEY`. `Ok(None)`: there is none, and the cloud is off. A configured `api_key_file` that
/// cannot be read, or any empty key, is an error rather than a silent fallback.
pub fn find(
    credentials_dir: Option<&Path>,
    api_key_file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(ApiKey, KeySource)>, KeyError> {
    if let Some(found) = find_secret(CREDENTIAL_NAME, credentials_dir, api_key_file)? {
        return Ok(Some(found));
    }
    for var in ENV_VARS {
        if let Some(v) = env(var) {
            let v = v.trim();
            if !v.is_empty() {
                return Ok(Some((ApiKey(v.to_string()), KeySource::Env(var))));
            }
        }
    }
    Ok(None)
}

/// Finds a secret in the systemd credential `credential` under `credentials_dir`, else in `file`; `Ok(None)`
/// when neither is there. A file given but unreadable or empty is an error.
pub fn find_secret(
    credential: &str,
    credentials_dir: Option<&Path>,
    file: Option<&Path>,
) -> Result<Option<(ApiKey, KeySource)>, KeyError> {
    if let Some(dir) = credentials_dir {
        let p = dir.join(credential);
        if p.exists() {
            return read(&p).map(|k| Some((k, KeySource::Credential(p))));
        }
    }
    match file {
        Some(p) => read(p).map(|k| Some((k, KeySource::File(p.to_path_buf())))),
        None => Ok(None),
    }
}

impl ApiKey {
    /// True when `offered` is this key. The SHA-256 digests are compared, not the texts: how long a wrong
    /// key takes to refuse says nothing about how much of it was right.
    pub fn matches(&self, offered: &[u8]) -> bool {
        use ring::digest::{digest, SHA256};
        digest(&SHA256, self.0.as_bytes()).as_ref() == digest(&SHA256, offered).as_ref()
    }
}

fn read(path: &Path) -> Result<ApiKey, KeyError> {
    let err = |message: String| KeyError {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(err("it is empty".into()));
    }
    if key.contains(char::is_whitespace) || key.chars().any(|c| c.is_control()) {
        return Err(err(
            "it holds more than one word (expected the key alone)".into()
        ));
    }
    Ok(ApiKey(key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_credential_wins_over_the_file_and_the_environment() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(CREDENTIAL_NAME), "sk-cred\n").unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, "sk-file").unwrap();
        let env = |_: &str| Some("sk-env".to_string());
        let (k, src) = find(Some(d.path()), Some(&file), &env).unwrap().unwrap();
        assert_eq!(k.expose(), "sk-cred");
        assert!(matches!(src, KeySource::Credential(_)));
        let (k, _) = find(None, Some(&file), &env).unwrap().unwrap();
        assert_eq!(k.expose(), "sk-file");
    }

    #[test]
    fn the_environment_is_read_in_order() {
        let env = |v: &str| (v == "MOONSHOT_API_KEY").then(|| " sk-m ".to_string());
        let (k, src) = find(None, None, &env).unwrap().unwrap();
        assert_eq!(
            (k.expose(), src),
            ("sk-m", KeySource::Env("MOONSHOT_API_KEY"))
        );
        assert_eq!(find(None, None, &no_env).unwrap(), None);
    }

    #[test]
    fn a_bad_key_file_is_an_error_that_does_not_show_the_key() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("k");
        std::fs::write(&file, "sk-secret extra").unwrap();
        let e = find(None, Some(&file), &no_env).unwrap_err();
        assert!(!e.to_string().contains("sk-secret"), "{e}");
        std::fs::write(&file, "  \n").unwrap();
        assert!(find(None, Some(&file), &no_env).is_err());
        assert!(find(None, Some(&d.path().join("missing")), &no_env).is_err());
    }

    #[test]
    fn debug_output_is_redacted() {
        let k = ApiKey("sk-secret".into());
        assert_eq!(format!("{k:?}"), "ApiKey(<redacted>)");
    }
}
