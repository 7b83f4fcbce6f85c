//! One value that can be any backend, chosen at run time by name or by availability.

use std::ops::Range;

use ndarray::{Array3, ArrayView3};

use crate::backend::{Backend, ForwardOutput, SavedState, Upstream};
use crate::config::SupConLoss;
use crate::cpu::CpuBackend;
use crate::cuda::CudaBackend;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::inputs::Positives;
use crate::reference::ReferenceBackend;
use crate::shard::ShardStatistics;

/// Any of the crate's backends, dispatching the [`Backend`] calls.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyBackend {
    /// The f64 oracle.
    Reference(ReferenceBackend),
    /// The fused, multithreaded CPU backend.
    Cpu(CpuBackend),
    /// The CUDA kernels on GPU 0 (feature `cuda`).
    Cuda(CudaBackend),
}

impl AnyBackend {
    /// The backend called `name`: `reference`, `cpu`, `cuda` (GPU 0), or `auto` for
    /// [`AnyBackend::best_available`].
    ///
    /// # Errors
    /// [`Error::UnknownBackend`] for any other name; for `cuda`, why it cannot run here
    /// ([`CudaBackend::new`]: no `cuda` feature, driver, device or kernels, or an old GPU).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(Self::best_available()),
            "reference" => Ok(AnyBackend::Reference(ReferenceBackend)),
            "cpu" => Ok(AnyBackend::Cpu(CpuBackend)),
            "cuda" => CudaBackend::new(0).map(AnyBackend::Cuda),
            other => Err(Error::UnknownBackend(other.to_string())),
        }
    }

    /// The fastest backend that works on this machine: CUDA on GPU 0 when it initialises,
    /// else the fused CPU backend.
    pub fn best_available() -> Self {
        match CudaBackend::new(0) {
            Ok(cuda) => AnyBackend::Cuda(cuda),
            Err(_) => AnyBackend::Cpu(CpuBackend),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $backend:ident => $call:expr) => {
        match $self {
            AnyBackend::Reference($backend) => $call,
            AnyBackend::Cpu($backend) => $call,
            AnyBackend::Cuda($backend) => $call,
        }
    };
}

impl Backend for AnyBackend {
    fn name(&self) -> &'static str {
        dispatch!(self, b => b.name())
    }

    fn forward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
    ) -> Result<ForwardOutput> {
        dispatch!(self, b => b.forward(loss, features, positives))
    }

    fn backward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        state: &SavedState,
        upstream: Upstream<'_>,
    ) -> Result<Array3<T::Grad>> {
        dispatch!(self, b => b.backward(loss, features, positives, state, upstream))
    }

    fn forward_backward<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        upstream: Upstream<'_>,
    ) -> Result<(ForwardOutput, Array3<T::Grad>)> {
        dispatch!(self, b => b.forward_backward(loss, features, positives, upstream))
    }

    fn forward_shard<T: Element>(
        &self,
        loss: &SupConLoss,
        features: ArrayView3<'_, T>,
        positives: Positives<'_>,
        samples: Range<usize>,
    ) -> Result<ShardStatistics> {
        dispatch!(self, b => b.forward_shard(loss, features, positives, samples))
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
        dispatch!(self, b => b.backward_shard(loss, features, positives, state, upstream, samples))
    }
}
