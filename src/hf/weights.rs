//! The tensors of a checkpoint: every `*.safetensors` file in the directory, memory-mapped, read by name.
//! Float tensors (f32, f16, bf16) come out as f32; BitNet linear weights come out as [`TernaryMatrix`].

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::{Architecture, HfError, LinearClass};

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The tensors of one checkpoint directory, by name.
pub struct Weights {
    maps: Vec<(String, Mmap)>,
    index: HashMap<String, Entry>,
}

/// A ternary weight matrix in transformers' orientation: `rows` = out_features, `cols` = in_features,
/// `codes[r * cols + c]` in {-1, 0, 1}; the layer computes `(codes · q) * scale / input_scale`.
pub struct TernaryMatrix {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<i8>,
    /// The factor the integer dot product is multiplied by (after dividing by the activation scale).
    pub scale: f32,
}

impl Weights {
    /// Memory-maps every `*.safetensors` file under `dir` and indexes their tensors.
    pub fn open(dir: &Path) -> Result<Self, HfError> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| HfError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(HfError::Unsupported(format!(
                "no *.safetensors file in {}",
                dir.display()
            )));
        }
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (fi, path) in files.iter().enumerate() {
            let name = path.display().to_string();
            let file = File::open(path).map_err(|e| HfError::io(path, e))?;
            // SAFETY: the checkpoint is read-only input; a concurrent writer would be a user error.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| HfError::io(path, e))?;
            let bad = |m: String| HfError::Safetensors {
                file: name.clone(),
                message: m,
            };
            let st = SafeTensors::deserialize(&map).map_err(|e| bad(e.to_string()))?;
            let base = map.as_ptr() as usize;
            for (tname, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let entry = Entry {
                    file: fi,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + view.data().len(),
                };
                index.insert(tname, entry);
            }
            maps.push((name, map));
        }
        Ok(Weights { maps, index })
    }

    /// True if the checkpoint has a tensor of this name.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<&[usize], HfError> {
        Ok(&self.entry(name)?.shape)
    }

    fn entry(&self, name: &str) -> Result<&Entry, HfError> {
        self.index
            .get(name)
            .ok_or_else(|| HfError::MissingTensor(name.to_string()))
    }

    fn bytes(&self, e: &Entry) -> &[u8] {
        &self.maps[e.file].1[e.start..e.end]
    }

    /// A float tensor (f32, f16 or bf16 on disk) as f32, checked against `shape`.
    pub fn floats(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, HfError> {
        let e = self.entry(name)?;
        if e.shape != shape
            && !(e.shape.iter().product::<usize>() == 1 && shape.iter().product::<usize>() == 1)
        {
            return Err(HfError::bad(
                name,
                format!("shape {:?}, expected {shape:?}", e.shape),
            ));
        }
        let b = self.bytes(e);
        let out = match e.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(HfError::bad(
                    name,
                    format!("dtype {other:?}, expected a float type"),
                ))
            }
        };
        Ok(out)
    }

    /// The ternary weight of the linear layer `prefix` (`prefix.weight`, maybe `prefix.weight_scale`),
    /// with `rows` output and `cols` input features, in any layout transformers loads:
    /// - uint8, 4 values per byte along the output dimension (shape `[rows/4, cols]`), with `weight_scale`;
    /// - float values already in {-1, 0, 1}, with `weight_scale` (offline, unpacked);
    /// - float master weights, ternarized here by absmean exactly as transformers' `WeightQuant` does.
    pub fn ternary(
        &self,
        arch: &Architecture,
        prefix: &str,
        rows: usize,
        cols: usize,
    ) -> Result<TernaryMatrix, HfError> {
        let name = format!("{prefix}.weight");
        let e = self.entry(&name)?;
        let stored_scale = || -> Result<f32, HfError> {
            let s = self.floats(&format!("{prefix}.weight_scale"), &[1])?[0];
            if !(s.is_finite() && s > 0.0) {
                return Err(HfError::bad(
                    &name,
                    format!("weight_scale {s} is not a positive number"),
                ));
            }
            Ok(match arch.linear_class {
                LinearClass::AutoBitLinear => s,
                LinearClass::BitLinear => 1.0 / s,
            })
        };
        if e.dtype == Dtype::U8 {
            if e.shape != [rows / 4, cols] {
                return Err(HfError::bad(
                    &name,
                    format!(
                        "packed shape {:?}, expected {:?}",
                        e.shape,
                        [rows / 4, cols]
                    ),
                ));
            }
            let codes =
                unpack_rows(self.bytes(e), rows, cols).map_err(|m| HfError::bad(&name, m))?;
            return Ok(TernaryMatrix {
                rows,
                cols,
                codes,
                scale: stored_scale()?,
            });
        }
        let w = self.floats(&name, &[rows, cols])?;
        if self.has(&format!("{prefix}.weight_scale")) && !arch.online_quant {
            let codes = w
                .iter()
                .map(|&v| match v {
                    0.0 => Ok(0i8),
                    1.0 => Ok(1),
                    -1.0 => Ok(-1),
                    v => Err(HfError::bad(
                        &name,
                        format!("offline weight has non-ternary value {v}"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(TernaryMatrix {
                rows,
                cols,
                codes,
                scale: stored_scale()?,
            });
        }
        let (codes, scale) = ternarize_absmean(&w);
        Ok(TernaryMatrix {
            rows,
            cols,
            codes,
            scale,
        })
    }
}

/// Unpacks transformers' 2-bit layout: byte `[r, c]` holds rows `r + i*rows/4` (i = 0..4) in bits `2i..2i+2`,
/// each stored as value + 1.
pub fn unpack_rows(packed: &[u8], rows: usize, cols: usize) -> Result<Vec<i8>, String> {
    let block = rows / 4;
    if packed.len() != block * cols {
        return Err(format!(
            "{} packed bytes, expected {}",
            packed.len(),
            block * cols
        ));
    }
    let mut out = vec![0i8; rows * cols];
    for i in 0..4 {
        for r in 0..block {
            let src = &packed[r * cols..(r + 1) * cols];
            let dst = &mut out[(i * block + r) * cols..(i * block + r + 1) * cols];
            for (d, &b) in dst.iter_mut().zip(src) {
                let v = (b >> (2 * i)) & 3;
                if v == 3 {
                    return Err(format!("invalid 2-bit code 3 at row {}", i * block + r));
                }
                *d = v as i8 - 1;
            }
        }
    }
    Ok(out)
}

/// absmean ternarization as transformers' `WeightQuant`: `s = 1 / max(mean|w|, 1e-5)`,
/// `codes = clamp(round_half_even(w * s), -1, 1)`, and the layer scale is `1 / s`.
pub fn ternarize_absmean(w: &[f32]) -> (Vec<i8>, f32) {
    let mean = (w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len().max(1) as f64) as f32;
    let s = 1.0 / mean.max(1e-5);
    let codes = w
        .iter()
        .map(|&v| (v * s).round_ties_even().clamp(-1.0, 1.0) as i8)
        .collect();
    (codes, 1.0 / s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_matches_transformers_docstring_example() {
        // transformers' unpack_weights example: [[0b10100001, 0b00011000], [0b10010000, 0b00001010]]
        let packed = [0b1010_0001u8, 0b0001_1000, 0b1001_0000, 0b0000_1010];
        let w = unpack_rows(&packed, 8, 2).unwrap();
        let expect: [[i8; 2]; 8] = [
            [0, -1],
            [-1, 1],
            [-1, 1],
            [-1, 1],
            [1, 0],
            [0, -1],
            [1, -1],
            [1, -1],
        ];
        assert_eq!(w, expect.iter().flatten().copied().collect::<Vec<_>>());
    }

    #[test]
    fn unpack_rejects_code_three() {
        assert!(unpack_rows(&[0b11], 4, 1).unwrap_err().contains("code 3"));
    }

    #[test]
    fn absmean_rounds_half_to_even_and_clamps() {
        // mean |w| = 1.0 -> s = 1: 0.5 -> 0, 1.5 -> 2 -> clamp 1, -2.5 -> -2 -> clamp -1
        let (codes, scale) = ternarize_absmean(&[0.5, 1.5, -2.5, 0.0, -0.5, 1.0]);
        assert_eq!(codes, vec![0, 1, -1, 0, 0, 1]);
        assert_eq!(scale, 1.0);
    }
}
