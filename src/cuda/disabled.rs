//! The stand-in for [`CudaBackend`] in builds without feature `cuda`: the same name, the same
//! ordinal constructor and the [`Backend`] trait, every call failing with
//! [`Error::NotCompiledWithCuda`], so code that selects backends at run time compiles
//! unchanged. (The constructors from a cudarc context or stream, and the device API, take
//! cudarc types, which only exist with the feature.)

use ndarray::{Array3, ArrayView3};

use crate::backend::{Backend, ForwardOutput, SavedState, Upstream};
use crate::config::SupConLoss;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::inputs::Positives;
use crate::precision::Precision;

/// The CUDA backend of a build without feature `cuda`: it cannot be created.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    /// Uninhabited: no value of this type exists.
    never: std::convert::Infallible,
}

impl CudaBackend {
    /// Always [`Error::NotCompiledWithCuda`].
    ///
    /// # Errors
    /// Always.
    pub fn new(ordinal: usize) -> Result<Self> {
        let _ = ordinal;
        Err(Error::NotCompiledWithCuda)
    }

    /// As the CUDA build's: the same backend with other kernels.
    pub fn with_precision(self, precision: Precision) -> Self {
        let _ = precision;
        match self.never {}
    }

    /// As the CUDA build's.
    pub fn precision(&self) -> Precision {
        match self.never {}
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        match self.never {}
    }

    fn forward<T: Element>(
        &self,
        _loss: &SupConLoss,
        _features: ArrayView3<'_, T>,
        _positives: Positives<'_>,
    ) -> Result<ForwardOutput> {
        match self.never {}
    }

    fn backward<T: Element>(
        &self,
        _loss: &SupConLoss,
        _features: ArrayView3<'_, T>,
        _positives: Positives<'_>,
        _state: &SavedState,
        _upstream: Upstream<'_>,
    ) -> Result<Array3<T::Grad>> {
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_reports_the_missing_feature() {
        assert_eq!(CudaBackend::new(0).unwrap_err(), Error::NotCompiledWithCuda);
    }
}
