//! [`Precision`]: which kernels the CUDA backends run, and so the arithmetic of the products.

/// The arithmetic of the kernels' products (the CUDA and emulated backends).
///
/// Both choices give the loss and the gradient of the same f32 softmax statistics; they differ
/// in how the two N×N×D products are formed (docs/math.md, "Precision of the kernels").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f16 and bf16 features on tensor cores (`mma.sync`: exact products, f32 sums; the
    /// backward's weights H rounded to bf16, a relative error of at most 2⁻⁹ per term of the
    /// gradient); f32 features on the exact f32 path. Tensor cores need a device with room for
    /// the kernels' shared rows (D up to ~580 on sm_90, ~400 on sm_80, ~240 on sm_86/89); wider
    /// rows take the f32 path.
    #[default]
    Auto,
    /// Every element type on the f32 path (SIMT FMA products, features widened to f32): the
    /// most accurate gradient, many times slower for f16 and bf16 on a GPU.
    F32,
    /// As `Auto`, and f32 features on tensor cores too: each f32 row split into bf16 hi and lo
    /// parts, every product as hi·hi + hi·lo + lo·hi (three `mma.sync`, the lo·lo term dropped),
    /// H split the same way in the backward. Products to ~2⁻¹⁶ relative instead of f32's 2⁻²⁴,
    /// at about 3× the tensor-core work of bf16 and twice its shared memory (D up to ~290 on
    /// sm_90); f32 features whose rows do not fit take the f32 path.
    Bf16x3,
}
