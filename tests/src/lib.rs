//! Workspace-wide checks of Elastic-Guardian.
//!
//! This package holds the tests that look at the workspace as a whole rather
//! than at one crate. Its library part contains the logic those tests use, so
//! that the logic itself can be unit-tested:
//!
//! * [`layering`]: the dependency rule (a crate depends only on crates below it
//!   in the order of `ARCHITECTURE.md`), checked against `cargo metadata`.
//!
//! The integration tests in `tests/tests/` run the checks on the real
//! workspace; `cargo xtask ci` runs them right after clippy, before the slower
//! test suites.

pub mod layering;
