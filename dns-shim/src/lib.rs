//! The Isthmus DNS shim.
//!
//! Authoritative for the internal domains (`apps.internal` by default): a name whose route is
//! homed in another cluster is answered with the local egress gateway's address; every other
//! name is forwarded to the resolver the platform already has. It must never answer a name it
//! does not know with an address of its own.
//!
//! Status: not built yet (see the DNS shim issue).
