//! Integration tests of eg-memory: live readers on fixture trees (cgroup v1 and v2, PSI),
//! the controller's invariants (property tests), and planning from a configuration and a
//! hardware fixture.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod controller_props;
mod guard_fixtures;
mod live_fixtures;
mod planning;
