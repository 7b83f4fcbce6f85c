//! The inputs of the device API prepared on the device: label sets given as a `[B, K]`
//! multi-hot matrix of bytes are packed into the kernels' bitsets, a positives cap gets its
//! per-sample bounds (`kernels/supcon_positives.cu`), and `normalize` its row scales
//! (`kernels/supcon_normalize.cu`). The host-array path computes the positives on the host
//! (`super::host`) and launches the row scales itself; on the device API the positives are
//! device memory, and reading them back would synchronise the caller's stream.
//!
//! The prepared state is O(B·K/64) words, B bounds and N scales, in one region
//! ([`PreparedLayout`]) that the forward fills and the backward reads again.

use super::abi::PositivesParams;
use super::executor::KernelExecutor;
use super::kernel::Kernel;
use super::launch::launch_row_scales;
use super::problem::{InputAddresses, PositiveAddresses, Problem};
use crate::config::SupConLoss;
use crate::error::{Error, Extent, Result};
use crate::inputs::BatchShape;
use crate::label_sets::LabelSetWeight;

/// Positives in device memory, as the device API receives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResidentPositives {
    /// What the kernels read as it is: SimCLR, labels or a mask.
    Direct(PositiveAddresses),
    /// `const uint8_t[B][classes]` label sets, nonzero bytes the members.
    Memberships {
        address: u64,
        classes: u32,
        weight: LabelSetWeight,
    },
}

impl ResidentPositives {
    /// K for label sets, else `None`: all of the positives the prepared layout depends on.
    pub(crate) fn set_classes(&self) -> Option<u32> {
        match *self {
            ResidentPositives::Memberships { classes, .. } => Some(classes),
            ResidentPositives::Direct(_) => None,
        }
    }
}

/// Where the prepared inputs lie in a region: the packed label sets
/// (`uint64_t[B][1 + words]`, first), then the cap bounds (`uint32_t[B]`), then the row
/// scales (`float[N]`), each on a 256-byte boundary; empty when none is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PreparedLayout {
    batch: usize,
    /// 64-bit words per packed set (at least 1), for label sets.
    set_words: Option<u32>,
    capped: bool,
    /// N, under `normalize`.
    scaled_rows: Option<usize>,
}

impl PreparedLayout {
    const ALIGN: usize = 256;

    /// The layout under `loss` on a batch of `shape`, for label sets of K = `set_classes`
    /// labels or (`None`) other positives.
    pub(crate) fn new(loss: &SupConLoss, shape: BatchShape, set_classes: Option<u32>) -> Self {
        PreparedLayout {
            batch: shape.batch(),
            set_words: set_classes.map(|classes| classes.div_ceil(64).max(1)),
            capped: loss.positives_cap().is_some(),
            scaled_rows: loss.normalize().then(|| shape.rows()),
        }
    }

    /// K of a `[B, K]` multi-hot matrix of bytes as the kernels count it.
    ///
    /// # Errors
    /// [`Error::TooLarge`] for rows of more than `u32::MAX` bytes.
    // The CUDA backend's.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn classes(classes: usize) -> Result<u32> {
        u32::try_from(classes).map_err(|_| Error::TooLarge {
            extent: Extent::Bytes,
            requested: classes as u128,
            limit: u128::from(u32::MAX),
        })
    }

    fn sets_bytes(&self) -> usize {
        self.set_words.map_or(0, |words| {
            (self.batch * (words as usize + 1) * size_of::<u64>()).next_multiple_of(Self::ALIGN)
        })
    }

    fn bounds_bytes(&self) -> usize {
        if self.capped {
            (self.batch * size_of::<u32>()).next_multiple_of(Self::ALIGN)
        } else {
            0
        }
    }

    /// Bytes of the region.
    pub(crate) fn bytes(&self) -> usize {
        let scales = self.scaled_rows.map_or(0, |rows| {
            (rows * size_of::<f32>()).next_multiple_of(Self::ALIGN)
        });
        self.sets_bytes() + self.bounds_bytes() + scales
    }

    /// The inputs the forward and backward kernels read, with the prepared positives in the
    /// region at `base` (unused when [`bytes`](Self::bytes) is 0).
    pub(crate) fn inputs(
        &self,
        features: u64,
        positives: &ResidentPositives,
        base: u64,
    ) -> InputAddresses {
        let positives = match (*positives, self.set_words) {
            (ResidentPositives::Direct(direct), _) => direct,
            (ResidentPositives::Memberships { weight, .. }, Some(words)) => {
                PositiveAddresses::LabelSets {
                    address: base,
                    words,
                    weight,
                }
            }
            (ResidentPositives::Memberships { .. }, None) => {
                unreachable!("a layout for label sets has their words")
            }
        };
        InputAddresses {
            features,
            positives,
            cap_bounds: if self.capped {
                base + self.sets_bytes() as u64
            } else {
                0
            },
            row_scales: if self.scaled_rows.is_some() {
                base + (self.sets_bytes() + self.bounds_bytes()) as u64
            } else {
                0
            },
        }
    }
}

