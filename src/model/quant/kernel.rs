//! The SIMD kernels of the block products: a group's panels against up to [`super::TILE`] inputs,
//! with AVX-512 VNNI's `vpdpbusd` where the CPU has it, else AVX2's `maddubs`. Each gives every
//! (row, input) pair [`QMatrix::dot_row_portable`](super::QMatrix)'s integers and floats, so a
//! sequence's products do not depend on the batch it is in nor on the CPU's kernel.

use super::{Input, WeightFormat, GROUP};

/// [`super::quantize_q8`] on one block, vectorized where the CPU has AVX2 (the same values).
pub(super) fn quantize_q8(x: &[f32], q: &mut [u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2; x and q are whole blocks.
        return unsafe { avx2::quantize_q8(x, q) };
    }
    super::quantize_q8(x, q)
}

/// One group of rows (its scales and panels from the start of `s` and `q`) against up to
/// [`super::TILE`] inputs: out[r][j] = dot(row j, xs[r]). False where no kernel suits the
/// CPU (the caller then computes each dot product portably).
pub(super) fn dot_group(
    format: WeightFormat,
    s: &[f32],
    q: &[u8],
    xs: &[Input],
    out: &mut [[f32; GROUP]],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let nb = xs[0].scales.len();
        assert!(s.len() >= nb * GROUP && q.len() >= nb * GROUP * format.block_bytes());
        assert!(out.len() == xs.len() && xs.len() <= super::TILE);
        if vnni::available() {
            // SAFETY: the CPU has the features the function is compiled for; the asserts
            // above bound every read.
            unsafe { vnni::dot_group(format, s, q, xs, out) };
            return true;
        }
        if avx2::available() {
            // SAFETY: as above.
            unsafe { avx2::dot_group(format, s, q, xs, out) };
            return true;
        }
    }
    let _ = (format, s, q, xs, out);
    false
}

/// Four input bytes (one 32-bit word of block `b`, bytes 4w..4w + 4) in every lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn input_word(x: &Input, b: usize, w: usize) -> std::arch::x86_64::__m256i {
    let at = x.quants.as_ptr().add(b * super::BLOCK + 4 * w) as *const i32;
    std::arch::x86_64::_mm256_set1_epi32(at.read_unaligned())
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::super::{Input, WeightFormat, BLOCK, GROUP};
    use super::input_word;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    /// [`super::quantize_q8`] on one block, the same values: max|x| and the products are exact
    /// in any order, and halves round away from zero as `f32::round` does.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_q8(x: &[f32], q: &mut [u8]) -> f32 {
        assert!(x.len() == BLOCK && q.len() == BLOCK);
        let sign = _mm256_set1_ps(-0.0);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
        let abs = |a| _mm256_andnot_ps(sign, a);
        let m = _mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        let ints: [__m256i; 4] = std::array::from_fn(|i| {
            let y = _mm256_mul_ps(v[i], id);
            let t = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let up = _mm256_cmp_ps(abs(_mm256_sub_ps(y, t)), half, _CMP_GE_OQ);
            // ±1 with y's sign where the fraction is at least a half.
            let step = _mm256_and_ps(up, _mm256_or_ps(one, _mm256_and_ps(y, sign)));
            _mm256_cvtps_epi32(_mm256_add_ps(t, step))
        });
        // 32-bit → 16-bit → 8-bit; the packs interleave 128-bit lanes, the permute restores
        // the order.
        let w = _mm256_packs_epi32(ints[0], ints[1]);
        let z = _mm256_packs_epi32(ints[2], ints[3]);
        let b = _mm256_packs_epi16(w, z);
        let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, b);
        d
    }

    /// A group's sixteen rows as two halves of eight (a 256-bit register's lanes), four inputs
    /// at a time (sixteen registers hold four inputs' sums, their floats and the panel).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_group(
        format: WeightFormat,
        s: &[f32],
        q: &[u8],
        xs: &[Input],
        out: &mut [[f32; GROUP]],
    ) {
        for half in 0..2 {
            for (xs, out) in xs.chunks(4).zip(out.chunks_mut(4)) {
                match xs.len() {
                    1 => tile::<1>(format, s, q, half, xs, out),
                    2 => tile::<2>(format, s, q, half, xs, out),
                    3 => tile::<3>(format, s, q, half, xs, out),
                    _ => tile::<4>(format, s, q, half, xs, out),
                }
            }
        }
    }

    /// Rows 8·half.. of the group. `maddubs` multiplies unsigned by signed bytes and saturates
    /// pairs at 16 bits, which levels up to 255 could reach: Q8_0's stored bytes go back to
    /// signed weights and multiply as |w| times x with w's sign (no zero point); Q4_0's levels
    /// (0..16) multiply as they are.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(
        format: WeightFormat,
        s: &[f32],
        q: &[u8],
        half: usize,
        xs: &[Input],
        out: &mut [[f32; GROUP]],
    ) {
        const LANES: usize = GROUP / 2;
        let flip = _mm256_set1_epi8(-128);
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        // A panel's word w is GROUP rows' 4 bytes; this half's eight start 32 bytes in.
        let word = |panel: *const u8, w: usize| {
            _mm256_loadu_si256(panel.add((w * GROUP + half * LANES) * 4) as *const __m256i)
        };
        for b in 0..xs[0].scales.len() {
            let ws = _mm256_loadu_ps(s.as_ptr().add(b * GROUP + half * LANES));
            let mut p = [_mm256_setzero_si256(); R];
            let madd = |w, x| _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
            match format {
                WeightFormat::Q4_0 => {
                    let panel = q.as_ptr().add(b * GROUP * BLOCK / 2);
                    for (r, p) in p.iter_mut().enumerate() {
                        *p = _mm256_set1_epi32(-8 * xs[r].sums.get_unchecked(b));
                    }
                    for w in 0..BLOCK / 8 {
                        let v = word(panel, w);
                        let lo = _mm256_and_si256(v, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                        for (r, p) in p.iter_mut().enumerate() {
                            *p = _mm256_add_epi32(*p, madd(lo, input_word(&xs[r], b, w)));
                            *p = _mm256_add_epi32(*p, madd(hi, input_word(&xs[r], b, w + 4)));
                        }
                    }
                }
                _ => {
                    let panel = q.as_ptr().add(b * GROUP * BLOCK);
                    for w in 0..BLOCK / 4 {
                        let signed = _mm256_xor_si256(word(panel, w), flip);
                        let abs = _mm256_sign_epi8(signed, signed);
                        for (r, p) in p.iter_mut().enumerate() {
                            let x = _mm256_sign_epi8(input_word(&xs[r], b, w), signed);
                            *p = _mm256_add_epi32(*p, madd(abs, x));
                        }
                    }
                }
            }
            for r in 0..R {
                let d = _mm256_mul_ps(ws, _mm256_set1_ps(*xs[r].scales.get_unchecked(b)));
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p[r]), acc[r]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(out[r].as_mut_ptr().add(half * LANES), acc[r]);
        }
    }
}

