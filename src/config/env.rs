//! The environment the configuration reads, captured once so that validation stays a pure function.

use std::collections::HashMap;
use std::path::PathBuf;

/// A snapshot of the environment variables the configuration uses.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: HashMap<&'static str, String>,
    cwd: Option<PathBuf>,
}

impl Env {
    /// Path of the config file when `--config` is not given.
    pub const CONFIG: &'static str = "BITNETD_CONFIG";
    /// Overrides `[model] path`.
    pub const MODEL: &'static str = crate::default_model::MODEL_ENV;
    /// Overrides `[model] threads`.
    pub const THREADS: &'static str = "BITNETD_THREADS";
    /// Overrides `[socket] path`.
    pub const SOCKET: &'static str = "BITNETD_SOCKET";
    /// Overrides `[logging] level`.
    pub const LOG: &'static str = "BITNETD_LOG";
    /// Set by systemd's `RuntimeDirectory=` (several paths are separated by `:`).
    pub const RUNTIME_DIRECTORY: &'static str = "RUNTIME_DIRECTORY";
    pub const XDG_RUNTIME_DIR: &'static str = "XDG_RUNTIME_DIR";
    /// Set by systemd's `StateDirectory=` (several paths are separated by `:`).
    pub const STATE_DIRECTORY: &'static str = "STATE_DIRECTORY";
    pub const XDG_STATE_HOME: &'static str = "XDG_STATE_HOME";

    const ALL: [&'static str; 9] = [
        Env::CONFIG,
        Env::MODEL,
        Env::THREADS,
        Env::SOCKET,
        Env::LOG,
        Env::RUNTIME_DIRECTORY,
        Env::XDG_RUNTIME_DIR,
        Env::STATE_DIRECTORY,
        Env::XDG_STATE_HOME,
    ];

    /// Reads the process environment (unset and empty variables are absent).
    pub fn from_process() -> Env {
        let mut env = Env {
            vars: HashMap::new(),
            cwd: std::env::current_dir().ok(),
        };
        for name in Env::ALL {
            if let Ok(v) = std::env::var(name) {
                env = env.with(name, v);
            }
        }
        env
    }

    /// An empty environment with the given working directory (for tests and tools).
    pub fn empty(cwd: impl Into<PathBuf>) -> Env {
        Env {
            vars: HashMap::new(),
            cwd: Some(cwd.into()),
        }
    }

    /// This environment with `name` set (ignored when `value` is empty, like an unset variable).
    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> Env {
        let value = value.into();
        if !value.is_empty() {
            self.vars.insert(name, value);
        }
        self
    }

    pub fn get(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned()
    }

    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.get(name).map(PathBuf::from)
    }

    /// `bitnetd.sock` in `$RUNTIME_DIRECTORY` (its first entry), else `$XDG_RUNTIME_DIR`, else the working
    /// directory; with the name of where it came from.
    pub fn default_socket_path(&self) -> (PathBuf, &'static str) {
        const NAME: &str = "bitnetd.sock";
        if let Some(dir) = self.get(Env::RUNTIME_DIRECTORY) {
            let first = dir.split(':').next().unwrap_or(&dir).to_string();
            return (PathBuf::from(first).join(NAME), Env::RUNTIME_DIRECTORY);
        }
        if let Some(dir) = self.path(Env::XDG_RUNTIME_DIR) {
            return (dir.join(NAME), Env::XDG_RUNTIME_DIR);
        }
        let cwd = self.cwd.clone().unwrap_or_else(|| PathBuf::from("."));
        (cwd.join(NAME), "the working directory")
    }

    /// Where durable state (the deferred queue) lives: `$STATE_DIRECTORY` (its first entry), else
    /// `$XDG_STATE_HOME/bitnetd`, else `bitnetd-state` in the working directory.
    pub fn default_state_dir(&self) -> PathBuf {
        if let Some(dir) = self.get(Env::STATE_DIRECTORY) {
            return PathBuf::from(dir.split(':').next().unwrap_or(&dir));
        }
        if let Some(dir) = self.path(Env::XDG_STATE_HOME) {
            return dir.join("bitnetd");
        }
        self.cwd
            .clone()
            .unwrap_or_else(|| PathBuf::from("."))
            .join("bitnetd-state")
    }
}
