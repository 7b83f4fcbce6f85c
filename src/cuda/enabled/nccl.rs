//! NCCL collectives for the sharded loss (feature `nccl`): [`NcclGroup`] implements
//! [`Collectives`] with cudarc's `nccl` module, libnccl loaded at run time.
//!
//! The sharded loss hands the collectives host bytes (the features of host arrays, O(n)
//! statistics). Each operation stages them through the rank's GPU: NCCL all-gathers equal
//! counts, so the ranks first all-gather their lengths (one `u64` each), then every rank pads
//! its bytes to the longest, all-gathers them and cuts the padding off again. Two collectives
//! and two copies per operation, on the rank's stream, synchronised before returning.
//!
//! cudarc looks for `libnccl.so` (not `libnccl.so.2`): a system with only the versioned file, as
//! PyTorch's `nvidia-nccl` wheel ships it, needs a `libnccl.so` link on `LD_LIBRARY_PATH`.
//! Without the library, construction fails with [`Error::Collective`], never a panic.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use cudarc::nccl::{result::NcclError, Comm, Id};

use super::executor::driver_error;
use crate::distributed::Collectives;
use crate::error::{Error, Result};

/// One rank of an NCCL communicator, on a CUDA stream of its GPU.
#[derive(Debug)]
pub struct NcclGroup {
    comm: Comm,
}

/// The id rank 0 creates and every other rank receives (through the launcher's own channel)
/// before joining: [`NcclGroup::new_id`], [`NcclGroup::from_rank`].
pub type NcclId = [std::ffi::c_char; 128];

pub(super) fn nccl_error(operation: &'static str) -> impl FnOnce(NcclError) -> Error {
    move |error| Error::Collective {
        operation,
        reason: format!("NCCL error {:?}", error.0),
    }
}

/// Fails unless libnccl can be loaded (cudarc panics on a call into a library it cannot load).
fn check_library() -> Result<()> {
    // SAFETY: loading a library by name runs its initialisers, which NCCL's are fit for.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Collective {
            operation: "nccl",
            reason: "libnccl.so was not found (put a link to libnccl.so.2 on LD_LIBRARY_PATH)"
                .into(),
        })
    }
}

impl NcclGroup {
    /// A group of one rank per stream, all in this process (`ncclCommInitAll`): hand rank r
    /// to a thread that drives `streams[r]`'s GPU.
    ///
    /// # Errors
    /// [`Error::Collective`] without libnccl or when NCCL fails.
    pub fn from_streams(streams: Vec<Arc<CudaStream>>) -> Result<Vec<NcclGroup>> {
        check_library()?;
        let comms = Comm::from_devices(streams).map_err(nccl_error("ncclCommInitAll"))?;
        Ok(comms.into_iter().map(|comm| NcclGroup { comm }).collect())
    }

    /// A fresh id for a group of processes: rank 0 makes it and sends it to the others.
    ///
    /// # Errors
    /// [`Error::Collective`] without libnccl or when NCCL fails.
    pub fn new_id() -> Result<NcclId> {
        check_library()?;
        Ok(*Id::new().map_err(nccl_error("ncclGetUniqueId"))?.internal())
    }

    /// This process's rank `rank` of `world`, joining the group of `id`
    /// (`ncclCommInitRank`; every rank calls it at once).
    ///
    /// # Errors
    /// [`Error::Collective`] without libnccl or when NCCL fails.
    pub fn from_rank(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: NcclId,
    ) -> Result<Self> {
        check_library()?;
        let comm = Comm::from_rank(stream, rank, world, Id::uninit(id))
            .map_err(nccl_error("ncclCommInitRank"))?;
        Ok(NcclGroup { comm })
    }

    /// The communicator, on the stream it was created with.
    pub(super) fn comm(&self) -> &Comm {
        &self.comm
    }

    /// All-gathers `count` values of every rank through the GPU.
    fn gather_equal<T>(&self, values: &[T]) -> Result<Vec<T>>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + cudarc::nccl::NcclType,
        T: Clone + Default,
    {
        let stream = self.comm.stream();
        let send = stream
            .clone_htod(values)
            .map_err(driver_error("copy to the device for an all-gather"))?;
        let mut receive = stream
            .alloc_zeros::<T>(values.len() * self.comm.world_size())
            .map_err(driver_error("allocate an all-gather's buffer"))?;
        self.comm
            .all_gather(&send, &mut receive)
            .map_err(nccl_error("ncclAllGather"))?;
        stream
            .clone_dtoh(&receive)
            .map_err(driver_error("copy an all-gather's result to the host"))
    }
}

impl Collectives for NcclGroup {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let lengths = self.gather_equal(&[bytes.len() as u64])?;
        let longest = lengths.iter().copied().max().unwrap_or(0) as usize;
        let mut padded = bytes.to_vec();
        padded.resize(longest.max(1), 0);
        let gathered = self.gather_equal(&padded)?;
        Ok(gathered
            .chunks_exact(longest.max(1))
            .zip(lengths)
            .map(|(chunk, length)| chunk[..length as usize].to_vec())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without libnccl every constructor is a typed error, not cudarc's panic. (A machine with
    /// the library runs the GPU check's NCCL test instead.)
    #[test]
    fn without_libnccl_every_constructor_is_a_typed_error() {
        // SAFETY: as in `check_library`.
        if unsafe { cudarc::nccl::sys::is_culib_present() } {
            return eprintln!("skipped: libnccl is present");
        }
        let missing = |result: Result<()>| {
            matches!(
                result,
                Err(Error::Collective {
                    operation: "nccl",
                    ..
                })
            )
        };
        assert!(missing(NcclGroup::new_id().map(|_| ())));
        assert!(missing(NcclGroup::from_streams(Vec::new()).map(|_| ())));
    }
}
