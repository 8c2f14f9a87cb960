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

/// The process-level speed settings [`tune_process`] applies, with the values measured on a
/// 2-core AVX-512 machine (issue 9; `docs/benchmarks.md`, "Process defaults").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessDefaults {
    /// Iterations candle 0.11's element-wise barrier pool spins before parking a worker
    /// (`CANDLE_BARRIER_POOL_SPIN_LIMIT`; candle's own default is 25 000). Spinning workers
    /// take CPU from gemm's rayon workers when there are no spare cores.
    pub spin_limit: u32,
    /// glibc `M_MMAP_THRESHOLD` in bytes: blocks at least this large are `mmap`ed and
    /// returned to the kernel on free (every reuse page-faults and zeroes them again);
    /// smaller ones are kept in the heap.
    pub mmap_threshold: u32,
    /// glibc `M_TRIM_THRESHOLD` in bytes (`None`: never trim, `mallopt(M_TRIM_THRESHOLD,
    /// -1)`): free memory at the top of the heap above this is returned to the kernel.
    pub trim_threshold: Option<u32>,
    /// glibc `M_TOP_PAD` in bytes: extra memory asked from the kernel on each heap growth.
    pub top_pad: u32,
}

impl Default for ProcessDefaults {
    /// The measured defaults of `eg train`.
    fn default() -> Self {
        ProcessDefaults {
            spin_limit: 0,
            mmap_threshold: 32 << 20,
            trim_threshold: None,
            top_pad: 256 << 20,
        }
    }
}

/// One process setting [`tune_process`] looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knob {
    /// `CANDLE_BARRIER_POOL_SPIN_LIMIT`.
    SpinLimit,
    /// glibc `M_MMAP_THRESHOLD` (`MALLOC_MMAP_THRESHOLD_`).
    MmapThreshold,
    /// glibc `M_TRIM_THRESHOLD` (`MALLOC_TRIM_THRESHOLD_`).
    TrimThreshold,
    /// glibc `M_TOP_PAD` (`MALLOC_TOP_PAD_`).
    TopPad,
}

impl Knob {
    /// All settings, in the order [`tune_process`] reports them.
    pub const ALL: [Knob; 4] = [
        Knob::SpinLimit,
        Knob::MmapThreshold,
        Knob::TrimThreshold,
        Knob::TopPad,
    ];

    /// The environment variable that sets it (and that [`tune_process`] respects).
    pub fn env_var(self) -> &'static str {
        match self {
            Knob::SpinLimit => "CANDLE_BARRIER_POOL_SPIN_LIMIT",
            Knob::MmapThreshold => "MALLOC_MMAP_THRESHOLD_",
            Knob::TrimThreshold => "MALLOC_TRIM_THRESHOLD_",
            Knob::TopPad => "MALLOC_TOP_PAD_",
        }
    }

    /// The glibc tunable (`GLIBC_TUNABLES`) that also sets it, for the allocator settings.
    pub fn glibc_tunable(self) -> Option<&'static str> {
        match self {
            Knob::SpinLimit => None,
            Knob::MmapThreshold => Some("glibc.malloc.mmap_threshold"),
            Knob::TrimThreshold => Some("glibc.malloc.trim_threshold"),
            Knob::TopPad => Some("glibc.malloc.top_pad"),
        }
    }

    /// Whether it is a glibc allocator setting.
    pub fn is_allocator(self) -> bool {
        self != Knob::SpinLimit
    }
}

/// What [`tune_process`] did with one setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tuned {
    /// Set to this value by eg (`None`: trimming disabled).
    Applied(Option<u64>),
    /// Left alone because the user set it: the variable (`NAME=value`) found.
    User(String),
    /// Not applicable here (not glibc), or refused by the allocator: why.
    Skipped(&'static str),
}

/// What [`tune_process`] did, setting by setting, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessTuning {
    /// One entry per [`Knob::ALL`].
    pub settings: Vec<(Knob, Tuned)>,
}

impl ProcessTuning {
    /// Whether eg changed anything.
    pub fn applied_any(&self) -> bool {
        self.settings
            .iter()
            .any(|(_, t)| matches!(t, Tuned::Applied(_)))
    }
}

impl std::fmt::Display for ProcessTuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (k, t)) in self.settings.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let name = match k {
                Knob::SpinLimit => "candle spin limit",
                Knob::MmapThreshold => "malloc mmap threshold",
                Knob::TrimThreshold => "malloc trim threshold",
                Knob::TopPad => "malloc top pad",
            };
            match t {
                Tuned::Applied(Some(v)) if k.is_allocator() => write!(f, "{name} {} MiB", v >> 20)?,
                Tuned::Applied(Some(v)) => write!(f, "{name} {v}")?,
                Tuned::Applied(None) => write!(f, "{name} off")?,
                Tuned::User(v) => write!(f, "{name} yours ({v})")?,
                Tuned::Skipped(why) => write!(f, "{name} unchanged ({why})")?,
            }
        }
        Ok(())
    }
}

