//! Durable storage of room logs.

pub mod indexer;
pub mod journal;
pub mod sqlite;
pub mod unsettled;
