//! The C ABI (feature `capi`): the loss for C and C++ trainers, declared in
//! `include/supcon.h`, exported by the crate's `cdylib` (`libsupcon.so`).
//!
//! - A handle (`SupconHandle`) owns the configuration and the backend (the CUDA backend's
//!   loaded kernels included); a forward pass gives a state (`SupconState`, the O(N)
//!   statistics) that the backward pass reads. Both are freed by their `_free` function.
//! - Every function returns a status (`SUPCON_OK` or an error code); the message of the last
//!   error on the calling thread is `supcon_last_error()`. A panic never crosses the boundary:
//!   it is caught and returned as `SUPCON_PANIC`.
//! - Host arrays are row-major and contiguous: features `[B, V, D]` of `f32`, `f16`, `bf16`
//!   or `f64`, labels `int64[B]`, a mask `float[B·B]`, label sets `uint8[B·K]` (nonzero: a
//!   member). The gradient is `float[B·V·D]` (`double` for f64 features).
//!
//! `tests/capi.rs` compiles a C program against the header and this library and checks its
//! results against the reference backend; it also checks that the header declares exactly the
//! functions and constants defined here.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use half::{bf16, f16};
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayView3};

mod device;

pub use device::{
    supcon_backward_device, supcon_device_layout, supcon_forward_device, SupconDeviceLayout,
};

use crate::{
    AnyBackend, Backend, ContrastMode, Denominator, Error, GradElement, LabelSetWeight,
    NoPositivePolicy, Positives, Reduction, SavedState, Summation, SupConLoss, Upstream,
};

/// Success.
pub const SUPCON_OK: i32 = 0;
/// A null pointer, an unknown enum value, a shape or an option the loss refuses.
pub const SUPCON_INVALID_ARGUMENT: i32 = 1;
/// An input or option the chosen backend does not implement.
pub const SUPCON_UNSUPPORTED: i32 = 2;
/// An allocation failed.
pub const SUPCON_OUT_OF_MEMORY: i32 = 3;
/// No usable CUDA backend: not compiled in, no driver, no device, kernels not built.
pub const SUPCON_NO_CUDA: i32 = 4;
/// A CUDA driver call failed.
pub const SUPCON_CUDA_ERROR: i32 = 5;
/// An anchor has no positive under `SUPCON_NO_POSITIVE_ERROR`.
pub const SUPCON_ANCHOR_WITHOUT_POSITIVES: i32 = 6;
/// A panic inside the library (a bug): caught, never unwound into the caller.
pub const SUPCON_PANIC: i32 = 7;
/// Any other error of the crate (its message says which).
pub const SUPCON_ERROR: i32 = 8;

/// `SupconOptions::contrast_mode`: every view's rows are anchors.
pub const SUPCON_CONTRAST_ALL: u32 = 0;
/// `SupconOptions::contrast_mode`: the first view's rows are the anchors.
pub const SUPCON_CONTRAST_ONE: u32 = 1;
/// `SupconOptions::summation`: L_out, the mean over positives outside the log.
pub const SUPCON_SUMMATION_OUTSIDE: u32 = 0;
/// `SupconOptions::summation`: L_in, inside the log.
pub const SUPCON_SUMMATION_INSIDE: u32 = 1;
/// `SupconOptions::denominator`: every other row.
pub const SUPCON_DENOMINATOR_ALL: u32 = 0;
/// `SupconOptions::denominator`: the negatives only.
pub const SUPCON_DENOMINATOR_ONLY_NEGATIVES: u32 = 1;
/// `SupconOptions::denominator`: the negatives and the one positive of each term.
pub const SUPCON_DENOMINATOR_ONE_POSITIVE: u32 = 2;
/// `SupconOptions::no_positive`: ℓ = 0 for an anchor without positives, counted in R'.
pub const SUPCON_NO_POSITIVE_ZERO_AND_COUNT: u32 = 0;
/// `SupconOptions::no_positive`: such anchors are left out of the mean.
pub const SUPCON_NO_POSITIVE_EXCLUDE: u32 = 1;
/// `SupconOptions::no_positive`: such an anchor is an error.
pub const SUPCON_NO_POSITIVE_ERROR: u32 = 2;
/// `SupconOptions::reduction`: the mean over anchors.
pub const SUPCON_REDUCTION_MEAN: u32 = 0;
/// `SupconOptions::reduction`: the sum over anchors.
pub const SUPCON_REDUCTION_SUM: u32 = 1;
/// `SupconOptions::reduction`: one loss per anchor.
pub const SUPCON_REDUCTION_NONE: u32 = 2;

