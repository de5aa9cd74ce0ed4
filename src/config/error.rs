use std::fmt;
use std::path::PathBuf;

/// A configuration that cannot be used. The message names the file, line, and key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {}: {message}", path.display())]
    Read { path: PathBuf, message: String },
    /// Not TOML, an unknown key, or a wrong type.
    #[error("{}: {message}", Location(file, *line, *column))]
    Parse {
        file: Option<PathBuf>,
        /// 1-based; 0 when unknown.
        line: usize,
        column: usize,
        message: String,
    },
    /// A value out of range or inconsistent with the rest.
    #[error("{}: {key}: {message}", Location(file, line.unwrap_or(0), 0))]
    Invalid {
        file: Option<PathBuf>,
        line: Option<usize>,
        key: String,
        message: String,
    },
    /// A bad environment override.
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
}

impl ConfigError {
    /// The dotted key at fault, for `Invalid`.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The 1-based line at fault, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Parse { line, .. } if *line > 0 => Some(*line),
            ConfigError::Invalid { line, .. } => *line,
            _ => None,
        }
    }
}

struct Location<'a>(&'a Option<PathBuf>, usize, usize);

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Location(file, line, column) = self;
        match file {
            Some(p) => write!(f, "{}", p.display())?,
            None => write!(f, "config")?,
        }
        if *line > 0 {
            write!(f, ":{line}")?;
            if *column > 0 {
                write!(f, ":{column}")?;
            }
        }
        Ok(())
    }
}
