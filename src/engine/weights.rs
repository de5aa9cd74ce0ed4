//! The large weights of a model (packed ternary matrices, the output layer, the embedding table), read in place
//! from the model's external data file instead of being copied into tensors.
//!
//! tract's ONNX loader copies every initializer into memory. Before it parses the graph, the loader
//! (`engine::prepare`) takes the big initializers of bitnetd's ops out of it and leaves on each node where its
//! weights are in the data file; the op then asks [`Weights::open`] for them. Two ways to hold them:
//! - [`WeightResidency::Mapped`]: the file is memory-mapped, so a weight page is resident only once touched and
//!   stays clean page cache the kernel can reclaim under pressure instead of killing the process; loading copies
//!   nothing and peaks at nothing.
//! - [`WeightResidency::Loaded`]: the bytes are read into anonymous memory (transparent huge pages where the kernel
//!   offers them: fewer TLB misses when a decode step streams every weight).
//!
//! The embedding table is read a row at a time from the file ([`Weights::rows`]): one row per token, so none of
//! it is resident in the process (a mapping would keep every touched page, and the kernel's fault-around maps
//! 64 KiB around each); the page cache keeps what is read often.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use std::os::unix::fs::FileExt;

use memmap2::{Advice, Mmap, MmapMut};

/// How the weights of the products are held (the embedding table is read by rows, see [`Weights::rows`]).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum WeightResidency {
    /// Memory-mapped from the data file: resident when touched, reclaimable page cache.
    Mapped,
    /// Read into anonymous memory at load.
    #[default]
    Loaded,
}

impl WeightResidency {
    pub fn name(self) -> &'static str {
        match self {
            WeightResidency::Mapped => "mapped",
            WeightResidency::Loaded => "loaded",
        }
    }

    pub fn parse(name: &str) -> Option<WeightResidency> {
        [WeightResidency::Mapped, WeightResidency::Loaded]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// Errors opening weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: bytes {offset}..{end} are past the end of the file ({size} bytes)")]
    OutOfFile {
        path: String,
        offset: usize,
        end: usize,
        size: usize,
    },
    #[error("{path}: weights at offset {offset} are not aligned to {align} bytes")]
    Misaligned {
        path: String,
        offset: usize,
        align: usize,
    },
}

enum Bytes {
    Mapped {
        file: Arc<Mmap>,
        offset: usize,
    },
    Loaded(MmapMut),
    /// Read on demand with `pread`.
    File {
        file: File,
        offset: usize,
    },
}

/// One weight tensor's bytes.
pub struct Weights {
    bytes: Bytes,
    len: usize,
    path: PathBuf,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weights({} bytes of {})", self.len, self.path.display())
    }
}

/// Mappings shared by every op reading the same file.
fn mappings() -> &'static Mutex<HashMap<PathBuf, Weak<Mmap>>> {
    static MAPS: OnceLock<Mutex<HashMap<PathBuf, Weak<Mmap>>>> = OnceLock::new();
    MAPS.get_or_init(Default::default)
}

fn map_file(path: &Path) -> Result<Arc<Mmap>, WeightsError> {
    let io = |source| WeightsError::Io {
        path: path.display().to_string(),
        source,
    };
    let key = path.canonicalize().map_err(io)?;
    let mut maps = mappings().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = maps.get(&key).and_then(Weak::upgrade) {
        return Ok(m);
    }
    let file = File::open(&key).map_err(io)?;
    // SAFETY: the model's data file is read-only for the daemon; a file changed underneath a running daemon would
    // change weights (as with any memory-mapped model), it cannot make this process read out of bounds.
    let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(io)?);
    maps.insert(key, Arc::downgrade(&map));
    Ok(map)
}

impl Weights {
    /// `len` bytes at `offset` of the file at `path`, aligned to `align` bytes, held as `residency` says.
    pub fn open(
        path: &Path,
        offset: usize,
        len: usize,
        align: usize,
        residency: WeightResidency,
    ) -> Result<Arc<Weights>, WeightsError> {
        let map = map_file(path)?;
        let p = || path.display().to_string();
        let end = offset.saturating_add(len);
        if end > map.len() {
            return Err(WeightsError::OutOfFile {
                path: p(),
                offset,
                end,
                size: map.len(),
            });
        }
        if !offset.is_multiple_of(align.max(1)) {
            return Err(WeightsError::Misaligned {
                path: p(),
                offset,
                align,
            });
        }
        let bytes = match residency {
            WeightResidency::Mapped => {
                // Start reading it from storage now; pages arrive while the rest loads.
                let _ = map.advise_range(Advice::WillNeed, offset, len);
                Bytes::Mapped { file: map, offset }
            }
            WeightResidency::Loaded => {
                drop(map);
                let mut anon = MmapMut::map_anon(len.max(1))
                    .map_err(|source| WeightsError::Io { path: p(), source })?;
                let _ = anon.advise(Advice::HugePage);
                // `pread` rather than a copy from the mapping: the file's pages never count in this process.
                let file =
                    File::open(path).map_err(|source| WeightsError::Io { path: p(), source })?;
                file.read_exact_at(&mut anon[..len], offset as u64)
                    .map_err(|source| WeightsError::Io { path: p(), source })?;
                Bytes::Loaded(anon)
            }
        };
        Ok(Arc::new(Weights {
            bytes,
            len,
            path: path.to_path_buf(),
        }))
    }

