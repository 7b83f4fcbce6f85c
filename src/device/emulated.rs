//! [`EmulatedBackend`]: the CUDA kernels run on the CPU through a host emulation of the CUDA
//! execution model (feature `emulation`, for tests).
//!
//! The build script (`build/emulation.rs`) compiles the unmodified `kernels/*.cu` as C++ against
//! `kernels/emu/cuda_emu.h`: one OS thread per CUDA thread, a barrier per `__syncthreads()`,
//! blocks one after another. The backend then runs the same launch sequences (`super::launch`,
//! `super::host`) and launch plan as the CUDA backend, with host memory standing in for device
//! memory, so the kernels' arithmetic, tiling, masking and bounds handling are tested on machines
//! without a GPU. It is slow (a block barrier costs ~0.2 ms): meant for small problems.
//!
//! Freshly allocated "device" buffers are filled with NaN bytes, so an output element a kernel
//! forgets to write shows up as NaN. f64 features are rejected like on the GPU
//! ([`crate::Error::Unsupported`]).

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ffi::{c_char, c_int, CString};
use std::ops::Range;
use std::ptr::{copy_nonoverlapping, NonNull};

use ndarray::{Array3, ArrayView3};

use super::abi::KernelParams;
use super::executor::KernelExecutor;
use super::host;
use super::kernel::Kernel;
use super::plan::LaunchConfig;
use crate::backend::{Backend, ForwardOutput, SavedState, Upstream};
use crate::config::SupConLoss;
use crate::element::Element;
use crate::error::Extent;
use crate::error::{Error, Result};
use crate::inputs::Positives;
use crate::precision::Precision;
use crate::shard::ShardStatistics;

unsafe extern "C" {
    /// kernels/emu/supcon_emu.cpp: runs `kernel` on the grid and returns 0, or a
    /// `SUPCON_EMU_*` error code (kernels/emu/cuda_emu_runtime.h).
    fn supcon_emu_launch(
        kernel: *const c_char,
        grid_x: u32,
        grid_y: u32,
        grid_z: u32,
        block_x: u32,
        block_y: u32,
        block_z: u32,
        dynamic_shared_bytes: usize,
        params: *const u8,
        params_bytes: usize,
    ) -> c_int;
}

/// The CUDA kernels, emulated on the CPU (see the module docs). Same results as the CUDA
/// backend up to the order of floating-point operations inside a thread's code paths (and
/// inside a tensor core's sums). The default, [`Precision::Auto`], runs the tensor-core kernels
/// for f16 and bf16 features, as the CUDA backend does.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmulatedBackend {
    precision: Precision,
}

impl EmulatedBackend {
    /// The emulated kernels of `precision`.
    pub fn with_precision(precision: Precision) -> Self {
        EmulatedBackend { precision }
    }

    /// Which kernels it runs.
    pub fn precision(&self) -> Precision {
        self.precision
    }
}

impl Backend for EmulatedBackend {
    fn name(&self) -> &'static str {
        "emulated"
    }

    fn forward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
    ) -> Result<ForwardOutput> {
        host::forward(
            &mut HostExecutor,
            self.name(),
            self.precision,
            loss,
            features,
            positives,
        )
    }

    fn backward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
    ) -> Result<Array3<T::Grad>> {
        host::backward(
            &mut HostExecutor,
            self.name(),
            self.precision,
            loss,
            features,
            positives,
            state,
            upstream,
        )
    }

    fn forward_shard<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        samples: Range<usize>,
    ) -> Result<ShardStatistics> {
        host::forward_shard(
            &mut HostExecutor,
            self.name(),
            self.precision,
            loss,
            features,
            positives,
            samples,
        )
    }

    fn backward_shard<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
        samples: Range<usize>,
    ) -> Result<Array3<T::Grad>> {
        host::backward_shard(
            &mut HostExecutor,
            self.name(),
            self.precision,
            loss,
            features,
            positives,
            state,
            upstream,
            samples,
        )
    }
}

/// "Device" memory of the emulation: a 256-byte aligned (as the CUDA driver aligns) host allocation of exactly the requested
/// size (so AddressSanitizer flags a kernel access one byte past it), which Rust only touches
/// through raw copies, so kernels may write it through its address like device memory.
pub(crate) struct HostBuffer {
    data: NonNull<u8>,
    layout: Layout,
}

