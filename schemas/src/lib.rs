//! Event contracts for the event backbone.
//!
//! This crate is where the schema registry lives (see `DESIGN.md` §6 of the
//! project): subjects keyed by CloudEvent `type`, versioned JSON Schemas with
//! compatibility rules, validation at publish and consume time, and the
//! Confluent Schema Registry REST API. It depends on no other crate of the
//! workspace, so services can validate contracts without a broker.
//!
//! It has no public items yet.