/// `supcon_new`'s backend: CUDA on GPU 0 when it starts, else the CPU backend.
pub const SUPCON_BACKEND_AUTO: u32 = 0;
/// The fused CPU backend.
pub const SUPCON_BACKEND_CPU: u32 = 1;
/// The f64 reference backend.
pub const SUPCON_BACKEND_REFERENCE: u32 = 2;
/// The CUDA backend on GPU 0 (host arrays are copied to and from the device).
pub const SUPCON_BACKEND_CUDA: u32 = 3;

/// Feature element type: `float`.
pub const SUPCON_F32: u32 = 0;
/// Feature element type: IEEE half (`uint16_t` bits).
pub const SUPCON_F16: u32 = 1;
/// Feature element type: bfloat16 (`uint16_t` bits).
pub const SUPCON_BF16: u32 = 2;
/// Feature element type: `double` (its gradient is `double` too).
pub const SUPCON_F64: u32 = 3;

/// `SupconPositives::kind`: SimCLR, the other views of the same sample (`data` unused).
pub const SUPCON_POSITIVES_SIMCLR: u32 = 0;
/// `SupconPositives::kind`: class labels, `int64_t[B]`.
pub const SUPCON_POSITIVES_LABELS: u32 = 1;
/// `SupconPositives::kind`: a weight mask, `float[B·B]`, finite and ≥ 0.
pub const SUPCON_POSITIVES_MASK: u32 = 2;
/// `SupconPositives::kind`: label sets, `uint8_t[B·classes]`, nonzero a member.
pub const SUPCON_POSITIVES_LABEL_SETS: u32 = 3;
/// `SupconPositives::set_weight`: any shared label makes a positive.
pub const SUPCON_SET_WEIGHT_ANY: u32 = 0;
/// `SupconPositives::set_weight`: weighed by the sets' Jaccard index.
pub const SUPCON_SET_WEIGHT_JACCARD: u32 = 1;
/// `SupconPositives::set_weight`: weighed by the share of the anchor's labels.
pub const SUPCON_SET_WEIGHT_FRACTION: u32 = 2;

/// The loss's options (`supcon_options_default` fills in the paper's).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SupconOptions {
    /// τ > 0.
    pub temperature: f64,
    /// τ_b > 0: the loss is scaled by τ/τ_b.
    pub base_temperature: f64,
    /// `SUPCON_CONTRAST_*`.
    pub contrast_mode: u32,
    /// `SUPCON_SUMMATION_*`.
    pub summation: u32,
    /// `SUPCON_DENOMINATOR_*`.
    pub denominator: u32,
    /// `SUPCON_NO_POSITIVE_*`.
    pub no_positive: u32,
    /// `SUPCON_REDUCTION_*`.
    pub reduction: u32,
    /// Nonzero: rows are L2-normalised inside the loss.
    pub normalize: u32,
    /// At most this many positives per anchor (0: no cap).
    pub positives_cap: u64,
}

/// What makes two rows positives.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SupconPositives {
    /// `SUPCON_POSITIVES_*`.
    pub kind: u32,
    /// `SUPCON_SET_WEIGHT_*`, for label sets.
    pub set_weight: u32,
    /// The labels, mask or label sets (see `kind`); unused for SimCLR.
    pub data: *const c_void,
    /// K, the labels of each label set.
    pub classes: usize,
}

/// The configuration and the backend.
#[derive(Debug)]
pub struct SupconHandle {
    loss: SupConLoss,
    backend: AnyBackend,
}

