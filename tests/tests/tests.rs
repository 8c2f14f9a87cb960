//! Workspace-wide integration tests (one binary, one module per concern).

mod layering;
