//! Shared by the integration tests: each test binary uses only part of it.
#![allow(dead_code)]

pub mod clock;
pub mod dump;
pub mod eventually;
pub mod gateway;
pub mod postgres_server;
pub mod proxy;
pub mod redis_server;