impl HostBuffer {
    /// `bytes` bytes, every one 0xFF (NaN in every float format).
    fn poisoned(bytes: usize) -> Result<Self> {
        let layout = Layout::from_size_align(bytes.max(1), 256).map_err(|_| Error::TooLarge {
            extent: Extent::Bytes,
            requested: bytes as u128,
            limit: isize::MAX as u128,
        })?;
        // SAFETY: the layout has a non-zero size.
        let data =
            NonNull::new(unsafe { alloc(layout) }).unwrap_or_else(|| handle_alloc_error(layout));
        // SAFETY: `data` points to `layout.size()` writable bytes.
        unsafe { data.as_ptr().write_bytes(0xFF, layout.size()) };
        Ok(HostBuffer { data, layout })
    }

    /// The usable size in bytes.
    fn len(&self) -> usize {
        self.layout.size()
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: `data` was allocated in `poisoned` with `layout` and is released only here.
        unsafe { dealloc(self.data.as_ptr(), self.layout) };
    }
}

/// The emulation's executor: host buffers, synchronous launches.
pub(crate) struct HostExecutor;

impl KernelExecutor for HostExecutor {
    type Buffer = HostBuffer;

    fn alloc(&mut self, bytes: usize) -> Result<HostBuffer> {
        HostBuffer::poisoned(bytes)
    }

    fn upload(&mut self, bytes: &[u8]) -> Result<HostBuffer> {
        let buffer = HostBuffer::poisoned(bytes.len())?;
        // SAFETY: the fresh buffer holds at least bytes.len() bytes.
        unsafe { copy_nonoverlapping(bytes.as_ptr(), buffer.data.as_ptr(), bytes.len()) };
        Ok(buffer)
    }

