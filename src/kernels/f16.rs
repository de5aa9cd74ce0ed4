//! IEEE half-precision conversion of whole slices, for the f16 KV cache: F16C on x86_64, `fcvtl`/`fcvtn` on
//! aarch64 (base ARMv8, so the Pi 4's Cortex-A72 has them too), and the `half` crate elsewhere. Every path
//! rounds f32 to f16 to nearest, ties to even, and so gives the same bits.

/// `dst[i] = f32(src[i])` for f16 bit patterns in `src`.
pub fn to_f32(src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: F16C detected; lengths checked.
        return unsafe { x86::to_f32(src, dst) };
    }
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: NEON and the conversions are part of every aarch64 CPU; lengths checked.
        return unsafe { arm::to_f32(src, dst) };
    }
    #[allow(unreachable_code)]
    scalar_to_f32(src, dst)
}

/// `dst[i] = f16(src[i])` (round to nearest, ties to even), as bit patterns.
pub fn from_f32(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: F16C detected; lengths checked.
        return unsafe { x86::from_f32(src, dst) };
    }
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: as in `to_f32`.
        return unsafe { arm::from_f32(src, dst) };
    }
    #[allow(unreachable_code)]
    scalar_from_f32(src, dst)
}

fn scalar_to_f32(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_bits(s).to_f32();
    }
}

fn scalar_from_f32(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(s).to_bits();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// F16C must be available; `src.len() == dst.len()`.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn to_f32(src: &[u16], dst: &mut [f32]) {
        let n = src.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= len for both slices.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        super::scalar_to_f32(&src[n..], &mut dst[n..]);
    }

    /// # Safety
    /// F16C must be available; `src.len() == dst.len()`.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn from_f32(src: &[f32], dst: &mut [u16]) {
        let n = src.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= len for both slices. Immediate 0: round to nearest even.
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<0>(v);
                _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            }
        }
        super::scalar_from_f32(&src[n..], &mut dst[n..]);
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod arm {
    use std::arch::aarch64::*;
    use std::arch::asm;

    /// Eight f16 bit patterns as two vectors of four f32 (`fcvtl`/`fcvtl2`: `vcvt_f32_f16` is not stable Rust,
    /// and every ARMv8 core has the instructions).
    #[inline(always)]
    pub(crate) fn widen(h: uint16x8_t) -> (float32x4_t, float32x4_t) {
        let (lo, hi): (float32x4_t, float32x4_t);
        // SAFETY: register-only instructions of every ARMv8 core.
        unsafe {
            asm!(
                "fcvtl {lo:v}.4s, {h:v}.4h",
                "fcvtl2 {hi:v}.4s, {h:v}.8h",
                h = in(vreg) h,
                lo = out(vreg) lo,
                hi = out(vreg) hi,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        (lo, hi)
    }

    /// # Safety
    /// `src.len() == dst.len()`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn to_f32(src: &[u16], dst: &mut [f32]) {
        let n = src.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= len.
            unsafe {
                let (lo, hi) = widen(vld1q_u16(src.as_ptr().add(i)));
                vst1q_f32(dst.as_mut_ptr().add(i), lo);
                vst1q_f32(dst.as_mut_ptr().add(i + 4), hi);
            }
        }
        super::scalar_to_f32(&src[n..], &mut dst[n..]);
    }

    /// # Safety
    /// `src.len() == dst.len()`.
    #[target_feature(enable = "neon")]
    pub(super) unsafe fn from_f32(src: &[f32], dst: &mut [u16]) {
        let n = src.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= len; the default FPCR rounding is to nearest, ties to even.
            unsafe {
                let lo = vld1q_f32(src.as_ptr().add(i));
                let hi = vld1q_f32(src.as_ptr().add(i + 4));
                let h: uint16x8_t;
                asm!(
                    "fcvtn {h:v}.4h, {lo:v}.4s",
                    "fcvtn2 {h:v}.8h, {hi:v}.4s",
                    lo = in(vreg) lo,
                    hi = in(vreg) hi,
                    h = out(vreg) h,
                    options(pure, nomem, nostack, preserves_flags)
                );
                vst1q_u16(dst.as_mut_ptr().add(i), h);
            }
        }
        super::scalar_from_f32(&src[n..], &mut dst[n..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_converts_like_ieee_round_to_nearest_even() {
        // Normal, subnormal, tie, overflow and signed values, in a length that leaves a scalar tail.
        let mut src: Vec<f32> = vec![
            0.0, -0.0, 1.0, -1.5, 65504.0, 70000.0, 1e-6, -3e-8, 6e-8, 1.0009766,
        ];
        src.extend((0..1000).map(|i| ((i * 7919) % 20011) as f32 / 97.0 - 100.0));
        src.extend((0..37).map(|i| 2f32.powi(-14 - (i % 12)) * (1.0 + i as f32 / 64.0)));
        let mut h = vec![0u16; src.len()];
        from_f32(&src, &mut h);
        let mut back = vec![0f32; src.len()];
        to_f32(&h, &mut back);
        for (i, &v) in src.iter().enumerate() {
            let want = half::f16::from_f32(v);
            assert_eq!(h[i], want.to_bits(), "f16 of {v}");
            assert_eq!(back[i].to_bits(), want.to_f32().to_bits(), "f32 of {v}");
        }
    }
}