/// Queues the kernels that prepare `positives` in the region at `base` (packing label sets,
/// then the cap bounds, which read them) and the row scales, and returns the inputs of the
/// forward and backward kernels. Nothing is launched when `layout` is empty.
///
/// # Safety
/// `features` and `positives` must address device memory of `executor` as
/// `super::launch::launch_forward` requires (label sets: `B·classes` bytes), and `base`
/// `layout.bytes()` writable bytes, 256-byte aligned, that nothing else reads or writes until
/// the kernels that read them have finished.
pub(crate) unsafe fn prepare<E: KernelExecutor>(
    executor: &mut E,
    problem: &Problem,
    layout: &PreparedLayout,
    features: u64,
    positives: &ResidentPositives,
    base: u64,
) -> Result<InputAddresses> {
    let inputs = layout.inputs(features, positives, base);
    // B ≤ N, which fits u32 (`Problem::new`).
    let batch = problem.shape().batch() as u32;
    let mut params = PositivesParams {
        problem: problem.block(&InputAddresses {
            cap_bounds: 0,
            row_scales: 0,
            ..inputs
        }),
        memberships: 0,
        bounds: inputs.cap_bounds,
        classes: 0,
        cap: problem
            .loss()
            .positives_cap()
            .map_or(0, |cap| u32::try_from(cap.get()).unwrap_or(u32::MAX)),
    };
    if let ResidentPositives::Memberships {
        address, classes, ..
    } = *positives
    {
        params.memberships = address;
        params.classes = classes;
        // SAFETY: the memberships and the region per this function's contract.
        unsafe { problem.launch(executor, Kernel::PackLabelSets, &params, batch)? };
    }
    if inputs.cap_bounds != 0 {
        // SAFETY: as above; the packed sets it reads were queued before it on the stream.
        unsafe { problem.launch(executor, Kernel::CapBounds, &params, batch)? };
    }
    if inputs.row_scales != 0 {
        // SAFETY: the features and the region per this function's contract.
        unsafe { launch_row_scales(executor, problem, features, inputs.row_scales)? };
    }
    Ok(inputs)
}

/// The device's packed sets, cap bounds and row scales against the host's, through the
/// emulated kernels, on a batch whose samples span several 256-sample chunks of the bounds
/// kernel's sweep.
#[cfg(all(test, feature = "emulation"))]
mod tests {
    use ndarray::{Array1, Array2};

    use super::*;
    use crate::cpu::relation::cap_bounds;
    use crate::device::emulated::HostExecutor;
    use crate::device::executor::download_vec;
    use crate::element::DType;
    use crate::inputs::Positives;
    use crate::label_sets::PackedSets;
    use crate::normalize;
    use crate::precision::Precision;

    /// A deterministic scramble of `i` into 0..`n`.
    fn scramble(i: usize, n: usize) -> usize {
        (i.wrapping_mul(2_654_435_761) >> 7) % n
    }

