//! The two-cluster harness for Isthmus: the local demo (`isthmus-demo`), the end-to-end
//! tests of a live migration (`tests/tests/*.rs`), and the benchmarks (`bench`).
//!
//! - [`world`]: two clusters, "diego" and "k8s", on one machine (loopback addresses, or a
//!   network namespace each when run as root), with every Isthmus component as a real
//!   process, app instances, a platform resolver, and clients that call apps by name.
//! - [`kubeapi`]: a Kubernetes API server fixture (HTTPS, tokens, discovery, list/watch) that
//!   kube-rs and the real kubectl talk to in place of a kube-apiserver.
//! - [`tools`]: external programs the tests run (`kubectl`), found or installed.
//! - [`mod@bench`]: the benchmarks (the gateway against HAProxy, and the combined report).

pub mod bench;
pub mod kubeapi;
pub mod tools;
pub mod world;
