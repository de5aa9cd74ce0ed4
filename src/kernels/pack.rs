//! The 2-bit packed ternary layout, shared by the exporter (which writes it into the ONNX file), the tract op and
//! every kernel.
//!
//! A matrix of `rows × cols` ternary weights is stored row by row (one row per output feature). Each row is cut in
//! blocks of [`BLOCK`] = 128 columns, [`BLOCK_BYTES`] = 32 bytes each; the last block is padded with zero weights.
//! Byte `j` (0..32) of block `b` holds, at bits `2i..2i+2` (i = 0..4), the code of column `128 b + 32 i + j`.
//! The code of a weight `w ∈ {-1, 0, 1}` is `w + 1`; code 3 never occurs.
//!
//! So one 32-byte load, shifted by 0, 2, 4, 6 and masked, gives four vectors of codes that line up with four
//! consecutive 32-byte (or eight 16-byte) slices of the activations: no shuffles on any target. Products use the
//! codes directly, `dot(w, x) = dot(code, x) - sum(x)`, which saves a subtraction per vector.

use std::fmt;

/// Columns per block.
pub const BLOCK: usize = 128;
/// Bytes per block.
pub const BLOCK_BYTES: usize = BLOCK / 4;

/// Errors building packed weights.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PackError {
    #[error("packed ternary weights: {len} bytes do not make {rows} rows of {cols} columns ({expected} bytes)")]
    Length {
        rows: usize,
        cols: usize,
        len: usize,
        expected: usize,
    },
    #[error("ternary weight {value} at row {row}, column {col} is not -1, 0 or 1")]
    NotTernary { row: usize, col: usize, value: i8 },
    #[error("packed ternary weights hold the invalid code 3 at row {row}")]
    BadCode { row: usize },
}

/// Blocks per row for `cols` columns.
pub fn blocks(cols: usize) -> usize {
    cols.div_ceil(BLOCK)
}

/// Bytes of a packed `rows × cols` matrix.
pub fn packed_len(rows: usize, cols: usize) -> usize {
    rows * blocks(cols) * BLOCK_BYTES
}

/// Packs row-major ternary values (`rows × cols`, each -1, 0 or 1).
pub fn pack(values: &[i8], rows: usize, cols: usize) -> Result<Vec<u8>, PackError> {
    assert_eq!(values.len(), rows * cols, "values must be rows × cols");
    let nb = blocks(cols);
    // Code 1 (weight 0) in every slot, so padding needs no special case.
    let mut out = vec![0b0101_0101u8; rows * nb * BLOCK_BYTES];
    for r in 0..rows {
        let row = &values[r * cols..(r + 1) * cols];
        let dst = &mut out[r * nb * BLOCK_BYTES..(r + 1) * nb * BLOCK_BYTES];
        for (c, &v) in row.iter().enumerate() {
            if !(-1..=1).contains(&v) {
                return Err(PackError::NotTernary {
                    row: r,
                    col: c,
                    value: v,
                });
            }
            let (b, within) = (c / BLOCK, c % BLOCK);
            let (i, j) = (within / 32, within % 32);
            let byte = &mut dst[b * BLOCK_BYTES + j];
            *byte = (*byte & !(3 << (2 * i))) | (((v + 1) as u8) << (2 * i));
        }
    }
    Ok(out)
}

/// The weight at (`row`, `col`) of a packed matrix with `cols` columns.
pub fn get(packed: &[u8], cols: usize, row: usize, col: usize) -> i8 {
    let nb = blocks(cols);
    let (b, within) = (col / BLOCK, col % BLOCK);
    let (i, j) = (within / 32, within % 32);
    let byte = packed[row * nb * BLOCK_BYTES + b * BLOCK_BYTES + j];
    ((byte >> (2 * i)) & 3) as i8 - 1
}

/// A packed ternary matrix, borrowed: `rows` output features of `cols` inputs.
#[derive(Clone, Copy)]
pub struct TernaryWeights<'a> {
    data: &'a [u8],
    rows: usize,
    cols: usize,
}

impl<'a> TernaryWeights<'a> {
    /// Checks the length of `data` against the shape. Code 3 is checked by [`TernaryWeights::validate_codes`],
    /// separately, because it reads every byte.
    pub fn new(data: &'a [u8], rows: usize, cols: usize) -> Result<Self, PackError> {
        let expected = packed_len(rows, cols);
        if data.len() != expected {
            return Err(PackError::Length {
                rows,
                cols,
                len: data.len(),
                expected,
            });
        }
        Ok(TernaryWeights { data, rows, cols })
    }

    /// Fails on the first row holding code 3 (not a ternary value).
    pub fn validate_codes(&self) -> Result<(), PackError> {
        let row_bytes = self.row_bytes();
        for (r, row) in self.data.chunks(row_bytes.max(1)).enumerate() {
            // A byte has a code 3 in some slot iff both bits of that slot are set.
            if row.iter().any(|&b| b & (b >> 1) & 0b0101_0101 != 0) {
                return Err(PackError::BadCode { row: r });
            }
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        blocks(self.cols)
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.blocks() * BLOCK_BYTES
    }

    /// The packed bytes of row `r`.
    pub fn row(&self, r: usize) -> &'a [u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }
}

impl fmt::Debug for TernaryWeights<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TernaryWeights({}×{})", self.rows, self.cols)
    }
}
