//! e^x over a slice of f32 in vector lanes, equal bit for bit to `f32::exp` on x86-64 glibc
//! with FMA — the libm that training has always called one value at a time.
//!
//! Why not a faster, looser exp (like the attention's [`crate::attention::softmax`] one): the
//! fused cross-entropy and SwiGLU ops were built to round as candle's composed ops do, and a
//! 20-step training run amplifies a one-ulp change to 1e-3 in its losses. Computing libm's
//! own algorithm in lanes keeps every loss and gradient the same to the bit while the
//! ~120 M exps of a 512-token step stop costing 3 % of it.
//!
//! The algorithm (glibc's `expf`, from Arm's optimized routines; the FMA build contracts the
//! steps marked below): in f64, x·32/ln 2 = k + r with k an integer (rounded by adding 1.5·2^52)
//! and |r| ≤ 1/2; e^x = 2^(k/32)·2^(r/32), the first from a 32-entry table with k's high bits
//! added to the exponent, the second a cubic in r; then one rounding to f32. Inputs outside its
//! fast range (|x| ≥ 88, NaN) go to `f32::exp` itself, so over/underflow and errno behave as
//! libm's.

/// 32/ln 2.
const INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
/// 1.5·2^52: adding it rounds to an integer held in the low mantissa bits.
const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
/// The cubic 2^(r/32) ≈ 1 + C2·r + C1·r² + C0·r³.
const C0: f64 = f64::from_bits(0x3ebc_6af8_4b91_2394);
const C1: f64 = f64::from_bits(0x3f2e_bfce_50fa_c4f3);
const C2: f64 = f64::from_bits(0x3f96_2e42_ff0c_52d6);

/// bits(2^(i/32)) − i·2^47: adding k·2^47 (k's bits shifted into the exponent) to entry k mod 32
/// gives bits(2^(k/32)).
const TABLE: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// Whether x is in the fast range, |x| < 88 (libm's test on the top 12 bits).
#[inline(always)]
fn fast(x: f32) -> bool {
    (x.to_bits() >> 20) & 0x7ff <= 0x42a
}

/// The fast range's arithmetic, step for step as the FMA build of libm does it.
#[inline(always)]
fn core(x: f32) -> f32 {
    let xd = x as f64;
    let shifted = INV_LN2_N.mul_add(xd, SHIFT); // contracted: k + 1.5·2^52
    let ki = shifted.to_bits();
    let kd = shifted - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd); // contracted: x·32/ln 2 − k, unrounded product
    let s = f64::from_bits(TABLE[(ki % 32) as usize].wrapping_add(ki << 47));
    let z = r.mul_add(C0, C1);
    let y = r.mul_add(C2, 1.0);
    let y = z.mul_add(r * r, y);
    (y * s) as f32
}

/// x ← e^x for every x in `xs`.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { exp_avx512(xs) };
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: as above.
        return unsafe { exp_avx2(xs) };
    }
    // Without FMA hardware `mul_add` would be a libm call and libm's own expf rounds without
    // contraction: libm it is.
    for x in xs {
        *x = x.exp();
    }
}

/// dst[i] ← e^(f(src[i])): the argument computed as the caller always has, the exps in lanes.
#[inline]
pub fn exp_map(dst: &mut [f32], src: &[f32], f: impl Fn(f32) -> f32) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = f(x);
    }
    exp_in_place(&mut dst[..src.len()]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn exp_avx512(xs: &mut [f32]) {
    lanes(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(xs: &mut [f32]) {
    lanes(xs)
}

/// Blocks of 16 that the compiler keeps in vector registers (the table read becomes a
/// gather); a block with any value outside the fast range redoes those values through libm.
#[inline(always)]
fn lanes(xs: &mut [f32]) {
    const L: usize = 16;
    let mut blocks = xs.chunks_exact_mut(L);
    for b in &mut blocks {
        let x: [f32; L] = b.try_into().expect("a block of 16");
        let mut all_fast = true;
        for i in 0..L {
            b[i] = core(x[i]);
            all_fast &= fast(x[i]);
        }
        if !all_fast {
            for i in 0..L {
                if !fast(x[i]) {
                    b[i] = x[i].exp();
                }
            }
        }
    }
    for x in blocks.into_remainder() {
        *x = if fast(*x) { core(*x) } else { x.exp() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is what its comment says: bits(2^(i/32)) − i·2^47.
    #[test]
    fn table_holds_the_powers_of_two() {
        for (i, &t) in TABLE.iter().enumerate() {
            let want = (i as f64 / 32.0).exp2().to_bits() - ((i as u64) << 47);
            assert_eq!(t, want, "entry {i}");
        }
    }

    /// Every f32 there is, 2^32 of them: where libm is the FMA build of glibc's (the claim the
    /// training ops rest on), equal to `f32::exp` bit for bit; elsewhere within one ulp of the
    /// f64 exp. (A sample of millions is not enough: rounding x·32/ln 2 before
    /// subtracting k, instead of the contracted form, changes no value in two million.)
    #[test]
    fn equals_libm_bit_for_bit() {
        use rayon::prelude::*;
        let glibc_fma = cfg!(all(
            target_arch = "x86_64",
            target_os = "linux",
            target_env = "gnu"
        )) && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("avx2");
        let check = |xs: &[f32]| {
            let mut got = xs.to_vec();
            exp_in_place(&mut got);
            for (&x, &y) in xs.iter().zip(&got) {
                if glibc_fma {
                    let libm = x.exp();
                    assert_eq!(
                        y.to_bits(),
                        libm.to_bits(),
                        "exp({x:e}) = {y:e}, libm {libm:e}"
                    );
                    continue;
                }
                let want = (x as f64).exp() as f32;
                if want.is_nan() {
                    assert!(y.is_nan(), "exp({x:e}) = {y:e}");
                } else {
                    let ulps = (y.to_bits() as i64 - want.to_bits() as i64).abs();
                    assert!(ulps <= 1, "exp({x:e}) = {y:e}, f64 says {want:e}");
                }
            }
        };
        (0..1u64 << 16).into_par_iter().for_each(|hi| {
            let xs: Vec<f32> = (0..1u32 << 16)
                .map(|lo| f32::from_bits((hi as u32) << 16 | lo))
                .collect();
            check(&xs);
        });
        // Every remainder length after whole blocks, values in the fast range and out of it.
        for n in 0..40 {
            let xs: Vec<f32> = (0..n).map(|i| (i as f32 - 20.0) * 5.3).collect();
            check(&xs);
        }
    }
}
