//! Durable storage of room logs.

pub mod indexer;
pub mod journal;
pub mod recent_ids;
pub mod sqlite;
pub mod unsettled;
