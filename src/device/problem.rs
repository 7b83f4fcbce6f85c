//! The problem encoding: a loss configuration and batch shape checked against what the
//! kernels implement, turned into the parameter block every launch takes, and the device
//! inputs by address.

use super::abi::{self, KernelParams};
use super::executor::KernelExecutor;
use super::kernel::{FeatureType, Kernel, MmaOperands};
use super::plan::{column_splits, launch_config, mma_shared_bytes, GRAD_CHUNK, MAX_GRID_Y};
use crate::config::{Denominator, NoPositivePolicy, Reduction, Summation, SupConLoss};
use crate::element::DType;
use crate::error::{Capability, Error, Extent, Result};
use crate::inputs::BatchShape;
use crate::label_sets::LabelSetWeight;
use crate::precision::Precision;

/// Most rows the kernels index (32-bit row arithmetic with room for one tile).
const MAX_ROWS: usize = i32::MAX as usize;
/// Widest rows the backward kernel covers: `gridDim.y` counts its feature chunks.
const MAX_DIM: usize = (MAX_GRID_Y * GRAD_CHUNK) as usize;

/// The sizes the kernels index with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KernelShape {
    /// N = B·V rows.
    pub rows: u32,
    /// R anchors (rows 0..R).
    pub anchors: u32,
    /// D.
    pub dim: u32,
}

/// A validated problem: options, shape and element type the kernels implement, and what every
/// launch needs to know about them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Problem {
    loss: SupConLoss,
    shape: BatchShape,
    kernel_shape: KernelShape,
    feature_type: FeatureType,
    precision: Precision,
}

impl Problem {
    /// Rejects what the kernels do not implement or cannot index. What needs the data
    /// (lengths of the positives, finiteness: `validate_inputs`) is the caller's, and comes
    /// first on the host path.
    ///
    /// # Errors
    /// [`Error::TooLarge`] (N or D beyond the kernels' indexing), [`Error::Unsupported`] (f64
    /// features).
    pub(crate) fn new(
        backend: &'static str,
        loss: &SupConLoss,
        shape: BatchShape,
        dtype: DType,
        precision: Precision,
    ) -> Result<Self> {
        let unsupported = |capability| Error::Unsupported {
            backend,
            capability,
        };
        let feature_type =
            FeatureType::of(dtype).ok_or(unsupported(Capability::ElementType(dtype)))?;
        let too_large = |extent, requested: usize, limit: usize| Error::TooLarge {
            extent,
            requested: requested as u128,
            limit: limit as u128,
        };
        if shape.rows() > MAX_ROWS {
            return Err(too_large(Extent::Rows, shape.rows(), MAX_ROWS));
        }
        let dim = shape.dim();
        if dim > MAX_DIM {
            return Err(too_large(Extent::Dim, dim, MAX_DIM));
        }
        // All three fit u32: anchors ≤ rows ≤ MAX_ROWS and dim ≤ MAX_DIM.
        let kernel_shape = KernelShape {
            rows: shape.rows() as u32,
            anchors: shape.anchors(loss.contrast_mode()) as u32,
            dim: dim as u32,
        };
        Ok(Problem {
            loss: *loss,
            shape,
            kernel_shape,
            feature_type,
            precision,
        })
    }

    /// The tensor-core operands, if this problem runs on tensor cores on a device that gives
    /// a launch up to `max_dynamic_shared_bytes`: half-precision features under
    /// [`Precision::Auto`] and [`Precision::Bf16x3`], f32 features under `Bf16x3`, when their
    /// shared rows fit, and not under `normalize` (whose row scales only the SIMT kernels
    /// apply). The forward and the backward pass decide alike, so the backward reproduces the
    /// forward's logits bit for bit.
    fn tensor_cores(&self, max_dynamic_shared_bytes: u64) -> Option<MmaOperands> {
        if self.loss.normalize() {
            return None;
        }
        let operands = match (self.precision, self.feature_type) {
            (Precision::F32, _) | (Precision::Auto, FeatureType::F32) => return None,
            (_, FeatureType::F16) => MmaOperands::F16,
            (_, FeatureType::Bf16) => MmaOperands::Bf16,
            (Precision::Bf16x3, FeatureType::F32) => MmaOperands::F32Split,
        };
        let bytes = mma_shared_bytes(self.kernel_shape.dim, operands.split());
        (bytes <= max_dynamic_shared_bytes).then_some(operands)
    }

    /// The kernel of the forward statistics on a device with `max_dynamic_shared_bytes`.
    pub(crate) fn forward_kernel(&self, max_dynamic_shared_bytes: u64) -> Kernel {
        match self.tensor_cores(max_dynamic_shared_bytes) {
            Some(half) => Kernel::MmaForward(half),
            None => Kernel::ForwardStatistics(self.feature_type),
        }
    }

