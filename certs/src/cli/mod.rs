//! Pieces of the `isthmus-certs` command line that are worth testing on their own: the TTL
//! syntax and the `inspect` report.

pub(crate) mod inspect;
pub(crate) mod ttl;
