//! The consistency layer of the event backbone.
//!
//! This crate is where the transactional outbox and its relay, the inbox
//! (idempotent consumer), the saga engine and the standalone coordinator
//! service live (see `DESIGN.md` §5 of the project). It builds only on the
//! broker-agnostic [`Publisher`](https://docs.rs/broker-adapters) and
//! `Subscriber` contract of `broker-adapters`, so nothing here knows which
//! broker is configured.
//!
//! It has no public items yet: the outbox, inbox and saga engine are being
//! built on the transport layer, which is complete.
