//! The strided matrix product every CPU kernel runs on: a thin wrapper around the `gemm`
//! crate ([`matmul`], [`matmul_in`]) that writes into a plain or an uninitialised output
//! ([`Slot`]).

use candle_core::{DType, WithDType};
use gemm::Parallelism;

use super::Slot;

/// Index one past the last element a (rows, cols) matrix with strides (rs, cs) touches.
fn extent(rows: usize, cols: usize, (rs, cs): (usize, usize)) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// dst (m, n) = lhs (m, k) @ rhs (k, n), or dst += that with `accumulate`; strides are
/// (row, column) in elements. Uses the rayon pool's threads for large products.
#[expect(
    clippy::too_many_arguments,
    reason = "a strided gemm: sizes, three (slice, strides) operands, accumulate"
)]
pub(crate) fn matmul<T: WithDType, S: Slot<T>>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [S],
    dst_s: (usize, usize),
    accumulate: bool,
    lhs: &[T],
    lhs_s: (usize, usize),
    rhs: &[T],
    rhs_s: (usize, usize),
) {
    matmul_in(
        true, m, n, k, dst, dst_s, accumulate, lhs, lhs_s, rhs, rhs_s,
    )
}

/// [`matmul`], kept on the calling thread unless `parallel` is set and the product is large
/// enough to be worth splitting across the rayon pool.
#[expect(
    clippy::too_many_arguments,
    reason = "a strided gemm: sizes, three (slice, strides) operands, accumulate"
)]
pub(crate) fn matmul_in<T: WithDType, S: Slot<T>>(
    parallel: bool,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [S],
    dst_s: (usize, usize),
    accumulate: bool,
    lhs: &[T],
    lhs_s: (usize, usize),
    rhs: &[T],
    rhs_s: (usize, usize),
) {
    assert!(matches!(T::DTYPE, DType::F32 | DType::F64));
    assert!(extent(m, n, dst_s) <= dst.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_s.0 + j * dst_s.1].set(T::from_f64(0.0));
                }
            }
        }
        return;
    }
    assert!(extent(m, k, lhs_s) <= lhs.len());
    assert!(extent(k, n, rhs_s) <= rhs.len());
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 && m * n * k >= 1 << 17 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let one = T::from_f64(1.0);
    assert!(
        !accumulate || S::init(dst).is_some(),
        "matmul: accumulating into an uninitialised output"
    );
    // SAFETY: the assertions above keep every element gemm reads or writes inside the
    // slices; dst is borrowed mutably, so it cannot alias lhs or rhs; T is f32 or f64 and S
    // has T's layout (`Slot`). Without `accumulate` gemm never reads dst (every path of
    // gemm-common 0.19 treats alpha = 0 as "overwrite"), so dst may be uninitialised.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<T>(),
            dst_s.1 as isize,
            dst_s.0 as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_s.1 as isize,
            lhs_s.0 as isize,
            rhs.as_ptr(),
            rhs_s.1 as isize,
            rhs_s.0 as isize,
            one,
            one,
            false,
            false,
            false,
            par,
        )
    }
}