    /// `len` bytes at `offset` of the file at `path`, read with `pread` when asked for ([`Weights::read_at`]):
    /// nothing is held in memory.
    pub fn rows(path: &Path, offset: usize, len: usize) -> Result<Arc<Weights>, WeightsError> {
        let io = |source| WeightsError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len() as usize;
        let end = offset.saturating_add(len);
        if end > size {
            return Err(WeightsError::OutOfFile {
                path: path.display().to_string(),
                offset,
                end,
                size,
            });
        }
        Ok(Arc::new(Weights {
            bytes: Bytes::File { file, offset },
            len,
            path: path.to_path_buf(),
        }))
    }

    /// `len` zero bytes of anonymous memory (transparent huge pages where the kernel offers them), for weights
    /// derived at load from the file's (see [`Weights::bytes_mut`]).
    pub fn anonymous(len: usize) -> std::io::Result<Weights> {
        let anon = MmapMut::map_anon(len.max(1))?;
        let _ = anon.advise(Advice::HugePage);
        Ok(Weights {
            bytes: Bytes::Loaded(anon),
            len,
            path: PathBuf::from("<derived>"),
        })
    }

    /// The bytes of anonymous weights, to fill them before they are shared; `None` for file-backed ones.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.bytes {
            Bytes::Loaded(m) => Some(&mut m[..self.len]),
            _ => None,
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `buf` from byte `at` of the weights (panics past their end).
    pub fn read_at(&self, at: usize, buf: &mut [u8]) -> std::io::Result<()> {
        assert!(at + buf.len() <= self.len, "read past the weights");
        match &self.bytes {
            Bytes::File { file, offset } => file.read_exact_at(buf, (offset + at) as u64),
            _ => {
                buf.copy_from_slice(&self.bytes()[at..at + buf.len()]);
                Ok(())
            }
        }
    }

    /// The bytes (empty for weights read by rows).
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped { file, offset } => &file[*offset..*offset + self.len],
            Bytes::Loaded(m) => &m[..self.len],
            Bytes::File { .. } => &[],
        }
    }

    /// The bytes as `i8`.
    pub fn as_i8(&self) -> &[i8] {
        let b = self.bytes();
        // SAFETY: i8 and u8 have the same size and alignment and every bit pattern is valid.
        unsafe { std::slice::from_raw_parts(b.as_ptr() as *const i8, b.len()) }
    }

    /// The bytes as `u16` (f16 bit patterns); `None` if misaligned or of odd length.
    pub fn as_u16(&self) -> Option<&[u16]> {
        cast(self.bytes())
    }

    /// The bytes as `f32`; `None` if misaligned or not a whole number of values.
    pub fn as_f32(&self) -> Option<&[f32]> {
        cast(self.bytes())
    }

    /// Whether the bytes are file-backed.
    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, Bytes::Mapped { .. })
    }
}

fn cast<T: Copy>(b: &[u8]) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    if !(b.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
        || !b.len().is_multiple_of(size)
    {
        return None;
    }
    // SAFETY: aligned, whole values, and f32/u16 accept every bit pattern.
    Some(unsafe { std::slice::from_raw_parts(b.as_ptr() as *const T, b.len() / size) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_read_in_place_or_loaded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let mut bytes = vec![7u8; 64];
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(&path, &bytes).unwrap();
        for residency in [WeightResidency::Mapped, WeightResidency::Loaded] {
            let w = Weights::open(&path, 64, 4000, 64, residency).unwrap();
            assert_eq!(w.as_f32().unwrap(), &values[..]);
            assert_eq!(w.is_mapped(), residency == WeightResidency::Mapped);
        }
        let rows = Weights::rows(&path, 64, 4000).unwrap();
        assert!(rows.bytes().is_empty() && !rows.is_mapped());
        let mut b = [0u8; 8];
        rows.read_at(3992, &mut b).unwrap();
        assert_eq!(b[4..], 499.5f32.to_le_bytes());
        assert!(Weights::rows(&path, 64, 4001).is_err());
        let w = Weights::open(&path, 0, 64, 1, WeightResidency::Mapped).unwrap();
        assert_eq!(w.bytes(), &[7u8; 64][..]);
        assert!(matches!(
            Weights::open(&path, 64, 4001, 64, WeightResidency::Mapped),
            Err(WeightsError::OutOfFile { .. })
        ));
        assert!(matches!(
            Weights::open(&path, 2, 8, 4, WeightResidency::Mapped),
            Err(WeightsError::Misaligned { .. })
        ));
        assert!(Weights::open(
            &dir.path().join("missing"),
            0,
            1,
            1,
            WeightResidency::Mapped
        )
        .is_err());
    }
}