/// Decides, without side effects, what [`tune_process`] applies: each setting gets the
/// default unless the user set it, through its environment variable ([`Knob::env_var`],
/// even empty) or, for the allocator, through `GLIBC_TUNABLES` ([`Knob::glibc_tunable`]).
/// `env` reads a variable; `glibc` says whether the allocator is glibc's.
pub fn plan_tuning(
    defaults: &ProcessDefaults,
    env: impl Fn(&str) -> Option<String>,
    glibc: bool,
) -> ProcessTuning {
    let tunables = env("GLIBC_TUNABLES").unwrap_or_default();
    let settings = Knob::ALL
        .into_iter()
        .map(|k| {
            if let Some(v) = env(k.env_var()) {
                return (k, Tuned::User(format!("{}={v}", k.env_var())));
            }
            if let Some(t) = k.glibc_tunable()
                && let Some(item) = tunables
                    .split(':')
                    .find(|item| item.split('=').next() == Some(t))
            {
                return (k, Tuned::User(format!("GLIBC_TUNABLES {item}")));
            }
            let value = match k {
                Knob::SpinLimit => Some(u64::from(defaults.spin_limit)),
                Knob::MmapThreshold => Some(u64::from(defaults.mmap_threshold)),
                Knob::TrimThreshold => defaults.trim_threshold.map(u64::from),
                Knob::TopPad => Some(u64::from(defaults.top_pad)),
            };
            if k.is_allocator() && !glibc {
                return (k, Tuned::Skipped("not glibc's allocator"));
            }
            (k, Tuned::Applied(value))
        })
        .collect();
    ProcessTuning { settings }
}

/// Applies the process-level speed settings of `defaults` (issue 9), each unless the user
/// set it (see [`plan_tuning`]), and returns what it did, for the log:
///
/// - candle's barrier-pool spin limit, through `CANDLE_BARRIER_POOL_SPIN_LIMIT`, which
///   candle reads once, when its element-wise pool starts (on the first parallel op);
/// - on glibc targets, the allocator's mmap threshold, trim threshold and top pad through
///   `mallopt`, so large freed tensor buffers stay in the heap instead of being unmapped and
///   page-faulted (and zeroed) again by the next allocation. Elsewhere nothing is changed
///   and every allocator setting is reported as [`Tuned::Skipped`]. The memory this keeps
///   is given back by [`release_free_memory`] (the memory guard calls it when it shrinks).
///
/// Measured on 2 cores (`docs/benchmarks.md`, issue 9): with candle's autograd the allocator
/// settings took 11–13 % off a 6.3M-parameter step and the spin limit 0 another 10–20 % with
/// 2 threads on 2 cores (quiet machine); with the fused Llama step they halve the page faults
/// at 6.3M and cut them by a quarter at 110M. The price is peak RSS: +7…+10 % on the
/// autograd path with LoRA adapters (`eg_memory`'s `heap_retention` term), ±3 % otherwise.
///
/// # Safety
///
/// It writes the process environment (`std::env::set_var`): no other thread may read or
/// write the environment while it runs. Call it at the start of the program, before other
/// threads are started and before the first tensor operation (candle reads the spin limit
/// once).
pub unsafe fn tune_process(defaults: &ProcessDefaults) -> ProcessTuning {
    let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
    let mut plan = plan_tuning(defaults, |k| std::env::var(k).ok(), glibc);
    for (k, t) in &mut plan.settings {
        let Tuned::Applied(v) = *t else { continue };
        if *k == Knob::SpinLimit {
            let v = v.unwrap_or(0).to_string();
            // SAFETY: the caller guarantees that no other thread touches the environment now.
            unsafe { std::env::set_var(k.env_var(), v) };
        } else if !set_allocator(*k, v) {
            *t = Tuned::Skipped("refused by mallopt");
        }
    }
    tracing::debug!(tuning = %plan, "process tuned");
    plan
}