    fn download(&mut self, buffer: &HostBuffer, out: &mut [u8]) -> Result<()> {
        if out.len() > buffer.len() {
            return Err(Error::Cuda {
                operation: format!(
                    "copying {} bytes from a {}-byte emulated buffer",
                    out.len(),
                    buffer.len()
                ),
                code: INVALID_VALUE.0,
                name: INVALID_VALUE.1.into(),
            });
        }
        // SAFETY: in bounds (checked above); launches are synchronous, so no kernel is writing.
        unsafe { copy_nonoverlapping(buffer.data.as_ptr(), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn address(&self, buffer: &HostBuffer) -> u64 {
        buffer.data.as_ptr() as u64
    }

    fn max_dynamic_shared_bytes(&self) -> u64 {
        EMULATED_MAX_DYNAMIC_SHARED_BYTES
    }

    unsafe fn launch<P: KernelParams>(
        &mut self,
        kernel: Kernel,
        config: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        let bytes = bytemuck::bytes_of(params);
        let name = CString::new(kernel.name()).expect("kernel names have no NUL");
        let [grid_x, grid_y, grid_z] = config.grid;
        let [block_x, block_y, block_z] = config.block;
        // SAFETY: `name` is NUL-terminated and `params` valid for the call; the addresses in
        // `params` satisfy this function's contract, which is what the kernels dereference.
        let status = unsafe {
            supcon_emu_launch(
                name.as_ptr(),
                grid_x,
                grid_y,
                grid_z,
                block_x,
                block_y,
                block_z,
                config.dynamic_shared_bytes as usize,
                bytes.as_ptr(),
                bytes.len(),
            )
        };
        if status == 0 {
            return Ok(());
        }
        let name = match status {
            1 => "SUPCON_EMU_UNKNOWN_KERNEL",
            2 => "SUPCON_EMU_BAD_GRID",
            3 => "SUPCON_EMU_BAD_BLOCK",
            4 => "SUPCON_EMU_DYNAMIC_SHARED",
            5 => "SUPCON_EMU_NULL_ARGUMENT",
            6 => "SUPCON_EMU_BAD_PARAMS",
            _ => "SUPCON_EMU_UNKNOWN_STATUS",
        };
        Err(Error::Cuda {
            operation: format!("launching {} (emulated) with {config:?}", kernel.name()),
            code: status,
            name: name.into(),
        })
    }
}

/// The emulation's limit on a launch's dynamic shared memory: sm_90's 227 KiB
/// (`kMaxDynamicSharedBytes`), so that the emulated tests pick the kernels an H100 or H200 runs.
const EMULATED_MAX_DYNAMIC_SHARED_BYTES: u64 = 227 * 1024;

/// The driver's `CUDA_ERROR_INVALID_VALUE`, which a download beyond a buffer would get.
const INVALID_VALUE: (i32, &str) = (1, "CUDA_ERROR_INVALID_VALUE");

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::ffi::CStr;
    use std::mem::{offset_of, size_of};

    use bytemuck::Zeroable;

    use super::*;
    use crate::device::abi::{
        self, BackwardParams, CoefficientParams, FinalizeParams, ForwardParams, ParamsKind,
        PositivesParams, RowScalesParams,
    };
    use crate::device::plan::{
        launch_config, mma_shared_bytes, Stage, COEFFICIENT_THREADS, FINALIZE_THREADS, GRAD_CHUNK,
        MERGE_THREADS, MMA_THREADS, POSITIVES_THREADS, ROW_SCALES_THREADS, ROW_STATISTICS_BYTES,
        TILE_ROWS, TILE_THREADS, WIDE_GRAD_CHUNK,
    };

    unsafe extern "C" {
        fn supcon_emu_params_size(structure: *const c_char) -> usize;
        fn supcon_emu_params_field(
            structure: *const c_char,
            index: usize,
            name: *mut *const c_char,
            offset: *mut usize,
            size: *mut usize,
        ) -> c_int;
        fn supcon_emu_constant(name: *const c_char, value: *mut i64) -> c_int;
        fn supcon_emu_tensor_core_check(name: *const c_char) -> c_int;
    }

    /// (offset, size) of every leaf field of parameter block `structure`, by name ("outer.inner"
    /// for nested ones), as the C++ compiler laid it out.
    fn cpp_fields(structure: &CStr) -> BTreeMap<String, (usize, usize)> {
        let mut fields = BTreeMap::new();
        for index in 0.. {
            let (mut name, mut offset, mut size) = (std::ptr::null(), 0, 0);
            // SAFETY: a NUL-terminated name, valid out-pointers; a returned name is a static C
            // string.
            let found = unsafe {
                supcon_emu_params_field(
                    structure.as_ptr(),
                    index,
                    &mut name,
                    &mut offset,
                    &mut size,
                )
            };
            if found == 0 {
                break;
            }
            // SAFETY: see above.
            let name = unsafe { CStr::from_ptr(name) }.to_str().unwrap().to_owned();
            fields.insert(name, (offset, size));
        }
        fields
    }

    macro_rules! rust_fields {
        // A block that starts with the `SupconProblem` fields, then the `SupconStatistics` ones
        // (SUPCON_PROBLEM_FIELDS and SUPCON_STATISTICS_FIELDS in C++).
        (problem statistics $structure:ident: $($rest:tt)*) => {
            rust_fields!(problem $structure:
                statistics.lse, statistics.lse_lo, statistics.scaled_positive_lse,
                statistics.scaled_positive_lse_lo, statistics.positive_weight,
                statistics.positive_weight_max, statistics.pull, statistics.log_share,
                $($rest)*
            )
        };
        // A block that starts with the `SupconProblem` fields (SUPCON_PROBLEM_FIELDS in C++).
        (problem $structure:ident: $($rest:tt)*) => {
            rust_fields!($structure:
                problem.features, problem.labels, problem.mask, problem.label_sets,
                problem.cap_bounds, problem.row_scales, problem.batch, problem.views, problem.dim, problem.rows,
                problem.anchors, problem.positive_kind, problem.denominator, problem.summation,
                problem.inv_temperature, problem.loss_scale, problem.set_words,
                problem.set_weight, $($rest)*
            )
        };
        ($structure:ident: $($($field:ident).+),* $(,)?) => {{
            let params = $structure::zeroed();
            BTreeMap::from([$((
                stringify!($($field).+).replace(' ', ""),
                (offset_of!($structure, $($field).+), size_of_val(&params.$($field).+)),
            )),*])
        }};
    }

    /// Checks a mirror against the C++ layout: the same fields at the same offsets and sizes,
    /// the same total size, and no padding on either side.
    fn assert_layout<P: KernelParams>(structure: &CStr, rust: BTreeMap<String, (usize, usize)>) {
        // SAFETY: a NUL-terminated name.
        assert_eq!(size_of::<P>(), unsafe {
            supcon_emu_params_size(structure.as_ptr())
        });
        assert_eq!(rust, cpp_fields(structure), "{structure:?}");
        let covered: usize = rust.values().map(|(_, size)| size).sum();
        assert_eq!(covered, size_of::<P>(), "{structure:?}");
    }

    #[test]
    fn params_layouts_match_the_cpp_structs() {
        assert_layout::<ForwardParams>(
            c"SupconForwardParams",
            rust_fields!(problem statistics ForwardParams:
                anchor_loss, partials, anchor_begin, anchor_end,
                column_splits, padding,
            ),
        );
        assert_layout::<FinalizeParams>(
            c"SupconFinalizeParams",
            rust_fields!(FinalizeParams:
                anchor_loss, positive_weight, reduced_loss, anchors_without_positives,
                reduction.anchors, reduction.reduction, reduction.no_positive_policy,
                reduction.padding,
            ),
        );
        assert_layout::<CoefficientParams>(
            c"SupconCoefficientParams",
            rust_fields!(CoefficientParams:
                lse, positive_weight, anchors_without_positives, upstream, grad_coef,
                upstream_scalar, loss_scale, reduction.anchors, reduction.reduction,
                reduction.no_positive_policy, reduction.padding,
            ),
        );
        assert_layout::<BackwardParams>(
            c"SupconBackwardParams",
            rust_fields!(problem statistics BackwardParams:
                grad_coef, grad_features, grad_begin, grad_end,
            ),
        );
        assert_layout::<PositivesParams>(
            c"SupconPositivesParams",
            rust_fields!(problem PositivesParams:
                memberships, bounds, classes, cap,
            ),
        );
        assert_layout::<RowScalesParams>(
            c"SupconRowScalesParams",
            rust_fields!(problem RowScalesParams: scales),
        );
        // An unknown block has no size. SAFETY: a NUL-terminated name.
        assert_eq!(
            unsafe { supcon_emu_params_size(c"NoSuchParams".as_ptr()) },
            0
        );
    }

    fn cpp_constant(name: &CStr) -> i64 {
        let mut value = 0;
        // SAFETY: NUL-terminated name, valid out-pointer.
        let found = unsafe { supcon_emu_constant(name.as_ptr(), &mut value) };
        assert_eq!(found, 1, "the emulation exports no constant {name:?}");
        value
    }

    #[test]
    fn option_codes_and_tile_sizes_match_the_kernels() {
        let expected: [(&CStr, u32); 31] = [
            (c"SUPCON_POSITIVES_SAME_SAMPLE", abi::positives::SAME_SAMPLE),
            (c"SUPCON_POSITIVES_LABELS", abi::positives::LABELS),
            (c"SUPCON_POSITIVES_MASK", abi::positives::MASK),
            (c"SUPCON_POSITIVES_LABEL_SETS", abi::positives::LABEL_SETS),
            (c"SUPCON_LABEL_SET_ANY", abi::label_set_weight::ANY),
            (c"SUPCON_LABEL_SET_JACCARD", abi::label_set_weight::JACCARD),
            (
                c"SUPCON_LABEL_SET_FRACTION",
                abi::label_set_weight::FRACTION,
            ),
            (c"SUPCON_DENOMINATOR_ALL", abi::denominator::ALL),
            (
                c"SUPCON_DENOMINATOR_ONLY_NEGATIVES",
                abi::denominator::ONLY_NEGATIVES,
            ),
            (
                c"SUPCON_DENOMINATOR_ONE_POSITIVE",
                abi::denominator::ONE_POSITIVE,
            ),
            (c"SUPCON_SUMMATION_OUTSIDE", abi::summation::OUTSIDE),
            (c"SUPCON_SUMMATION_INSIDE", abi::summation::INSIDE),
            (c"SUPCON_REDUCTION_MEAN", abi::reduction::MEAN),
            (c"SUPCON_REDUCTION_SUM", abi::reduction::SUM),
            (c"SUPCON_REDUCTION_NONE", abi::reduction::NONE),
            (
                c"SUPCON_NO_POSITIVE_ZERO_AND_COUNT",
                abi::no_positive::ZERO_AND_COUNT,
            ),
            (c"SUPCON_NO_POSITIVE_EXCLUDE", abi::no_positive::EXCLUDE),
            (c"SUPCON_NO_POSITIVE_ERROR", abi::no_positive::ERROR),
            (c"kThreads", TILE_THREADS),
            (c"kTileRows", TILE_ROWS),
            (c"kGradChunk", GRAD_CHUNK),
            (c"kFinalizeThreads", FINALIZE_THREADS),
            (c"kCoefficientThreads", COEFFICIENT_THREADS),
            (c"kMergeThreads", MERGE_THREADS),
            (c"kPositivesThreads", POSITIVES_THREADS),
            (c"kRowScalesThreads", ROW_SCALES_THREADS),
            (c"sizeof(RowStatistics)", ROW_STATISTICS_BYTES as u32),
            (c"tc::kThreads", MMA_THREADS),
            (c"tc::kWideGradCols", WIDE_GRAD_CHUNK),
            (c"tc::kSharedBytesD130", mma_shared_bytes(130, false) as u32),
            (
                c"kMaxDynamicSharedBytes",
                EMULATED_MAX_DYNAMIC_SHARED_BYTES as u32,
            ),
        ];
        for (name, value) in expected {
            assert_eq!(cpp_constant(name), i64::from(value), "{name:?}");
        }
    }

    #[test]
    fn every_kernel_is_registered_and_bad_launches_fail() {
        let params = ForwardParams::zeroed();
        let bytes = bytemuck::bytes_of(&params);
        for kernel in Kernel::ALL {
            let name = CString::new(kernel.name()).unwrap();
            // A zero-sized grid is rejected before any kernel code runs, after the name lookup
            // and the parameter block's size (which this block fails for the other kinds).
            // SAFETY: the launch is refused, so the null addresses are never dereferenced.
            let status = unsafe {
                supcon_emu_launch(
                    name.as_ptr(),
                    0,
                    1,
                    1,
                    128,
                    1,
                    1,
                    0,
                    bytes.as_ptr(),
                    bytes.len(),
                )
            };
            let expected = if kernel.params() == ParamsKind::Forward {
                2
            } else {
                6
            };
            assert_eq!(status, expected, "{}", kernel.name());
        }
        let mut bad = launch_config(Stage::ForwardFinalize, 1, 2, 1);
        bad.dynamic_shared_bytes = EMULATED_MAX_DYNAMIC_SHARED_BYTES as u32 + 1;
        // SAFETY: refused before any kernel code runs.
        let error =
            unsafe { HostExecutor.launch(Kernel::ForwardFinalize, bad, &FinalizeParams::zeroed()) };
        assert!(
            matches!(error, Err(Error::Cuda { code: 4, .. })),
            "{error:?}"
        );
        // SAFETY: refused: unknown kernel.
        let status = unsafe {
            supcon_emu_launch(
                c"no_such_kernel".as_ptr(),
                1,
                1,
                1,
                1,
                1,
                1,
                0,
                bytes.as_ptr(),
                bytes.len(),
            )
        };
        assert_eq!(status, 1);
    }

    /// The twins of mma.sync and ldmatrix against the PTX ISA's fragment layouts, and the
    /// kernels' S and H·Z tiles against plain products (kernels/emu/tensor_core_check.cpp).
    #[test]
    fn tensor_core_fragments_follow_the_ptx_layouts() {
        for check in [
            c"mma_layout",
            c"ldmatrix_layout",
            c"multiply_tile",
            c"multiply_h_tile",
            c"split_tile",
        ] {
            // SAFETY: a NUL-terminated name; the check owns all its memory.
            let mismatches = unsafe { supcon_emu_tensor_core_check(check.as_ptr()) };
            assert_eq!(mismatches, 0, "{check:?}: mismatching elements");
        }
        // SAFETY: as above.
        assert_eq!(
            unsafe { supcon_emu_tensor_core_check(c"none".as_ptr()) },
            -1
        );
    }
}
