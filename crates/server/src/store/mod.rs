//! Durable storage of room logs.

pub mod sqlite;
