//! CPU kernels and candle custom ops: the bottom layer of the engine, below [`crate::nn`].
//!
//! - [`conv`]: 2-D convolutions and transposed convolutions (im2col / col2im around gemm);
//! - [`conv_gemm`]: the same off the CPU, as candle tensor ops around one matmul;
//! - [`fused_bn`]: train-mode BatchNorm (optionally with its activation) and the conditional
//!   affine of conditional BatchNorm;
//! - [`attention`]: SAGAN self-attention in one op;
//! - [`ops`]: the smaller fused ops (linear, softmax, (leaky) ReLU, channel bias, 2x
//!   resampling);
//! - [`matmul`]: the strided matrix product all of them run on (the `gemm` crate).
//!
//! Here also the scratch helpers the kernels share: [`Slot`] / [`uninit`] / [`assume_init`]
//! for outputs written without a zero-fill, [`MIN_TASK`] for rayon splits, [`contiguous`] / [`cpu_slice`] for a custom op's
//! arguments, and [`Float`], the scalar trait of the kernels.
//! Nothing here imports a module above it (checked by `tests/layering.rs`).

pub mod attention;
pub mod conv;
pub mod conv_gemm;
pub mod fused_bn;
pub mod matmul;
pub mod ops;

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout, Result, WithDType, bail};

/// Elements per rayon task in the CPU kernels, at least (smaller tasks cost more to schedule
/// than to run). Each element or plane is computed on its own, so results do not depend on
/// the split.
pub(crate) const MIN_TASK: usize = 16 << 10;

/// An element of a kernel's output: `T` itself, or `MaybeUninit<T>` for an output that the
/// kernel overwrites completely, allocated without the zero-fill of `vec![0; n]` (a serial
/// pass over the output before the kernels overwrite it: for the convolution outputs alone,
/// about 5% of a cdcgan28 iteration).
///
/// # Safety
/// Implementors have the size, alignment and bit validity of `T` (so gemm may write a slice
/// of them through a `*mut T`).
pub(crate) unsafe trait Slot<T: Copy>: Send + Sync {
    fn set(&mut self, v: T);
    /// The slice as initialised values, where its type says they are.
    fn init(s: &mut [Self]) -> Option<&mut [T]>
    where
        Self: Sized;
}

// SAFETY: T has its own layout.
unsafe impl<T: WithDType> Slot<T> for T {
    fn set(&mut self, v: T) {
        *self = v;
    }
    fn init(s: &mut [T]) -> Option<&mut [T]> {
        Some(s)
    }
}

// SAFETY: MaybeUninit<T> is repr(transparent) over T.
unsafe impl<T: WithDType> Slot<T> for MaybeUninit<T> {
    fn set(&mut self, v: T) {
        self.write(v);
    }
    fn init(_: &mut [Self]) -> Option<&mut [T]> {
        None
    }
}

/// `n` elements for a kernel to overwrite, see [`Slot`].
pub(crate) fn uninit<T>(n: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(n);
    v.resize_with(n, MaybeUninit::uninit);
    v
}

/// # Safety
/// Every element of `v` has been written.
pub(crate) unsafe fn assume_init<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<T> has T's layout, the allocation is v's own (not dropped), and the
    // caller guarantees that all `len` elements are initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) }
}

/// The elements of a contiguous argument of a custom op, `v` being its whole storage.
pub(crate) fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: non-contiguous argument"),
    }
}

/// The elements of a contiguous argument of a custom op, from its CPU storage.
pub(crate) fn cpu_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    contiguous(s.as_slice::<T>()?, l, what)
}

/// f32 / f64, the dtypes the CPU kernels run in, with the scalar operations they need
/// (the conversions written so the compiler inlines them: candle's `WithDType` ones live in
/// another crate and are not marked inline).
pub(crate) trait Float: WithDType {
    fn to64(self) -> f64;
    fn from64(v: f64) -> Self;
    fn exp_(self) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn to64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from64(v: f64) -> Self {
        v as f32
    }
    fn exp_(self) -> Self {
        self.exp()
    }
}

impl Float for f64 {
    #[inline(always)]
    fn to64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from64(v: f64) -> Self {
        v
    }
    fn exp_(self) -> Self {
        self.exp()
    }
}
