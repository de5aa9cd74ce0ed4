//! Logging: structured records (request id, route, timings as key-values) to journald when systemd connected
//! stderr to the journal, else to stderr. Prompts and answers are only logged at trace level.

use log::{Log, Metadata, Record};
use systemd_journal_logger::JournalLog;

use crate::config::{LogTarget, LoggingConfig};

/// tract's warning about opset 23 being newer than it tested is noise for our own exported graphs, and its
/// kernel probes at info level are noise in a service log.
const QUIET: &str = "tract_onnx::model=error,tract_linalg=warn";

/// Where logs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    Journald,
    Stderr,
}

/// Installs the global logger. Call once, early in `main`.
pub fn init(cfg: &LoggingConfig) -> Result<Installed, String> {
    let spec = if cfg.filter.contains("tract") {
        cfg.filter.clone()
    } else {
        format!("{},{QUIET}", cfg.filter)
    };
    let journald = match cfg.target {
        LogTarget::Journald => true,
        LogTarget::Stderr => false,
        LogTarget::Auto => systemd_journal_logger::connected_to_journal(),
    };
    if journald {
        let filter = env_filter::Builder::new().parse(&spec).build();
        let journal = JournalLog::new()
            .map_err(|e| format!("connecting to journald: {e}"))?
            .with_syslog_identifier("bitnetd".into());
        let max = filter.filter();
        log::set_boxed_logger(Box::new(Filtered { filter, journal })).map_err(|e| e.to_string())?;
        log::set_max_level(max);
        return Ok(Installed::Journald);
    }
    env_logger::Builder::new()
        .parse_filters(&spec)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(Installed::Stderr)
}

/// The journald logger behind an env_logger-style filter.
struct Filtered {
    filter: env_filter::Filter,
    journal: JournalLog,
}

impl Log for Filtered {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if self.filter.matches(record) {
            self.journal.log(record);
        }
    }

    fn flush(&self) {}
}
