//! The two-cluster harness for Isthmus end-to-end tests and the local demo.
//!
//! Status: not built yet (see the harness issue). Component tests live beside each crate.

pub mod bench;