    /// The kernel of `OnePositive`'s second forward pass: the forward statistics' twin, so that
    /// both passes form the same logits.
    pub(crate) fn positive_terms_kernel(&self, max_dynamic_shared_bytes: u64) -> Kernel {
        match self.tensor_cores(max_dynamic_shared_bytes) {
            Some(half) => Kernel::MmaForwardPositiveTerms(half),
            None => Kernel::ForwardPositiveTerms(self.feature_type),
        }
    }

    /// The kernel of the feature gradient on a device with `max_dynamic_shared_bytes`.
    pub(crate) fn backward_kernel(&self, max_dynamic_shared_bytes: u64) -> Kernel {
        match self.tensor_cores(max_dynamic_shared_bytes) {
            Some(operands) => Kernel::MmaBackward {
                operands,
                // Chunks of 256 columns rather than 128 past D = 128: S and H formed half as
                // often (once per tile up to D = 256).
                wide: self.kernel_shape.dim > GRAD_CHUNK,
            },
            None => Kernel::Backward(self.feature_type),
        }
    }

    /// The loss configuration.
    pub(crate) fn loss(&self) -> &SupConLoss {
        &self.loss
    }

    /// The batch shape.
    pub(crate) fn shape(&self) -> BatchShape {
        self.shape
    }

    /// The element type of the features the kernels read.
    pub(crate) fn feature_type(&self) -> FeatureType {
        self.feature_type
    }

    /// R.
    pub(crate) fn anchors(&self) -> usize {
        self.kernel_shape.anchors as usize
    }

    /// The batch, its positives and the options, as every pass's parameter block holds them.
    pub(crate) fn block(&self, inputs: &InputAddresses) -> abi::Problem {
        let (positive_kind, labels, mask) = match inputs.positives {
            PositiveAddresses::SameSample => (abi::positives::SAME_SAMPLE, 0, 0),
            PositiveAddresses::Labels(address) => (abi::positives::LABELS, address, 0),
            PositiveAddresses::Mask(address) => (abi::positives::MASK, 0, address),
            PositiveAddresses::LabelSets { .. } => (abi::positives::LABEL_SETS, 0, 0),
        };
        let (label_sets, set_words, set_weight) = match inputs.positives {
            PositiveAddresses::LabelSets {
                address,
                words,
                weight,
            } => (
                address,
                words,
                match weight {
                    LabelSetWeight::Any => abi::label_set_weight::ANY,
                    LabelSetWeight::Jaccard => abi::label_set_weight::JACCARD,
                    LabelSetWeight::Fraction => abi::label_set_weight::FRACTION,
                },
            ),
            _ => (0, 0, 0),
        };
        let loss = &self.loss;
        abi::Problem {
            features: inputs.features,
            labels,
            mask,
            label_sets,
            cap_bounds: inputs.cap_bounds,
            row_scales: inputs.row_scales,
            // batch and views are factors of rows ≤ MAX_ROWS (checked in `new`): they fit u32.
            batch: self.shape.batch() as u32,
            views: self.shape.views() as u32,
            dim: self.kernel_shape.dim,
            rows: self.kernel_shape.rows,
            anchors: self.kernel_shape.anchors,
            positive_kind,
            denominator: match loss.denominator() {
                Denominator::All => abi::denominator::ALL,
                Denominator::OnlyNegatives => abi::denominator::ONLY_NEGATIVES,
                Denominator::OnePositive => abi::denominator::ONE_POSITIVE,
            },
            summation: match loss.summation() {
                Summation::Outside => abi::summation::OUTSIDE,
                Summation::Inside => abi::summation::INSIDE,
            },
            inv_temperature: loss.temperature().recip() as f32,
            loss_scale: loss.loss_scale() as f32,
            set_words,
            set_weight,
        }
    }

    /// How the per-anchor losses reduce, for the finalisation and coefficient kernels.
    pub(crate) fn reduction_block(&self) -> abi::Reduction {
        let loss = &self.loss;
        abi::Reduction {
            anchors: self.kernel_shape.anchors,
            reduction: match loss.reduction() {
                Reduction::Mean => abi::reduction::MEAN,
                Reduction::Sum => abi::reduction::SUM,
                Reduction::None => abi::reduction::NONE,
            },
            no_positive_policy: match loss.no_positive() {
                NoPositivePolicy::ZeroAndCount => abi::no_positive::ZERO_AND_COUNT,
                NoPositivePolicy::Exclude => abi::no_positive::EXCLUDE,
                NoPositivePolicy::Error => abi::no_positive::ERROR,
            },
            padding: 0,
        }
    }

    /// The column shares of every forward launch of this problem (whatever its anchor range,
    /// so that a pass split into ranges computes the same bits): see [`column_splits`].
    pub(crate) fn column_splits(&self) -> u32 {
        column_splits(self.kernel_shape.anchors, self.kernel_shape.rows)
    }