    #[test]
    fn prepared_positives_equal_the_hosts() {
        let (batch, views) = (300, 3);
        let shape = BatchShape::new(batch, views, 4).unwrap();
        // Classes of ~10 samples; a mask of weights in [0, 1] with zeros (also on the diagonal
        // of every third row); K = 130 label sets, some of them empty.
        let labels = Array1::from_shape_fn(batch, |b| scramble(b, 30) as i64 - 7);
        let mask = Array2::from_shape_fn((batch, batch), |(i, j)| {
            let w = scramble(i * batch + j, 5) as f32 / 4.0;
            if i == j && i % 3 == 0 {
                0.0
            } else {
                w
            }
        });
        let sets = Array2::from_shape_fn((batch, 130), |(b, k)| {
            b % 11 != 0 && scramble(b * 130 + k, 40) == 0
        });
        let executor = &mut HostExecutor;
        let labels_buffer = executor
            .upload(bytemuck::cast_slice(labels.as_slice().unwrap()))
            .unwrap();
        let mask_buffer = executor
            .upload(bytemuck::cast_slice(mask.as_slice().unwrap()))
            .unwrap();
        let bytes: Vec<u8> = sets.iter().map(|&m| u8::from(m) * 3).collect();
        let sets_buffer = executor.upload(&bytes).unwrap();
        let weight = LabelSetWeight::Fraction;
        let cases = [
            (
                Positives::SimClr,
                ResidentPositives::Direct(PositiveAddresses::SameSample),
            ),
            (
                Positives::Labels(labels.view()),
                ResidentPositives::Direct(PositiveAddresses::Labels(
                    executor.address(&labels_buffer),
                )),
            ),
            (
                Positives::Mask(mask.view()),
                ResidentPositives::Direct(PositiveAddresses::Mask(executor.address(&mask_buffer))),
            ),
            (
                Positives::LabelSets {
                    sets: sets.view(),
                    weight,
                },
                ResidentPositives::Memberships {
                    address: executor.address(&sets_buffer),
                    classes: 130,
                    weight,
                },
            ),
        ];
        // Caps the own views fill, that end in the first view (for the mask: in the second
        // chunk of samples), in a later view, and that keep everything. The sanitizers' run
        // (SUPCON_TEST_REDUCED_GRID) keeps the packing and both chunks of the sweep: the mask
        // and the label sets under one cap.
        let reduced = std::env::var_os("SUPCON_TEST_REDUCED_GRID").is_some();
        let caps = if reduced {
            vec![Some(230)]
        } else {
            vec![None, Some(2), Some(3), Some(9), Some(230), Some(5000)]
        };
        let cases = if reduced { &cases[2..] } else { &cases[..] };
        for cap in caps {
            let loss = match cap {
                Some(cap) => SupConLoss::builder().positives_cap(cap).build().unwrap(),
                None => SupConLoss::default(),
            };
            let problem =
                Problem::new("emulated", &loss, shape, DType::F32, Precision::F32).unwrap();
            for (host, resident) in cases {
                let what = format!("cap {cap:?} {host:?}");
                let layout = PreparedLayout::new(&loss, shape, resident.set_classes());
                let region = executor.alloc(layout.bytes().max(1)).unwrap();
                let base = executor.address(&region);
                // SAFETY: the positives are uploaded above and alive; the region holds the
                // layout's bytes (the emulation's launches are synchronous).
                let inputs =
                    unsafe { prepare(executor, &problem, &layout, 0, resident, base) }.unwrap();
                let words: Vec<u64> = download_vec(executor, &region, layout.bytes() / 8).unwrap();
                if let PositiveAddresses::LabelSets { words: per_set, .. } = inputs.positives {
                    let packed = PackedSets::new("host", &sets.view(), weight).unwrap();
                    let per_set = per_set as usize;
                    assert_eq!(per_set, 3, "{what}");
                    for b in 0..batch {
                        let row = &words[b * (per_set + 1)..(b + 1) * (per_set + 1)];
                        assert_eq!(row[0], packed.size(b), "{what}: |Y_{b}|");
                        assert_eq!(
                            &row[1..],
                            &packed.bits()[b * 3..(b + 1) * 3],
                            "{what}: Y_{b}"
                        );
                    }
                }
                assert_eq!(inputs.cap_bounds != 0, cap.is_some(), "{what}");
                if inputs.cap_bounds != 0 {
                    let offset = ((inputs.cap_bounds - base) / 4) as usize;
                    let all: Vec<u32> = bytemuck::cast_slice(&words).to_vec();
                    let device = &all[offset..offset + batch];
                    let expected = cap_bounds(&loss, shape, host).unwrap();
                    if let Some(b) = (0..batch).find(|&b| device[b] != expected[b]) {
                        panic!(
                            "{what}: sample {b}: device {}, host {}",
                            device[b], expected[b]
                        );
                    }
                }
            }
        }
    }

