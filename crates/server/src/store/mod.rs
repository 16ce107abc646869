//! Durable storage of room logs.

pub mod journal;
pub mod sqlite;
pub mod unsettled;