/// A forward pass's O(N) state, for the backward pass.
#[derive(Debug)]
pub struct SupconState {
    state: SavedState,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// The message of the last error on this thread (empty after a success), valid until this
/// thread's next call into the library.
#[no_mangle]
pub extern "C" fn supcon_last_error() -> *const c_char {
    LAST_ERROR.with(|message| message.borrow().as_ptr())
}

/// `sizeof(SupconOptions)` and `sizeof(SupconPositives)` as this library sees them: a caller
/// compiled against another header finds out here.
///
/// # Safety
/// Each pointer is null or points to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn supcon_abi_sizes(options: *mut usize, positives: *mut usize) -> i32 {
    guard(|| {
        // SAFETY: the caller's pointers, checked for null.
        unsafe {
            *out(options, "options")? = size_of::<SupconOptions>();
            *out(positives, "positives")? = size_of::<SupconPositives>();
        }
        Ok(())
    })
}

/// Fills `options` with the paper's loss: τ = τ_b = 0.07, contrast mode all, L_out, every
/// other row in the denominator, no cap, zero-and-count, mean.
///
/// # Safety
/// `options` is null or points to a writable `SupconOptions`.
#[no_mangle]
pub unsafe extern "C" fn supcon_options_default(options: *mut SupconOptions) -> i32 {
    guard(|| {
        let loss = SupConLoss::default();
        // SAFETY: the caller's pointer, checked for null.
        let options = unsafe { out(options, "options")? };
        *options = SupconOptions {
            temperature: loss.temperature(),
            base_temperature: loss.base_temperature(),
            contrast_mode: SUPCON_CONTRAST_ALL,
            summation: SUPCON_SUMMATION_OUTSIDE,
            denominator: SUPCON_DENOMINATOR_ALL,
            no_positive: SUPCON_NO_POSITIVE_ZERO_AND_COUNT,
            reduction: SUPCON_REDUCTION_MEAN,
            normalize: 0,
            positives_cap: 0,
        };
        Ok(())
    })
}

/// A handle for the loss `options` on `backend` (`SUPCON_BACKEND_*`), written to `*handle`.
///
/// # Safety
/// `options` is null or points to a `SupconOptions`; `handle` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn supcon_new(
    options: *const SupconOptions,
    backend: u32,
    handle: *mut *mut SupconHandle,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's pointers, checked for null.
        let (options, handle) = unsafe { (input(options, "options")?, out(handle, "handle")?) };
        let loss = loss_of(options)?;
        let backend = match backend {
            SUPCON_BACKEND_AUTO => AnyBackend::best_available(),
            SUPCON_BACKEND_CPU => AnyBackend::from_name("cpu")?,
            SUPCON_BACKEND_REFERENCE => AnyBackend::from_name("reference")?,
            SUPCON_BACKEND_CUDA => AnyBackend::from_name("cuda")?,
            other => return Err(invalid(format!("unknown backend {other}"))),
        };
        *handle = Box::into_raw(Box::new(SupconHandle { loss, backend }));
        Ok(())
    })
}

/// Frees a handle (null: nothing).
///
/// # Safety
/// `handle` is null or came from `supcon_new` and is not used again.
#[no_mangle]
pub unsafe extern "C" fn supcon_free(handle: *mut SupconHandle) {
    if !handle.is_null() {
        // SAFETY: per this function's contract.
        drop(unsafe { Box::from_raw(handle) });
    }
}

/// Frees a state (null: nothing).
///
/// # Safety
/// `state` is null or came from `supcon_forward` and is not used again.
#[no_mangle]
pub unsafe extern "C" fn supcon_state_free(state: *mut SupconState) {
    if !state.is_null() {
        // SAFETY: per this function's contract.
        drop(unsafe { Box::from_raw(state) });
    }
}

/// The name of the handle's backend (`"cpu"`, `"reference"`, `"cuda"`), a static string.
///
/// # Safety
/// `handle` is null or a live handle.
#[no_mangle]
pub unsafe extern "C" fn supcon_backend_name(handle: *const SupconHandle) -> *const c_char {
    // SAFETY: per this function's contract.
    match unsafe { handle.as_ref() }.map(|handle| handle.backend.name()) {
        Some("cpu") => c"cpu".as_ptr(),
        Some("reference") => c"reference".as_ptr(),
        Some("cuda") => c"cuda".as_ptr(),
        Some(_) => c"other".as_ptr(),
        None => c"".as_ptr(),
    }
}

