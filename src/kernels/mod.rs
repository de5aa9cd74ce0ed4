//! Integer matrix products for BitNet: int8 activations against 2-bit packed ternary weights, and against int8
//! or 4-bit grouped weights ([`int4`]) for the quantized output layer.
//!
//! Decoding is bound by memory bandwidth, so weights stay packed in memory and are unpacked in registers. One
//! packed layout ([`pack`]) serves every target; each target has its own inner loops:
//! - [`Kernel::Scalar`]: portable, the reference the others are tested against;
//! - [`Kernel::Avx2`]: x86_64 with AVX2 (`vpmaddubsw`/`vpmaddwd`);
//! - [`Kernel::Avx512Vnni`]: x86_64 with AVX-512 VNNI (`vpdpbusd` on 256-bit vectors) for the ternary product;
//!   its int8 product is the AVX2 one;
//! - [`Kernel::Neon`]: aarch64 without the dot-product extension (Pi 4, Cortex-A72): `smull`/`smlal`/`sadalp`.
//!   It never executes `sdot`, which raises SIGILL there;
//! - [`Kernel::NeonDot`]: aarch64 with `dotprod` (Pi 5, Cortex-A76): `sdot`.
//!
//! [`Kernel::detect`] picks the best one at run time. [`ternary_rows`] and [`int8_rows`] compute a range of
//! output rows on the calling thread (the engine's ops split the rows across their team) and, for several
//! activation rows (prefill), reuse each unpacked weight block for up to [`M_TILE`] of them; where the registers
//! allow (VNNI, both NEON kernels), two weight rows share each activation load, a 2 × 4 tile.
//!
//! [`planes`] splits int8 weights into two 4-bit planes with one kernel for both ([`Kernel::nibble_dot`]), for
//! the screened output layer.
//!
//! Beside the products: [`act`] (RMSNorm and per-token int8 quantization, the linears' prologue), [`attention`]
//! (online softmax over blocks of keys), [`f16`] (the KV cache's conversions).

pub mod act;
pub mod attention;
pub mod f16;
pub mod int4;
mod matmul;
pub mod pack;
pub mod planes;
mod scalar;

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;

pub use int4::int4_rows;
pub use matmul::{f32_rows, int8_matmul, int8_rows, ternary_matmul, ternary_rows, MatmulError};
pub use pack::{PackError, TernaryWeights, BLOCK, BLOCK_BYTES};

/// Activation rows computed together against one pass over a weight row.
pub const M_TILE: usize = 4;

/// An implementation of the inner products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    Avx2,
    Avx512Vnni,
    Neon,
    NeonDot,
}

impl Kernel {
    /// Every kernel, whether or not this CPU runs it.
    pub const ALL: [Kernel; 5] = [
        Kernel::Scalar,
        Kernel::Avx2,
        Kernel::Avx512Vnni,
        Kernel::Neon,
        Kernel::NeonDot,
    ];

    /// The fastest kernel this CPU runs.
    pub fn detect() -> Kernel {
        *Kernel::available()
            .last()
            .expect("scalar is always available")
    }

    /// The kernel named by `BITNETD_KERNEL` if set (an error if unknown or not supported by this CPU), else
    /// [`Kernel::detect`]. Benchmarks and tests use the variable to compare kernels end to end.
    pub fn from_env() -> Result<Kernel, String> {
        match std::env::var("BITNETD_KERNEL") {
            Ok(name) if !name.is_empty() => {
                let k = Kernel::ALL
                    .into_iter()
                    .find(|k| k.name() == name)
                    .ok_or_else(|| format!("BITNETD_KERNEL={name}: unknown kernel"))?;
                if k.is_supported() {
                    Ok(k)
                } else {
                    Err(format!("BITNETD_KERNEL={name}: not supported by this CPU"))
                }
            }
            _ => Ok(Kernel::detect()),
        }
    }

