//! One matrix product on plain slices (the gemm crate that candle's CPU matmul uses). [`gemm`]
//! runs on the calling thread, for kernels that split their work into tasks of their own and
//! would only oversubscribe the cores with a threaded product inside each; [`product_threaded`]
//! splits one product across rayon's threads, for an op whose whole work it is.

use candle_core::WithDType;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A read-only matrix: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Strided<'a, T = f32> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Strided<'a, T> {
    /// Rows `rs` apart, each contiguous.
    pub fn rows(data: &'a [T], rs: usize) -> Self {
        Strided { data, rs, cs: 1 }
    }

    /// The transpose of [`Self::rows`]: element (i, j) is row j's element i.
    pub fn transposed_rows(data: &'a [T], rs: usize) -> Self {
        Strided {
            data,
            rs: 1,
            cs: rs,
        }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// dst (m × n, row-major) ← keep·dst + scale·lhs·rhs for lhs m × k and rhs k × n; `keep: None`
/// overwrites dst without reading it.
pub fn gemm<T: WithDType>(
    dst: &mut [T],
    dims: (usize, usize, usize),
    lhs: Strided<T>,
    rhs: Strided<T>,
    keep: Option<T>,
    scale: T,
) {
    // SAFETY: initialised values are possibly uninitialised ones; the product only writes
    // values into them.
    let dst = unsafe { &mut *(dst as *mut [T] as *mut [MaybeUninit<T>]) };
    product(dst, dims, lhs, rhs, keep, scale, gemm::Parallelism::None)
}

/// lhs·rhs (m × n, row-major) in a new vector, split across rayon's threads. The vector is
/// not zeroed first: the product writes every element, and zeroing a training step's outputs
/// (the weight gradients alone are the model's size) was a pass on one core while the other
/// waited.
///
/// A product of a layer's size is split here into blocks of the output's columns, one
/// single-threaded product each, rather than threaded inside gemm: gemm packs a left operand
/// of up to a few thousand rows (after it transposes a row-major product, the rhs here: a
/// layer's Wᵀ in `x·Wᵀ`) on the calling thread while the other cores wait, which took a
/// tenth of the forward's time. Every element is summed in the same order either way (gemm's
/// depth blocks depend on k alone), so the values are the same bits.
pub fn product_threaded<T: WithDType>(
    dims: (usize, usize, usize),
    lhs: Strided<T>,
    rhs: Strided<T>,
) -> Vec<T> {
    let (m, n, _) = dims;
    let threads = rayon::current_num_threads();
    let mut dst = Vec::with_capacity(m * n);
    let out = dst.spare_capacity_mut();
    if threads == 1 || !(2 * COLUMN_BLOCK..=SPLIT_COLUMNS_UP_TO).contains(&n) {
        let par = match threads {
            1 => gemm::Parallelism::None,
            n => gemm::Parallelism::Rayon(n),
        };
        product(out, dims, lhs, rhs, None, T::one(), par);
    } else {
        by_column_blocks(out, dims, lhs, rhs, threads);
    }
    // SAFETY: with `keep: None` the product wrote all m·n elements and read none.
    unsafe { dst.set_len(m * n) };
    dst
}

/// aᵀ·rhs (m × n, row-major) for `a` given as k × m rows (a weight's gradient dyᵀ·x), split
/// across rayon's threads. A tall output (from [`BLOCKED_FROM_ROWS`] rows: the LM head's
/// gradient, dy 512 × 49,152) goes in blocks of output rows, each block's columns of `a`
/// copied into a row-major block first, then one single-threaded product: gemm packs a
/// transposed left operand that tall slowly (278 GFLOP/s, against 443-466 with it row-major;
/// with the copy 96 → 73 ms at the head's shape), while for a layer's size the copy costs more
/// than it saves. The same sums in the same order as [`product_threaded`] (gemm's depth
/// blocks depend on k alone): the same bits.
pub fn transposed_product_threaded<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    a: &[T],
    rhs: Strided<T>,
) -> Vec<T> {
    if m < BLOCKED_FROM_ROWS {
        return product_threaded((m, n, k), Strided::transposed_rows(a, m), rhs);
    }
    assert!(
        a.len() >= k * m && rhs.fits(k, n),
        "gemm: an operand is smaller than {m}×{k} · {k}×{n}"
    );
    let mut dst = Vec::with_capacity(m * n);
    dst.spare_capacity_mut()[..m * n]
        .par_chunks_mut(TRANSPOSED_BLOCK_ROWS * n.max(1))
        .enumerate()
        .for_each_init(Vec::new, |block, (i, out)| {
            let (from, rows) = (i * TRANSPOSED_BLOCK_ROWS, out.len() / n.max(1));
            // Every element is written below: only a longer block needs new ones.
            block.resize(rows * k, T::zero());
            // Sixteen output rows at a time: their sixteen lines of `block` stay in L1 while
            // each row of `a` gives one line of values.
            for j0 in (0..rows).step_by(16) {
                let width = 16.min(rows - j0);
                for (r, src) in a.chunks(m).take(k).enumerate() {
                    let src = &src[from + j0..from + j0 + width];
                    for (j, &v) in src.iter().enumerate() {
                        block[(j0 + j) * k + r] = v;
                    }
                }
            }
            let lhs = Strided::rows(&block[..], k);
            product(
                out,
                (rows, n, k),
                lhs,
                rhs,
                None,
                T::one(),
                gemm::Parallelism::None,
            );
        });
    // SAFETY: with `keep: None` each block's product wrote all its elements and read none.
    unsafe { dst.set_len(m * n) };
    dst
}

/// Outputs this tall and taller take [`transposed_product_threaded`]'s blocks.
const BLOCKED_FROM_ROWS: usize = 8192;
/// Output rows a block of [`transposed_product_threaded`]: its copy of `a` (rows × k) stays in
/// the core's caches (2 MiB at k = 512).
const TRANSPOSED_BLOCK_ROWS: usize = 1024;

/// Outputs up to this wide are split into column blocks ([`product_threaded`]); wider ones (the
/// LM head's 49,152) have rows enough for gemm's own threads, whose packing is shared.
const SPLIT_COLUMNS_UP_TO: usize = 8192;
/// Column blocks are multiples of this (a 512-bit register of f32).
const COLUMN_BLOCK: usize = 16;

/// `dst` (m × n, row-major) ← lhs·rhs as `parts` products of whole column blocks, each on
/// one thread.
fn by_column_blocks<T: WithDType>(
    dst: &mut [MaybeUninit<T>],
    (m, n, k): (usize, usize, usize),
    lhs: Strided<T>,
    rhs: Strided<T>,
    parts: usize,
) {
    let width = n.div_ceil(parts).next_multiple_of(COLUMN_BLOCK);
    // Blocks of columns interleave in memory, so each task gets a pointer, not a slice.
    struct Out<T>(*mut MaybeUninit<T>);
    // SAFETY: the tasks write disjoint columns of `dst`, which outlives the scope.
    unsafe impl<T> Send for Out<T> {}
    unsafe impl<T> Sync for Out<T> {}
    let out = Out(dst.as_mut_ptr());
    let out = &out;
    assert!(
        dst.len() >= m * n,
        "gemm: the output is smaller than {m}×{n}"
    );
    rayon::scope(|s| {
        for from in (0..n).step_by(width) {
            let cols = width.min(n - from);
            let rhs = Strided {
                data: &rhs.data[from * rhs.cs..],
                ..rhs
            };
            s.spawn(move |_| {
                assert!(lhs.fits(m, k) && rhs.fits(k, cols));
                // SAFETY: rows 0..m, columns from..from + cols of the m × n matrix at `out`
                // (checked to hold it above), written by this task alone; the operands fit.
                unsafe {
                    let block = out.0.add(from).cast::<T>();
                    let par = gemm::Parallelism::None;
                    raw_product(block, n, (m, cols, k), lhs, rhs, None, T::one(), par);
                }
            });
        }
    });
}

/// `dst` may be uninitialised only with `keep: None` (it is then written, never read).
fn product<T: WithDType>(
    dst: &mut [MaybeUninit<T>],
    (m, n, k): (usize, usize, usize),
    lhs: Strided<T>,
    rhs: Strided<T>,
    keep: Option<T>,
    scale: T,
    par: gemm::Parallelism,
) {
    assert!(
        dst.len() >= m * n && lhs.fits(m, k) && rhs.fits(k, n),
        "gemm: an operand is smaller than {m}×{k} · {k}×{n}"
    );
    // SAFETY: the assert keeps every element the strides reach inside its slice.
    unsafe {
        raw_product(
            dst.as_mut_ptr().cast(),
            n,
            (m, n, k),
            lhs,
            rhs,
            keep,
            scale,
            par,
        )
    }
}

/// # Safety
/// `dst` must hold an m × n matrix with rows `dst_rs` apart, no other reference to it in use,
/// and `lhs`, `rhs` must fit m × k and k × n.
#[allow(clippy::too_many_arguments)]
unsafe fn raw_product<T: WithDType>(
    dst: *mut T,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Strided<T>,
    rhs: Strided<T>,
    keep: Option<T>,
    scale: T,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        keep.is_some(),
        lhs.data.as_ptr(),
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.data.as_ptr(),
        rhs.cs as isize,
        rhs.rs as isize,
        keep.unwrap_or(T::zero()),
        scale,
        false,
        false,
        false,
        par,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_follow_the_strides() {
        // lhs 2×3, rhs given as the transpose of 2 rows of 3: rhs is 3×2.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0, 0.0, -1.0, 2.0, 1.0, 0.0];
        let mut dst = [10.0; 4];
        let a_bt = |dst: &mut [f32], keep, scale| {
            let (lhs, rhs) = (Strided::rows(&a, 3), Strided::transposed_rows(&b, 3));
            gemm(dst, (2, 2, 3), lhs, rhs, keep, scale);
        };
        a_bt(&mut dst, None, 1.0);
        assert_eq!(dst, [-2.0, 4.0, -2.0, 13.0]);
        // Accumulate: 0.5·dst + 2·a·bᵀ.
        a_bt(&mut dst, Some(0.5), 2.0);
        assert_eq!(dst, [-5.0, 10.0, -5.0, 32.5]);
    }

    /// Column blocks on several threads give the single-threaded product's bits, for either
    /// layout of the rhs (x·Wᵀ's transposed rows among them), widths not a multiple of a
    /// block, and depths of several of gemm's depth blocks.
    #[test]
    fn column_blocks_equal_one_product_to_the_bit() {
        let value = |i: usize| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5;
        for (m, n, k) in [(37, 150, 70), (5, 33, 1500), (64, 200, 9)] {
            let a: Vec<f32> = (0..m * k).map(value).collect();
            let b: Vec<f32> = (0..k * n).map(|i| value(i + 1)).collect();
            let lhs = Strided::rows(&a, k);
            for rhs in [Strided::rows(&b, n), Strided::transposed_rows(&b, k)] {
                let mut one = vec![0.0; m * n];
                gemm(&mut one, (m, n, k), lhs, rhs, None, 1.0);
                for parts in [2, 3] {
                    let mut blocks = Vec::with_capacity(m * n);
                    by_column_blocks(blocks.spare_capacity_mut(), (m, n, k), lhs, rhs, parts);
                    // SAFETY: the blocks wrote every element.
                    unsafe { blocks.set_len(m * n) };
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&blocks), bits(&one), "{m}×{n}×{k} in {parts} parts");
                }
                let threaded = product_threaded((m, n, k), lhs, rhs);
                assert_eq!(threaded, one, "{m}×{n}×{k} threaded");
            }
        }
    }

    /// A tall aᵀ·b in blocks (a partial last block, rows not a multiple of the copy's
    /// sixteen) gives the bits of the product reading `a` transposed; a short one is that
    /// product.
    #[test]
    fn tall_transposed_products_equal_the_plain_one_to_the_bit() {
        let value = |i: usize| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5;
        for (m, n, k) in [(BLOCKED_FROM_ROWS + 1030, 20, 37), (300, 40, 33)] {
            let a: Vec<f32> = (0..k * m).map(value).collect();
            let b: Vec<f32> = (0..k * n).map(|i| value(i + 3)).collect();
            let rhs = Strided::rows(&b, n);
            let plain = product_threaded((m, n, k), Strided::transposed_rows(&a, m), rhs);
            let blocked = transposed_product_threaded((m, n, k), &a, rhs);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&blocked) == bits(&plain), "{m}×{n}×{k}");
        }
    }

    #[test]
    #[should_panic(expected = "smaller")]
    fn short_operands_are_refused() {
        let mut dst = [0.0; 4];
        let a = [1.0; 5];
        gemm(
            &mut dst,
            (2, 2, 3),
            Strided::rows(&a, 3),
            Strided::rows(&a, 2),
            None,
            1.0,
        );
    }
}
