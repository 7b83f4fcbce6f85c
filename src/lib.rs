#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod any_backend;
mod backend;
mod config;
mod element;
mod error;
mod problem;
pub mod reference;

pub use any_backend::AnyBackend;
pub use backend::{Backend, ForwardOutput, SavedState, Upstream};
pub use config::{
    ContrastMode, Denominator, NoPositivePolicy, Reduction, Summation, SupConLoss,
    SupConLossBuilder,
};
pub use element::{DType, Element, GradElement};
pub use error::{Error, Result};
pub use problem::{validate_inputs, BatchShape, Positives};
pub use reference::ReferenceBackend;
