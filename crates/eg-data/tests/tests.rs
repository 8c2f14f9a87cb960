//! Integration tests of eg-data (one binary; modules by topic).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may panic

mod labeled;
mod loader;
mod real_text;
mod stream;
mod tokenize;
