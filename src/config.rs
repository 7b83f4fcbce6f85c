//! The loss configuration: every option of docs/math.md, validated once when built.

use std::num::NonZeroUsize;

use crate::error::{Error, Result};

/// Which rows act as anchors (docs/math.md, "Inputs and notation").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ContrastMode {
    /// Every one of the N = B·V rows is an anchor.
    #[default]
    All,
    /// Only view 0 of each sample (rows `0..B`) is an anchor.
    One,
}

/// Where the average over positives sits relative to the log (the paper's Eq. 2 vs Eq. 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Summation {
    /// L_out (Eq. 2): the mean over positives outside the log. The paper's recommendation.
    #[default]
    Outside,
    /// L_in (Eq. 3): the mean over positives inside the log.
    Inside,
}

/// What the softmax's denominator runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Denominator {
    /// All contrasts except the anchor itself.
    #[default]
    All,
    /// Negatives only (rows that are neither the anchor nor a positive).
    OnlyNegatives,
    /// For each positive p: `e^{s_ip}` plus all negatives.
    OnePositive,
}

/// What happens to an anchor that has no positive (`P_i = 0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NoPositivePolicy {
    /// ℓ_i = 0 and the anchor still counts in the mean (the original code since Dec 2023).
    #[default]
    ZeroAndCount,
    /// The mean runs over anchors that have a positive (pytorch-metric-learning). If none has,
    /// the loss is 0.
    Exclude,
    /// Fail with [`Error::AnchorWithoutPositives`].
    Error,
}

/// How per-anchor losses become the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reduction {
    /// Σ ℓ_i / R' (R' depends on the [`NoPositivePolicy`]).
    #[default]
    Mean,
    /// Σ ℓ_i.
    Sum,
    /// No reduction: the per-anchor vector is the output.
    None,
}

/// A validated SupCon loss configuration, the Rust twin of PyTorch's `SupConLoss(...)` module.
///
/// Build one with [`SupConLoss::builder`] (every option) or take [`SupConLoss::default`]
/// (τ = τ_b = 0.07, contrast mode all, L_out, denominator all, no cap, zero-and-count, mean,
/// no normalisation).
///
/// ```
/// use supcon::{ContrastMode, SupConLoss};
/// let loss = SupConLoss::builder()
///     .temperature(0.1)
///     .contrast_mode(ContrastMode::One)
///     .build()?;
/// assert_eq!(loss.temperature(), 0.1);
/// assert!(SupConLoss::builder().temperature(0.0).build().is_err());
/// # Ok::<(), supcon::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SupConLoss {
    temperature: f64,
    base_temperature: f64,
    contrast_mode: ContrastMode,
    summation: Summation,
    denominator: Denominator,
    positives_cap: Option<NonZeroUsize>,
    no_positive: NoPositivePolicy,
    reduction: Reduction,
    normalize: bool,
}

impl Default for SupConLoss {
    fn default() -> Self {
        Self {
            temperature: 0.07,
            base_temperature: 0.07,
            contrast_mode: ContrastMode::All,
            summation: Summation::Outside,
            denominator: Denominator::All,
            positives_cap: None,
            no_positive: NoPositivePolicy::ZeroAndCount,
            reduction: Reduction::Mean,
            normalize: false,
        }
    }
}

impl SupConLoss {
    /// A builder starting from the defaults.
    pub fn builder() -> SupConLossBuilder {
        SupConLossBuilder {
            loss: Self::default(),
            positives_cap: None,
        }
    }

    /// A builder starting from this configuration, to derive a variant of it.
    ///
    /// ```
    /// use supcon::SupConLoss;
    /// let loss = SupConLoss::builder().temperature(0.1).build()?;
    /// let normalized = loss.to_builder().normalize(true).build()?;
    /// assert_eq!((normalized.temperature(), normalized.normalize()), (0.1, true));
    /// # Ok::<(), supcon::Error>(())
    /// ```
    pub fn to_builder(&self) -> SupConLossBuilder {
        SupConLossBuilder {
            loss: *self,
            positives_cap: self.positives_cap.map(NonZeroUsize::get),
        }
    }

