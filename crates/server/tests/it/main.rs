//! The server's integration tests, one binary: each module is an area (rooms, history,
//! limits, the cluster, ...), every test runs real servers on 127.0.0.1 with real sockets.
//! One binary instead of one per file: the server and its dependencies are linked once.

mod common;
mod redis_server;

mod abuse;
mod api;
mod asyncapi;
mod auth;
mod bounded;
mod browser;
mod client_resume;
mod cluster;
mod cluster_scripts;
mod conformance;
mod echo_raw;
mod fuzz_session;
mod history;
mod lifecycle;
mod limits;
mod memory;
mod metrics;
mod openapi;
mod operator;
mod origins;
mod overload;
mod presence_conformance;
mod requests;
mod review;
mod rooms;
mod smoke;
mod web;
mod webhooks;