/// R, the number of anchors of a batch of `batch` samples of `views` views under the handle's
/// contrast mode: the length of the per-anchor losses and of a per-anchor upstream gradient.
///
/// # Safety
/// `handle` is null or a live handle; `anchors` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn supcon_anchors(
    handle: *const SupconHandle,
    batch: usize,
    views: usize,
    anchors: *mut usize,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's pointers, checked for null.
        let (handle, anchors) = unsafe { (input(handle, "handle")?, out(anchors, "anchors")?) };
        *anchors = match handle.loss.contrast_mode() {
            ContrastMode::All => batch
                .checked_mul(views)
                .ok_or_else(|| invalid("B·V overflows"))?,
            ContrastMode::One => batch,
        };
        Ok(())
    })
}

/// The forward pass: the loss into `*loss` (the reduced loss; Σℓ_i under reduction none),
/// ℓ_i of every anchor into `per_anchor` (R doubles; null: not written), and the state for
/// `supcon_backward` into `*state` (null: not kept).
///
/// # Safety
/// `handle` is null or live; `features` null or `B·V·D` elements of `dtype`; `positives` null
/// or a `SupconPositives` whose `data` holds what its kind needs for B samples; `loss` null or
/// writable; `per_anchor` null or R writable doubles; `state` null or writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn supcon_forward(
    handle: *const SupconHandle,
    features: *const c_void,
    dtype: u32,
    batch: usize,
    views: usize,
    dim: usize,
    positives: *const SupconPositives,
    loss: *mut f64,
    per_anchor: *mut f64,
    state: *mut *mut SupconState,
) -> i32 {
    guard(|| {
        // SAFETY: the caller's pointers, checked for null; the arrays per this function's
        // contract.
        unsafe {
            let handle = input(handle, "handle")?;
            let loss = out(loss, "loss")?;
            let batch_arrays = BatchArrays::new(features, dtype, (batch, views, dim), positives)?;
            let output = with_features!(batch_arrays, |z| {
                handle
                    .backend
                    .forward(&handle.loss, z, batch_arrays.positives.view())
            })?;
            *loss = output
                .loss
                .unwrap_or_else(|| output.per_anchor.iter().sum());
            if !per_anchor.is_null() {
                let values = std::slice::from_raw_parts_mut(per_anchor, output.per_anchor.len());
                values.copy_from_slice(output.per_anchor.as_slice().expect("a vector"));
            }
            if !state.is_null() {
                *state = Box::into_raw(Box::new(SupconState {
                    state: output.state,
                }));
            }
        }
        Ok(())
    })
}

/// The backward pass from `state` (`supcon_forward` on the same features and positives):
/// writes ∂(objective)/∂features into `grad` (`float[B·V·D]`, `double` for f64 features). The
/// upstream gradient is one value for a reduced loss, R under reduction none
/// (`upstream_len`).
///
/// # Safety
/// As `supcon_forward`; `state` null or live; `upstream` null or `upstream_len` doubles;
/// `grad` null or `B·V·D` writable elements of the gradient's type.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn supcon_backward(
    handle: *const SupconHandle,
    state: *const SupconState,
    features: *const c_void,
    dtype: u32,
    batch: usize,
    views: usize,
    dim: usize,
    positives: *const SupconPositives,
    upstream: *const f64,
    upstream_len: usize,
    grad: *mut c_void,
) -> i32 {
    guard(|| {
        // SAFETY: as in `supcon_forward`.
        unsafe {
            let handle = input(handle, "handle")?;
            let state = &input(state, "state")?.state;
            let upstream = slice(upstream, upstream_len, "upstream")?;
            let upstream = match handle.loss.reduction() {
                Reduction::None => Upstream::PerAnchor(ArrayView1::from(upstream)),
                _ if upstream.len() == 1 => Upstream::Scalar(upstream[0]),
                _ => return Err(invalid("a reduced loss takes one upstream value")),
            };
            let batch_arrays = BatchArrays::new(features, dtype, (batch, views, dim), positives)?;
            if grad.is_null() {
                return Err(invalid("grad is null"));
            }
            with_features!(batch_arrays, |z| {
                let values = handle.backend.backward(
                    &handle.loss,
                    z,
                    batch_arrays.positives.view(),
                    state,
                    upstream,
                )?;
                write_gradient(&values, grad);
                Ok::<(), Error>(())
            })?;
        }
        Ok(())
    })
}

