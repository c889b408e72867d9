//! Generated gRPC types and services for the coordinator protocol.
//!
//! This crate owns code generation from `proto/` and nothing else. Generated types stay at the
//! edge: handlers in other crates convert them into domain types.

#![allow(clippy::all, missing_docs)]

/// `mentor.coordinator.v1`: the worker-facing and user-facing services.
pub mod coordinator {
    pub mod v1 {
        tonic::include_proto!("mentor.coordinator.v1");
    }
}