    /// The kernels this CPU runs, slowest first.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_supported())
            .collect()
    }

    /// Whether this CPU can run the kernel.
    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => {
                std::arch::is_aarch64_feature_detected!("neon")
                    && std::arch::is_aarch64_feature_detected!("dotprod")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Whether [`Kernel::ternary_dot2`] has a two-row tile of its own (otherwise it runs the rows one by one).
    pub(crate) fn pairs_rows(self) -> bool {
        matches!(self, Kernel::Avx512Vnni | Kernel::Neon | Kernel::NeonDot)
    }

    /// The name used in logs, `status` and `BITNETD_KERNEL`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Vnni => "avx512-vnni",
            Kernel::Neon => "neon",
            Kernel::NeonDot => "neon-dotprod",
        }
    }

    /// `dot(codes, x)` of one packed ternary row (`blocks` blocks) against `M` activation rows padded to
    /// `blocks * BLOCK` (padding zero). The caller turns codes into weights by subtracting `sum(x)`.
    ///
    /// Panics if a slice is shorter than `blocks` needs.
    ///
    /// # Safety
    /// The kernel must be supported by this CPU ([`Kernel::is_supported`]).
    #[inline]
    pub(crate) unsafe fn ternary_dot<const M: usize>(
        self,
        w: &[u8],
        xs: [&[i8]; M],
        blocks: usize,
    ) -> [i32; M] {
        assert!(w.len() >= blocks * BLOCK_BYTES);
        assert!(xs.iter().all(|x| x.len() >= blocks * BLOCK));
        // One activation row (decode) has kernels of its own where the tiled ones would be latency-bound.
        #[cfg_attr(
            not(any(target_arch = "x86_64", target_arch = "aarch64")),
            allow(unused_variables)
        )]
        let one = |r: i32| {
            let mut out = [0i32; M];
            out[0] = r;
            out
        };
        match self {
            Kernel::Scalar => scalar::ternary_dot(w, xs, blocks),
            // SAFETY: lengths checked above, CPU support is the caller's contract.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::ternary_dot_avx2(w, xs, blocks) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni if M == 1 => {
                one(unsafe { x86::ternary_dot1_vnni(w, xs[0], blocks) })
            }
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon if M == 1 => one(unsafe { neon::ternary_dot1(w, xs[0], blocks) }),
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot if M == 1 => one(unsafe { neon::ternary_dot1_sdot(w, xs[0], blocks) }),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { x86::ternary_dot_vnni(w, xs, blocks) },
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => unsafe { neon::ternary_dot(w, xs, blocks) },
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => unsafe { neon::ternary_dot_sdot(w, xs, blocks) },
            #[allow(unreachable_patterns)]
            _ => unreachable!("kernel {} is not built for this target", self.name()),
        }
    }

    /// [`Kernel::ternary_dot`] of two packed rows against the same `M` activation rows: each activation vector
    /// is loaded once for both rows (prefill, where the product is compute-bound). Kernels without the registers
    /// for a two-row tile (scalar, AVX2) compute the rows one after the other.
    ///
    /// # Safety
    /// As [`Kernel::ternary_dot`].
    #[inline]
    pub(crate) unsafe fn ternary_dot2<const M: usize>(
        self,
        w: [&[u8]; 2],
        xs: [&[i8]; M],
        blocks: usize,
    ) -> [[i32; M]; 2] {
        assert!(w.iter().all(|w| w.len() >= blocks * BLOCK_BYTES));
        assert!(xs.iter().all(|x| x.len() >= blocks * BLOCK));
        match self {
            // SAFETY: lengths checked above, CPU support is the caller's contract.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => unsafe { x86::ternary_dot2_vnni(w, xs, blocks) },
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => unsafe { neon::ternary_dot2(w, xs, blocks) },
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => unsafe { neon::ternary_dot2_sdot(w, xs, blocks) },
            _ => unsafe {
                [
                    self.ternary_dot(w[0], xs, blocks),
                    self.ternary_dot(w[1], xs, blocks),
                ]
            },
        }
    }

    /// `dot(w, x)` of one int8 row against `M` activation rows of the same length.
    ///
    /// # Safety
    /// The kernel must be supported by this CPU ([`Kernel::is_supported`]).
    #[inline]
    pub(crate) unsafe fn int8_dot<const M: usize>(self, w: &[i8], xs: [&[i8]; M]) -> [i32; M] {
        assert!(xs.iter().all(|x| x.len() == w.len()));
        match self {
            Kernel::Scalar => scalar::int8_dot(w, xs),
            // SAFETY: as in `ternary_dot`.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Avx512Vnni => unsafe { x86::int8_dot_avx2(w, xs) },
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => unsafe { neon::int8_dot(w, xs) },
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => unsafe { neon::int8_dot_sdot(w, xs) },
            #[allow(unreachable_patterns)]
            _ => unreachable!("kernel {} is not built for this target", self.name()),
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
