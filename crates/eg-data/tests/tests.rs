//! Integration tests of eg-data (one binary; modules by topic).

mod loader;