/// The forward and backward passes in one call, with upstream gradient 1 (every anchor's 1
/// under reduction none): the loss into `*loss` as `supcon_forward` and the gradient into
/// `grad` as `supcon_backward`.
///
/// # Safety
/// As `supcon_forward` and `supcon_backward`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn supcon_forward_backward(
    handle: *const SupconHandle,
    features: *const c_void,
    dtype: u32,
    batch: usize,
    views: usize,
    dim: usize,
    positives: *const SupconPositives,
    loss: *mut f64,
    grad: *mut c_void,
) -> i32 {
    guard(|| {
        // SAFETY: as in `supcon_forward`.
        unsafe {
            let handle = input(handle, "handle")?;
            let loss = out(loss, "loss")?;
            let batch_arrays = BatchArrays::new(features, dtype, (batch, views, dim), positives)?;
            if grad.is_null() {
                return Err(invalid("grad is null"));
            }
            let mode = handle.loss.contrast_mode();
            let anchors = crate::BatchShape::new(batch, views, dim)?.anchors(mode);
            let ones = Array1::from_elem(anchors, 1.0);
            let upstream = match handle.loss.reduction() {
                Reduction::None => Upstream::PerAnchor(ones.view()),
                _ => Upstream::Scalar(1.0),
            };
            with_features!(batch_arrays, |z| {
                let (output, values) = handle.backend.forward_backward(
                    &handle.loss,
                    z,
                    batch_arrays.positives.view(),
                    upstream,
                )?;
                *loss = output
                    .loss
                    .unwrap_or_else(|| output.per_anchor.iter().sum());
                write_gradient(&values, grad);
                Ok::<(), Error>(())
            })?;
        }
        Ok(())
    })
}

/// Runs `body` with the features as an `ArrayView3` of their element type.
macro_rules! with_features {
    ($arrays:expr, |$z:ident| $body:expr) => {
        match $arrays.features {
            Features::F32($z) => $body,
            Features::F16($z) => $body,
            Features::Bf16($z) => $body,
            Features::F64($z) => $body,
        }
    };
}
use with_features;

/// The caller's features, by element type.
enum Features<'a> {
    F32(ArrayView3<'a, f32>),
    F16(ArrayView3<'a, f16>),
    Bf16(ArrayView3<'a, bf16>),
    F64(ArrayView3<'a, f64>),
}

/// The positives, owned where the caller's layout differs from the crate's (label sets as
/// bytes become `bool`s).
enum PositivesArg<'a> {
    SimClr,
    Labels(ArrayView1<'a, i64>),
    Mask(ArrayView2<'a, f32>),
    LabelSets(Array2<bool>, LabelSetWeight),
}

impl PositivesArg<'_> {
    fn view(&self) -> Positives<'_> {
        match self {
            PositivesArg::SimClr => Positives::SimClr,
            PositivesArg::Labels(labels) => Positives::Labels(labels.view()),
            PositivesArg::Mask(mask) => Positives::Mask(mask.view()),
            PositivesArg::LabelSets(sets, weight) => Positives::LabelSets {
                sets: sets.view(),
                weight: *weight,
            },
        }
    }
}

/// A call's features and positives as the crate's views.
struct BatchArrays<'a> {
    features: Features<'a>,
    positives: PositivesArg<'a>,
}

impl BatchArrays<'_> {
    /// # Safety
    /// As `supcon_forward` for `features` and `positives`.
    unsafe fn new(
        features: *const c_void,
        dtype: u32,
        (batch, views, dim): (usize, usize, usize),
        positives: *const SupconPositives,
    ) -> Result<Self, Error> {
        let elements = batch
            .checked_mul(views)
            .and_then(|n| n.checked_mul(dim))
            .ok_or_else(|| invalid("B·V·D overflows"))?;
        let shape = (batch, views, dim);
        // SAFETY: per this function's contract.
        let features = unsafe {
            match dtype {
                SUPCON_F32 => Features::F32(view3(features, elements, shape)?),
                SUPCON_F16 => Features::F16(view3(features, elements, shape)?),
                SUPCON_BF16 => Features::Bf16(view3(features, elements, shape)?),
                SUPCON_F64 => Features::F64(view3(features, elements, shape)?),
                other => return Err(invalid(format!("unknown dtype {other}"))),
            }
        };
        // SAFETY: per this function's contract.
        let positives = unsafe { input(positives, "positives")? };
        let data = positives.data;
        // SAFETY: per this function's contract: `data` holds what the kind needs.
        let positives = unsafe {
            match positives.kind {
                SUPCON_POSITIVES_SIMCLR => PositivesArg::SimClr,
                SUPCON_POSITIVES_LABELS => {
                    PositivesArg::Labels(ArrayView1::from(slice(data.cast(), batch, "labels")?))
                }
                SUPCON_POSITIVES_MASK => {
                    let cells = batch
                        .checked_mul(batch)
                        .ok_or_else(|| invalid("B² overflows"))?;
                    let mask = slice(data.cast::<f32>(), cells, "mask")?;
                    PositivesArg::Mask(ArrayView2::from_shape((batch, batch), mask).expect("B·B"))
                }
                SUPCON_POSITIVES_LABEL_SETS => {
                    let classes = positives.classes;
                    let cells = batch
                        .checked_mul(classes)
                        .ok_or_else(|| invalid("B·K overflows"))?;
                    let bytes = slice(data.cast::<u8>(), cells, "label sets")?;
                    let sets = Array2::from_shape_fn((batch, classes), |(b, k)| {
                        bytes[b * classes + k] != 0
                    });
                    PositivesArg::LabelSets(sets, set_weight(positives.set_weight)?)
                }
                other => return Err(invalid(format!("unknown positives kind {other}"))),
            }
        };
        Ok(BatchArrays {
            features,
            positives,
        })
    }
}

