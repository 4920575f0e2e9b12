//! The weather classifier service: see `main.rs` for how the parts are put together.

pub mod admission;
pub mod arrival;
pub mod body;
pub mod config;
pub mod error;
pub mod http;
pub mod image;
pub mod infer;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod server;