    /// The row scales of `normalize`: 1/max(‖x‖, ε) as the host computes it in f64, rounded
    /// to f32, negated below ε; f32 rows scaled by 0, 1e-20/D, 1e-12/D (below ε), 1e20/D and
    /// 3e38/D (whose f32 squares overflow), in every element type, by flattened row
    /// (view-major) across several blocks of the kernel's 8 rows.
    #[test]
    fn row_scales_equal_the_hosts() {
        let (batch, views, dim) = (13, 3, 37);
        let shape = BatchShape::new(batch, views, dim).unwrap();
        let loss = SupConLoss::builder().normalize(true).build().unwrap();
        let extreme = [(1, 0.0), (4, 1e-20), (6, 1e-12), (9, 1e20), (11, 3e38)];
        let executor = &mut HostExecutor;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // Rows of ~unit norm, scaled (f32 only: the half types hold neither extreme).
            let features: Vec<f32> = (0..batch * views * dim)
                .map(|k| {
                    let x = ((k * 7919 % 211) as f32 / 105.0 - 1.0) * 0.3;
                    let row = k / dim;
                    match extreme.iter().find(|&&(r, _)| r == row) {
                        Some(&(_, norm)) if dtype == DType::F32 => {
                            (f64::from(x) * norm / dim as f64) as f32
                        }
                        _ => x,
                    }
                })
                .collect();
            let bytes: Vec<u8> = match dtype {
                DType::F32 => bytemuck::cast_slice(&features).to_vec(),
                DType::F16 => bytemuck::cast_slice(
                    &features
                        .iter()
                        .map(|&x| half::f16::from_f32(x))
                        .collect::<Vec<_>>(),
                )
                .to_vec(),
                _ => bytemuck::cast_slice(
                    &features
                        .iter()
                        .map(|&x| half::bf16::from_f32(x))
                        .collect::<Vec<_>>(),
                )
                .to_vec(),
            };
            let problem = Problem::new("emulated", &loss, shape, dtype, Precision::F32).unwrap();
            let buffer = executor.upload(&bytes).unwrap();
            let layout = PreparedLayout::new(&loss, shape, None);
            let region = executor.upload(&vec![0xA5u8; layout.bytes()]).unwrap();
            let (features_at, base) = (executor.address(&buffer), executor.address(&region));
            let positives = ResidentPositives::Direct(PositiveAddresses::SameSample);
            // SAFETY: the features are uploaded above and alive; the region holds the
            // layout's bytes (the emulation's launches are synchronous).
            let inputs =
                unsafe { prepare(executor, &problem, &layout, features_at, &positives, base) }
                    .unwrap();
            assert_eq!(
                inputs.row_scales, base,
                "{dtype:?}: the scales lead the region"
            );
            let scales: Vec<f32> = download_vec(executor, &region, batch * views).unwrap();
            for (row, &scale) in scales.iter().enumerate() {
                // Flattened row r = v·B + b is stored at (b·V + v)·D.
                let (sample, view) = (row % batch, row / batch);
                let at = (sample * views + view) * dim;
                let values = match dtype {
                    DType::F32 => features[at..at + dim].to_vec(),
                    DType::F16 => features[at..at + dim]
                        .iter()
                        .map(|&x| half::f16::from_f32(x).to_f32())
                        .collect(),
                    _ => features[at..at + dim]
                        .iter()
                        .map(|&x| half::bf16::from_f32(x).to_f32())
                        .collect(),
                };
                let norm = normalize::norm(values.iter().map(|&x| f64::from(x)));
                let want = (1.0 / normalize::divisor(norm)) as f32;
                let want = if norm < normalize::EPSILON {
                    -want
                } else {
                    want
                };
                let ulps = (scale.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(
                    ulps <= 1,
                    "{dtype:?} row {row}: device {scale:e}, host {want:e} (norm {norm:e})"
                );
            }
        }
    }
}