/// `[B, V, D]` features at `pointer`.
///
/// # Safety
/// `pointer` is null or holds `elements` values of `T`, aligned, alive for `'a`.
unsafe fn view3<'a, T>(
    pointer: *const c_void,
    elements: usize,
    shape: (usize, usize, usize),
) -> Result<ArrayView3<'a, T>, Error> {
    // SAFETY: per this function's contract.
    let values = unsafe { slice(pointer.cast::<T>(), elements, "features")? };
    Ok(ArrayView3::from_shape(shape, values).expect("B·V·D elements"))
}

/// `len` values at `pointer` (any pointer when `len` is 0).
///
/// # Safety
/// `pointer` is null or holds `len` values of `T`, aligned, alive for `'a`.
unsafe fn slice<'a, T>(pointer: *const T, len: usize, what: &str) -> Result<&'a [T], Error> {
    if len == 0 {
        return Ok(&[]);
    }
    if pointer.is_null() {
        return Err(invalid(format!("{what} is null")));
    }
    if !pointer.is_aligned() {
        return Err(invalid(format!("{what} is not aligned for its type")));
    }
    // SAFETY: per this function's contract, non-null and aligned (checked).
    Ok(unsafe { std::slice::from_raw_parts(pointer, len) })
}

/// The value at a pointer the caller passes in.
///
/// # Safety
/// `pointer` is null or points to a live `T`.
unsafe fn input<'a, T>(pointer: *const T, what: &str) -> Result<&'a T, Error> {
    // SAFETY: per this function's contract.
    unsafe { pointer.as_ref() }.ok_or_else(|| invalid(format!("{what} is null")))
}

/// The place an output pointer names.
///
/// # Safety
/// `pointer` is null or points to a writable `T`.
unsafe fn out<'a, T>(pointer: *mut T, what: &str) -> Result<&'a mut T, Error> {
    // SAFETY: per this function's contract.
    unsafe { pointer.as_mut() }.ok_or_else(|| invalid(format!("{what} is null")))
}

/// Writes a gradient into the caller's buffer of `values.len()` elements.
///
/// # Safety
/// `grad` holds `values.len()` writable, aligned elements of `G`.
unsafe fn write_gradient<G: GradElement>(values: &ndarray::Array3<G>, grad: *mut c_void) {
    // SAFETY: per this function's contract.
    let grad = unsafe { std::slice::from_raw_parts_mut(grad.cast::<G>(), values.len()) };
    for (g, &value) in grad.iter_mut().zip(values.iter()) {
        *g = value;
    }
}

