//! Integration tests of eg-hardware: one binary, one module per concern.
//!
//! * `scenarios`: the fixture trees under `tests/fixtures/` (containers with cgroup v1 and v2
//!   limits, a laptop on battery, a server without sensors, NVMe + HDD, malformed files).
//! * `gpu`: NVML decisions with a fake source.
//! * `host`: this machine, checked against `/proc/meminfo`, `nproc` and `/proc/cpuinfo`.
//! * `cgroup_real`: a real cgroup-v1 memory group with a limit (needs root).
//! * `probes`: the bounded storage, GEMM and memory probes and the capacity cache.

// Test helpers outside `#[test]` functions may fail loudly too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cgroup_real;
mod gpu;
mod host;
mod probes;
mod scenarios;