    /// τ: logits are `z_i·z_j / τ`.
    pub fn temperature(&self) -> f64 {
        self.temperature
    }
    /// τ_b: the loss is scaled by τ/τ_b.
    pub fn base_temperature(&self) -> f64 {
        self.base_temperature
    }
    /// The scale c = τ/τ_b applied to every per-anchor loss.
    pub fn loss_scale(&self) -> f64 {
        self.temperature / self.base_temperature
    }
    /// Which rows are anchors.
    pub fn contrast_mode(&self) -> ContrastMode {
        self.contrast_mode
    }
    /// L_out or L_in.
    pub fn summation(&self) -> Summation {
        self.summation
    }
    /// What the denominator runs over.
    pub fn denominator(&self) -> Denominator {
        self.denominator
    }
    /// The positives cap (`None`: no cap); see [`SupConLossBuilder::positives_cap`].
    pub fn positives_cap(&self) -> Option<NonZeroUsize> {
        self.positives_cap
    }
    /// The policy for anchors without positives.
    pub fn no_positive(&self) -> NoPositivePolicy {
        self.no_positive
    }
    /// The reduction.
    pub fn reduction(&self) -> Reduction {
        self.reduction
    }
    /// Whether the loss normalises each feature row first; see [`SupConLossBuilder::normalize`].
    pub fn normalize(&self) -> bool {
        self.normalize
    }
}

/// Builder for [`SupConLoss`]; [`build`](Self::build) validates.
#[derive(Debug, Clone)]
pub struct SupConLossBuilder {
    loss: SupConLoss,
    // Kept unvalidated (a plain usize) so that `positives_cap(0)` is reported by `build`.
    positives_cap: Option<usize>,
}

impl SupConLossBuilder {
    /// τ (default 0.07); finite and > 0.
    pub fn temperature(mut self, temperature: f64) -> Self {
        self.loss.temperature = temperature;
        self
    }
    /// τ_b (default 0.07); finite and > 0. `scale_by_temperature` in other code bases is τ_b = 1.
    pub fn base_temperature(mut self, base_temperature: f64) -> Self {
        self.loss.base_temperature = base_temperature;
        self
    }
    /// Anchors: all rows (default) or view 0 only.
    pub fn contrast_mode(mut self, mode: ContrastMode) -> Self {
        self.loss.contrast_mode = mode;
        self
    }
    /// L_out (default) or L_in.
    pub fn summation(mut self, summation: Summation) -> Self {
        self.loss.summation = summation;
        self
    }
    /// Denominator variant (default: all).
    pub fn denominator(mut self, denominator: Denominator) -> Self {
        self.loss.denominator = denominator;
        self
    }
    /// Cap the positives per anchor at `cap` (≥ 1). The anchor's other views always stay, even
    /// more than `cap` of them; positives of other samples fill the remaining room, lowest row
    /// index first. Dropped positives leave numerator and denominator.
    pub fn positives_cap(mut self, cap: usize) -> Self {
        self.positives_cap = Some(cap);
        self
    }
    /// Remove the cap (the default).
    pub fn no_positives_cap(mut self) -> Self {
        self.positives_cap = None;
        self
    }
    /// Policy for anchors without positives (default: zero and count).
    pub fn no_positive(mut self, policy: NoPositivePolicy) -> Self {
        self.loss.no_positive = policy;
        self
    }
    /// Reduction (default: mean).
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.loss.reduction = reduction;
        self
    }

    /// Normalise each feature row first (default off): the loss is computed on
    /// u = x / max(‖x‖, 1e-12), exactly as `torch.nn.functional.normalize(x, dim=-1)`, and
    /// the gradient is the exact ∂L/∂x (docs/math.md, "Fused normalisation").
    pub fn normalize(mut self, normalize: bool) -> Self {
        self.loss.normalize = normalize;
        self
    }

    /// Validates and returns the loss.
    ///
    /// # Errors
    /// [`Error::InvalidTemperature`], [`Error::InvalidBaseTemperature`] (≤ 0, NaN, infinite),
    /// [`Error::InvalidPositivesCap`] (cap of 0).
    pub fn build(self) -> Result<SupConLoss> {
        let mut loss = self.loss;
        if !(loss.temperature.is_finite() && loss.temperature > 0.0) {
            return Err(Error::InvalidTemperature(loss.temperature));
        }
        if !(loss.base_temperature.is_finite() && loss.base_temperature > 0.0) {
            return Err(Error::InvalidBaseTemperature(loss.base_temperature));
        }
        loss.positives_cap = match self.positives_cap {
            None => None,
            Some(cap) => Some(NonZeroUsize::new(cap).ok_or(Error::InvalidPositivesCap)?),
        };
        Ok(loss)
    }
}