/// The crate's loss for the caller's options.
fn loss_of(options: &SupconOptions) -> Result<SupConLoss, Error> {
    let pick = |value: u32, what: &str, choices: usize| {
        if (value as usize) < choices {
            Ok(value)
        } else {
            Err(invalid(format!("unknown {what} {value}")))
        }
    };
    let contrast_mode = match pick(options.contrast_mode, "contrast mode", 2)? {
        SUPCON_CONTRAST_ALL => ContrastMode::All,
        _ => ContrastMode::One,
    };
    let summation = match pick(options.summation, "summation", 2)? {
        SUPCON_SUMMATION_OUTSIDE => Summation::Outside,
        _ => Summation::Inside,
    };
    let denominator = match pick(options.denominator, "denominator", 3)? {
        SUPCON_DENOMINATOR_ALL => Denominator::All,
        SUPCON_DENOMINATOR_ONLY_NEGATIVES => Denominator::OnlyNegatives,
        _ => Denominator::OnePositive,
    };
    let no_positive = match pick(options.no_positive, "no-positive policy", 3)? {
        SUPCON_NO_POSITIVE_ZERO_AND_COUNT => NoPositivePolicy::ZeroAndCount,
        SUPCON_NO_POSITIVE_EXCLUDE => NoPositivePolicy::Exclude,
        _ => NoPositivePolicy::Error,
    };
    let reduction = match pick(options.reduction, "reduction", 3)? {
        SUPCON_REDUCTION_MEAN => Reduction::Mean,
        SUPCON_REDUCTION_SUM => Reduction::Sum,
        _ => Reduction::None,
    };
    let builder = SupConLoss::builder()
        .temperature(options.temperature)
        .base_temperature(options.base_temperature)
        .contrast_mode(contrast_mode)
        .summation(summation)
        .denominator(denominator)
        .no_positive(no_positive)
        .reduction(reduction)
        .normalize(options.normalize != 0);
    let builder = match options.positives_cap {
        0 => builder,
        cap => builder.positives_cap(usize::try_from(cap).map_err(|_| invalid("cap too large"))?),
    };
    builder.build()
}

/// The crate's weight of label-set overlaps for `SUPCON_SET_WEIGHT_*`.
fn set_weight(value: u32) -> Result<LabelSetWeight, Error> {
    match value {
        SUPCON_SET_WEIGHT_ANY => Ok(LabelSetWeight::Any),
        SUPCON_SET_WEIGHT_JACCARD => Ok(LabelSetWeight::Jaccard),
        SUPCON_SET_WEIGHT_FRACTION => Ok(LabelSetWeight::Fraction),
        other => Err(invalid(format!("unknown set weight {other}"))),
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidArgument(reason.into())
}

/// The status of an error of the crate.
fn status_of(error: &Error) -> i32 {
    match error {
        Error::Unsupported { .. } => SUPCON_UNSUPPORTED,
        Error::OutOfMemory { .. } => SUPCON_OUT_OF_MEMORY,
        Error::NotCompiledWithCuda
        | Error::KernelsNotBuilt
        | Error::NoCudaDriver
        | Error::NoCudaDevice { .. }
        | Error::UnsupportedComputeCapability { .. }
        | Error::DriverTooOld { .. } => SUPCON_NO_CUDA,
        Error::Cuda { .. } => SUPCON_CUDA_ERROR,
        Error::AnchorWithoutPositives { .. } => SUPCON_ANCHOR_WITHOUT_POSITIVES,
        Error::Collective { .. } | Error::MemoryBank(_) => SUPCON_ERROR,
        _ => SUPCON_INVALID_ARGUMENT,
    }
}

/// Runs `body`, records its error's message (or clears it) and returns its status; a panic
/// becomes `SUPCON_PANIC`.
fn guard(body: impl FnOnce() -> Result<(), Error>) -> i32 {
    let (status, message) = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => (SUPCON_OK, String::new()),
        Ok(Err(error)) => (status_of(&error), error.to_string()),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            (SUPCON_PANIC, format!("internal error (a bug): {reason}"))
        }
    };
    let message = CString::new(message.replace('\0', " ")).expect("no NUL left");
    LAST_ERROR.with(|last| *last.borrow_mut() = message);
    status
}