/// The same sums with AVX-512 VNNI's `vpdpbusd`, Q8_0 on 512-bit registers, a lane per row of
/// the group (Q4_0 on 256-bit halves, see `dot_group`): the panel's stored levels are the
/// unsigned operand, the input word (broadcast from memory) the signed one, and each block's
/// lanes start from −zero point · the input block's sum. Per (block, input) that is one `vpdpbusd` per word for all sixteen rows, then a
/// convert and a multiply-add. With few inputs each sums its even and odd words apart: the
/// instruction's latency is four times its issue interval, and one chain per input would
/// leave the unit idle (the integer sums are the same in any order).
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::super::{Input, WeightFormat, BLOCK, GROUP, TILE};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && super::avx2::available()
        })
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn dot_group(
        format: WeightFormat,
        s: &[f32],
        q: &[u8],
        xs: &[Input],
        out: &mut [[f32; GROUP]],
    ) {
        match format {
            // Q4_0's nibbles on 512-bit registers measured 1.5-2.6× slower than on two halves
            // of 256 bits (the panel split as AVX2 splits it), at one input as at eight.
            WeightFormat::Q4_0 => {
                for half in 0..2 {
                    for (xs, out) in xs.chunks(4).zip(out.chunks_mut(4)) {
                        match xs.len() {
                            1 => q4_half::<1>(s, q, half, xs, out),
                            2 => q4_half::<2>(s, q, half, xs, out),
                            3 => q4_half::<3>(s, q, half, xs, out),
                            _ => q4_half::<4>(s, q, half, xs, out),
                        }
                    }
                }
            }
            _ => match xs.len() {
                1 => tile::<1, 2>(s, q, xs, out),
                2 => tile::<2, 2>(s, q, xs, out),
                3 => tile::<3, 2>(s, q, xs, out),
                4 => tile::<4, 2>(s, q, xs, out),
                5 => tile::<5, 1>(s, q, xs, out),
                6 => tile::<6, 1>(s, q, xs, out),
                7 => tile::<7, 1>(s, q, xs, out),
                _ => tile::<TILE, 1>(s, q, xs, out),
            },
        }
    }

    /// Q4_0: rows 8·half.. of the group against up to four inputs, on 256-bit registers.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    unsafe fn q4_half<const R: usize>(
        s: &[f32],
        q: &[u8],
        half: usize,
        xs: &[Input],
        out: &mut [[f32; GROUP]],
    ) {
        const LANES: usize = GROUP / 2;
        let low = _mm256_set1_epi8(0x0F);
        let zero = WeightFormat::Q4_0.zero_point();
        let mut acc = [_mm256_setzero_ps(); R];
        let nb = xs[0].scales.len();
        for b in 0..nb {
            if half == 0 {
                prefetch_next_group(q, nb, b, GROUP * BLOCK / 2);
            }
            let ws = _mm256_loadu_ps(s.as_ptr().add(b * GROUP + half * LANES));
            let mut p: [__m256i; R] =
                std::array::from_fn(|r| _mm256_set1_epi32(-zero * xs[r].sums.get_unchecked(b)));
            let panel = q.as_ptr().add(b * GROUP * BLOCK / 2);
            for w in 0..BLOCK / 8 {
                let at = panel.add((w * GROUP + half * LANES) * 4) as *const __m256i;
                let v = _mm256_loadu_si256(at);
                let lo = _mm256_and_si256(v, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                for (r, p) in p.iter_mut().enumerate() {
                    *p = _mm256_dpbusd_epi32(*p, lo, super::input_word(&xs[r], b, w));
                    *p = _mm256_dpbusd_epi32(*p, hi, super::input_word(&xs[r], b, w + 4));
                }
            }
            for r in 0..R {
                let d = _mm256_mul_ps(ws, _mm256_set1_ps(*xs[r].scales.get_unchecked(b)));
                acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p[r]), acc[r]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(out[r].as_mut_ptr().add(half * LANES), acc[r]);
        }
    }

    /// The next group's block `b` (`bytes` a block, `nb` blocks a group) on its way from memory
    /// while this group's are summed: at a batch's eight inputs the products take as long as
    /// reading the weights, and the hardware's prefetch alone did not overlap the two. Past the
    /// matrix's end the addresses are only hints, never read.
    #[inline(always)]
    unsafe fn prefetch_next_group(q: &[u8], nb: usize, b: usize, bytes: usize) {
        let next = q.as_ptr().wrapping_add((nb + b) * bytes);
        for line in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line) as *const i8);
        }
    }

    /// Four input bytes (one 32-bit word of block `b`, bytes 4w..4w + 4) in every lane.
    #[inline(always)]
    unsafe fn input_word(x: &Input, b: usize, w: usize) -> __m512i {
        let at = x.quants.as_ptr().add(b * BLOCK + 4 * w) as *const i32;
        _mm512_set1_epi32(at.read_unaligned())
    }

    /// Q8_0: R inputs, each summing in C chains (1 or 2: even and odd words), every register
    /// named at compile time so that none lives on the stack (an index `w % C` put them there).
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    unsafe fn tile<const R: usize, const C: usize>(
        s: &[f32],
        q: &[u8],
        xs: &[Input],
        out: &mut [[f32; GROUP]],
    ) {
        let zero = WeightFormat::Q8_0.zero_point();
        let mut acc = [_mm512_setzero_ps(); R];
        let nb = xs[0].scales.len();
        for b in 0..nb {
            prefetch_next_group(q, nb, b, GROUP * BLOCK);
            let ws = _mm512_loadu_ps(s.as_ptr().add(b * GROUP));
            let mut p: [[__m512i; C]; R] = std::array::from_fn(|r| {
                std::array::from_fn(|c| {
                    if c == 0 {
                        _mm512_set1_epi32(-zero * xs[r].sums.get_unchecked(b))
                    } else {
                        _mm512_setzero_si512()
                    }
                })
            });
            let panel = q.as_ptr().add(b * GROUP * BLOCK) as *const __m512i;
            for w in (0..BLOCK / 4).step_by(2) {
                let even = _mm512_loadu_si512(panel.add(w));
                let odd = _mm512_loadu_si512(panel.add(w + 1));
                for (r, p) in p.iter_mut().enumerate() {
                    p[0] = _mm512_dpbusd_epi32(p[0], even, input_word(&xs[r], b, w));
                    p[C - 1] = _mm512_dpbusd_epi32(p[C - 1], odd, input_word(&xs[r], b, w + 1));
                }
            }
            for r in 0..R {
                let sum = p[r]
                    .iter()
                    .fold(_mm512_setzero_si512(), |a, &c| _mm512_add_epi32(a, c));
                let d = _mm512_mul_ps(ws, _mm512_set1_ps(*xs[r].scales.get_unchecked(b)));
                acc[r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum), acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }
}
