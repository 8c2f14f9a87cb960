//! eg-monitor (being written)
