//! One matrix product on plain slices (the gemm crate that candle's CPU matmul uses). [`gemm`]
//! runs on the calling thread, for kernels that split their work into tasks of their own and
//! would only oversubscribe the cores with a threaded product inside each; [`product_threaded`]
//! splits one product across rayon's threads, for an op whose whole work it is.

use candle_core::WithDType;
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
pub fn product_threaded<T: WithDType>(
    dims: (usize, usize, usize),
    lhs: Strided<T>,
    rhs: Strided<T>,
) -> Vec<T> {
    let (m, n, _) = dims;
    let par = match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    };
    let mut dst = Vec::with_capacity(m * n);
    product(
        dst.spare_capacity_mut(),
        dims,
        lhs,
        rhs,
        None,
        T::one(),
        par,
    );
    // SAFETY: with `keep: None` the product wrote all m·n elements and read none.
    unsafe { dst.set_len(m * n) };
    dst
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
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<T>(),
            1,
            n as isize,
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
