//! The default model shipped in the repository's `models/default` (exported from `models/default-hf`).

use std::path::PathBuf;

/// Environment variable that overrides the model directory.
pub const MODEL_ENV: &str = "BITNETD_MODEL";

/// The model directory to use when none is given: `$BITNETD_MODEL`, else `models/default` next to the crate
/// (development checkout), else the packaged location `/usr/share/bitnetd/models/default`.
pub fn default_model_dir() -> PathBuf {
    if let Some(p) = std::env::var_os(MODEL_ENV) {
        return PathBuf::from(p);
    }
    let dev = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/default");
    if dev.join(crate::meta::META_FILE).exists() {
        return dev;
    }
    PathBuf::from("/usr/share/bitnetd/models/default")
}
