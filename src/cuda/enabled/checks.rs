//! The decisions of backend creation, as pure functions of the values the driver reports, so
//! that every error path is unit-tested on machines without a GPU.

use crate::error::{Error, Result};

/// The oldest compute capability the kernels are compiled for (`sm_80`, Ampere): the build script
/// (`build/fatbins.rs`) emits SASS for sm_80 and newer and PTX for compute_90, so older devices
/// have no loadable code.
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// The oldest driver API version (`cuDriverGetVersion`, 1000·major + 10·minor) that loads the
/// kernels: nvcc 13.0 builds them, and its output needs a CUDA 13.0 driver (release ≥ 580).
/// cudarc is built against the 13.0 API too (feature `cuda-13000`), and calling one of its
/// entry points that an older driver lacks would panic, so this is checked before any of them.
pub const MIN_DRIVER_VERSION: i32 = 13_000;

/// `Ok` when the kernels were embedded at build time (`cfg(supcon_kernels_built)`).
pub(crate) fn check_kernels_built(built: bool) -> Result<()> {
    if built {
        Ok(())
    } else {
        Err(Error::KernelsNotBuilt)
    }
}

/// `Ok` when the driver API version can load the kernels.
pub(crate) fn check_driver_version(version: i32) -> Result<()> {
    if version >= MIN_DRIVER_VERSION {
        return Ok(());
    }
    Err(Error::DriverTooOld {
        version,
        required: MIN_DRIVER_VERSION,
    })
}

/// `Ok` when device `ordinal` exists among `count` devices.
pub(crate) fn check_device_ordinal(ordinal: usize, count: usize) -> Result<()> {
    if ordinal < count {
        Ok(())
    } else {
        Err(Error::NoCudaDevice { ordinal, count })
    }
}

/// `Ok` when a device of compute capability `major.minor` runs the kernels.
pub(crate) fn check_compute_capability(major: i32, minor: i32) -> Result<()> {
    if (major, minor) >= MIN_COMPUTE_CAPABILITY {
        Ok(())
    } else {
        Err(Error::UnsupportedComputeCapability { major, minor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_must_be_built() {
        assert_eq!(check_kernels_built(true), Ok(()));
        assert_eq!(check_kernels_built(false), Err(Error::KernelsNotBuilt));
    }

    #[test]
    fn driver_must_speak_cuda_13() {
        assert_eq!(check_driver_version(13_000), Ok(()));
        assert_eq!(check_driver_version(13_020), Ok(()));
        let error = check_driver_version(12_080).unwrap_err();
        assert_eq!(
            error,
            Error::DriverTooOld {
                version: 12_080,
                required: 13_000
            }
        );
        let message = error.to_string();
        assert!(
            message.contains("CUDA 12.8") && message.contains("580"),
            "{message}"
        );
    }

    #[test]
    fn ordinal_must_name_a_present_device() {
        assert_eq!(check_device_ordinal(0, 1), Ok(()));
        assert_eq!(check_device_ordinal(3, 4), Ok(()));
        assert_eq!(
            check_device_ordinal(0, 0),
            Err(Error::NoCudaDevice {
                ordinal: 0,
                count: 0
            })
        );
        assert_eq!(
            check_device_ordinal(2, 2),
            Err(Error::NoCudaDevice {
                ordinal: 2,
                count: 2
            })
        );
    }

    #[test]
    fn compute_capability_must_be_ampere_or_newer() {
        for (major, minor) in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)] {
            assert_eq!(
                check_compute_capability(major, minor),
                Ok(()),
                "{major}.{minor}"
            );
        }
        for (major, minor) in [(7, 5), (7, 0), (6, 1), (3, 5)] {
            assert_eq!(
                check_compute_capability(major, minor),
                Err(Error::UnsupportedComputeCapability { major, minor })
            );
        }
    }
}