/// Sets one glibc allocator setting (`None`: -1, i.e. off); false when refused.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_allocator(k: Knob, v: Option<u64>) -> bool {
    let param = match k {
        Knob::MmapThreshold => libc::M_MMAP_THRESHOLD,
        Knob::TrimThreshold => libc::M_TRIM_THRESHOLD,
        Knob::TopPad => libc::M_TOP_PAD,
        Knob::SpinLimit => return false,
    };
    let Ok(value) = v.map_or(Ok(-1), libc::c_int::try_from) else {
        return false;
    };
    // SAFETY: mallopt only changes the allocator's parameters; glibc serialises it with the
    // arenas' locks.
    unsafe { libc::mallopt(param, value) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_allocator(_k: Knob, _v: Option<u64>) -> bool {
    false
}

/// Returns the allocator's free memory to the kernel (glibc `malloc_trim(0)`: the top of
/// every heap and the free pages inside them); true when some was released. A no-op
/// returning false elsewhere. [`tune_process`] makes the allocator keep freed memory for
/// speed; call this when the process should shrink (the memory guard does after its
/// decisions).
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases free memory; it takes the arenas' locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn plan(vars: &[(&str, &str)], glibc: bool) -> ProcessTuning {
        let env: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        plan_tuning(&ProcessDefaults::default(), |k| env.get(k).cloned(), glibc)
    }

    fn get(p: &ProcessTuning, k: Knob) -> Tuned {
        p.settings
            .iter()
            .find(|(x, _)| *x == k)
            .map(|(_, t)| t.clone())
            .unwrap()
    }

    #[test]
    fn empty_environment_gets_every_default() {
        let d = ProcessDefaults::default();
        let p = plan(&[], true);
        assert_eq!(p.settings.len(), 4);
        assert_eq!(
            get(&p, Knob::SpinLimit),
            Tuned::Applied(Some(u64::from(d.spin_limit)))
        );
        assert_eq!(
            get(&p, Knob::MmapThreshold),
            Tuned::Applied(Some(u64::from(d.mmap_threshold)))
        );
        assert_eq!(
            get(&p, Knob::TrimThreshold),
            Tuned::Applied(d.trim_threshold.map(u64::from))
        );
        assert_eq!(
            get(&p, Knob::TopPad),
            Tuned::Applied(Some(u64::from(d.top_pad)))
        );
        assert!(p.applied_any());
    }

    #[test]
    fn user_variables_are_respected_one_by_one() {
        let p = plan(
            &[
                ("CANDLE_BARRIER_POOL_SPIN_LIMIT", "25000"),
                ("MALLOC_TRIM_THRESHOLD_", "131072"),
            ],
            true,
        );
        assert_eq!(
            get(&p, Knob::SpinLimit),
            Tuned::User("CANDLE_BARRIER_POOL_SPIN_LIMIT=25000".into())
        );
        assert_eq!(
            get(&p, Knob::TrimThreshold),
            Tuned::User("MALLOC_TRIM_THRESHOLD_=131072".into())
        );
        assert!(matches!(get(&p, Knob::MmapThreshold), Tuned::Applied(_)));
        assert!(matches!(get(&p, Knob::TopPad), Tuned::Applied(_)));
        // Set but empty still counts as the user's.
        let p = plan(&[("MALLOC_TOP_PAD_", "")], true);
        assert_eq!(
            get(&p, Knob::TopPad),
            Tuned::User("MALLOC_TOP_PAD_=".into())
        );
    }

    #[test]
    fn glibc_tunables_are_respected() {
        let p = plan(
            &[(
                "GLIBC_TUNABLES",
                "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536",
            )],
            true,
        );
        assert_eq!(
            get(&p, Knob::MmapThreshold),
            Tuned::User("GLIBC_TUNABLES glibc.malloc.mmap_threshold=65536".into())
        );
        // Other tunables do not count; a prefix is not a match.
        assert!(matches!(get(&p, Knob::TrimThreshold), Tuned::Applied(_)));
        let p = plan(&[("GLIBC_TUNABLES", "glibc.malloc.top_pad_x=1")], true);
        assert!(matches!(get(&p, Knob::TopPad), Tuned::Applied(_)));
    }

    #[test]
    fn without_glibc_only_the_spin_limit_is_set() {
        let p = plan(&[], false);
        assert!(matches!(get(&p, Knob::SpinLimit), Tuned::Applied(Some(_))));
        for k in [Knob::MmapThreshold, Knob::TrimThreshold, Knob::TopPad] {
            assert_eq!(get(&p, k), Tuned::Skipped("not glibc's allocator"));
        }
        // The user's variable is still reported as theirs.
        let p = plan(&[("MALLOC_TOP_PAD_", "0")], false);
        assert_eq!(
            get(&p, Knob::TopPad),
            Tuned::User("MALLOC_TOP_PAD_=0".into())
        );
    }

    #[test]
    fn the_log_line_names_each_setting() {
        let p = plan(&[("MALLOC_TOP_PAD_", "0")], true);
        let s = p.to_string();
        assert!(s.contains("candle spin limit 0"), "{s}");
        assert!(s.contains("malloc mmap threshold 32 MiB"), "{s}");
        assert!(s.contains("malloc trim threshold off"), "{s}");
        assert!(
            s.contains("malloc top pad yours (MALLOC_TOP_PAD_=0)"),
            "{s}"
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_defaults_and_values_beyond_int_are_refused() {
        let d = ProcessDefaults::default();
        assert!(set_allocator(
            Knob::MmapThreshold,
            Some(u64::from(d.mmap_threshold))
        ));
        assert!(set_allocator(Knob::TrimThreshold, None));
        assert!(set_allocator(Knob::TopPad, Some(u64::from(d.top_pad))));
        // mallopt takes a C int.
        assert!(!set_allocator(Knob::TopPad, Some(1 << 40)));
    }
}