    /// The rows R and N as the kernels count them.
    pub(crate) fn kernel_shape(&self) -> KernelShape {
        self.kernel_shape
    }

    /// Launches `kernel` with the plan for this problem, covering `rows` rows (see
    /// [`launch_config`]).
    ///
    /// # Safety
    /// As [`KernelExecutor::launch`].
    pub(crate) unsafe fn launch<E: KernelExecutor, P: KernelParams>(
        &self,
        executor: &mut E,
        kernel: Kernel,
        params: &P,
        rows: u32,
    ) -> Result<()> {
        debug_assert_eq!(
            kernel.params(),
            P::KIND,
            "{}'s parameter block",
            kernel.name()
        );
        // The positive-terms kernels run unsplit.
        let column_splits = match kernel {
            Kernel::ForwardStatistics(_) | Kernel::MmaForward(_) => self.column_splits(),
            _ => 1,
        };
        let config = launch_config(kernel.stage(), self.kernel_shape.dim, rows, column_splits);
        // SAFETY: forwarded from this function's contract.
        unsafe { executor.launch(kernel, config, params) }
    }
}

/// What makes two rows positives, with device addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PositiveAddresses {
    /// SimCLR: the other views of the same sample.
    SameSample,
    /// `const int64_t[B]` labels.
    Labels(u64),
    /// `const float[B][B]` weights.
    Mask(u64),
    /// `const uint64_t[B][words]` label-set bitsets and how they weigh.
    LabelSets {
        /// The bitsets' address.
        address: u64,
        /// 64-bit words per set (≥ 1).
        words: u32,
        /// The weight mode.
        weight: LabelSetWeight,
    },
}

/// The device inputs of one call, by address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InputAddresses {
    /// `const T[B][V][D]`, T the problem's feature type.
    pub(crate) features: u64,
    /// The positives.
    pub(crate) positives: PositiveAddresses,
    /// `const uint32_t[B]` per-sample cap bounds under a positives cap (from the host,
    /// `crate::cpu::relation::cap_bounds`, or the device, `super::prepared`), else 0.
    pub(crate) cap_bounds: u64,
    /// `const float[N]` row scales under `normalize` (`super::launch::launch_row_scales` writes
    /// them), else 0.
    pub(crate) row_scales: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_the_kernels_do_not_implement_are_refused() {
        let shape = BatchShape::new(4, 2, 8).unwrap();
        let default = SupConLoss::default();
        let refused = |loss: &SupConLoss, dtype, capability| {
            assert_eq!(
                Problem::new("cuda", loss, shape, dtype, Precision::Auto).unwrap_err(),
                Error::Unsupported {
                    backend: "cuda",
                    capability
                }
            );
        };
        refused(&default, DType::F64, Capability::ElementType(DType::F64));
        let capped = SupConLoss::builder().positives_cap(2).build().unwrap();
        assert!(Problem::new("cuda", &capped, shape, DType::BF16, Precision::Auto).is_ok());
        let one_positive = SupConLoss::builder()
            .denominator(Denominator::OnePositive)
            .build()
            .unwrap();
        let normalized = SupConLoss::builder().normalize(true).build().unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for loss in [&default, &one_positive, &normalized] {
                assert!(Problem::new("cuda", loss, shape, dtype, Precision::Auto).is_ok());
            }
        }
        // The row scales are the SIMT kernels'.
        for precision in [Precision::Auto, Precision::Bf16x3] {
            let problem = Problem::new("cuda", &normalized, shape, DType::F16, precision).unwrap();
            assert_eq!(
                problem.forward_kernel(u64::MAX),
                Kernel::ForwardStatistics(FeatureType::F16)
            );
            assert_eq!(
                problem.backward_kernel(u64::MAX),
                Kernel::Backward(FeatureType::F16)
            );
        }
    }

    #[test]
    fn shapes_beyond_the_kernels_indexing_are_too_large() {
        let loss = SupConLoss::default();
        let problem = |batch, views, dim| {
            let shape = BatchShape::new(batch, views, dim).unwrap();
            Problem::new("cuda", &loss, shape, DType::F32, Precision::F32)
        };
        assert_eq!(
            problem(1 << 31, 1, 3).unwrap_err(),
            Error::TooLarge {
                extent: Extent::Rows,
                requested: 1 << 31,
                limit: MAX_ROWS as u128
            }
        );
        assert_eq!(
            problem(2, 2, MAX_DIM + 1).unwrap_err(),
            Error::TooLarge {
                extent: Extent::Dim,
                requested: MAX_DIM as u128 + 1,
                limit: MAX_DIM as u128
            }
        );
        assert!(problem(MAX_ROWS, 1, 1).is_ok());
        assert!(problem(2, 1, MAX_DIM).is_ok());
    }
}
