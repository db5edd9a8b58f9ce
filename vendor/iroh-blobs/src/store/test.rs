//! Test harness for store implementations.
