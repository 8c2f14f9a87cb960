//! eg-config (being written)
