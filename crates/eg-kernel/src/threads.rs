//! The process's compute thread count (`hardware.threads`).
//!
//! candle 0.11 has no setter: its CPU matmul asks `candle_core::utils::get_num_threads()`,
//! which reads `RAYON_NUM_THREADS` on every call, and runs the `gemm` crate on rayon's
//! global pool; its element-wise kernels use a barrier pool sized once, on first use, from
//! `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`). So the count is set by writing both
//! variables and building rayon's global pool before the first tensor operation.
//!
//! The count is recorded in every checkpoint ([`crate::TrainerState::threads`]); a resume
//! with another count is allowed with a warning, since reductions may then round
//! differently in the last bits.

use std::num::NonZeroUsize;

use crate::{Error, Result};

/// Sets the number of compute threads of this process and checks that it took effect.
///
/// Fails with [`Error::InvalidOption`] (naming `hardware.threads`) when rayon's global pool
/// was already started with another count: call it before any tensor operation.
///
/// # Safety
///
/// It writes the process environment (`std::env::set_var`): no other thread may read or
/// write the environment while it runs. Call it at the start of the program, before other
/// threads are started.
pub unsafe fn set_compute_threads(n: NonZeroUsize) -> Result<()> {
    let v = n.to_string();
    // SAFETY: the caller guarantees that no other thread touches the environment now.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", &v);
        std::env::set_var("CANDLE_NUM_THREADS", &v);
    }
    // Err when the global pool already exists; the check below tells whether its size is
    // the one asked for.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n.get())
        .build_global();
    let pool = rayon::current_num_threads();
    let candle = crate::compute_threads();
    if pool != n.get() || candle != n.get() {
        return Err(Error::InvalidOption {
            option: "hardware.threads",
            reason: format!(
                "{} threads asked, but the compute pools already run {pool} (rayon) / {candle} \
                 (candle): the count must be set before any tensor operation",
                n.get()
            ),
        });
    }
    tracing::debug!(threads = n.get(), "compute threads set");
    Ok(())
}
