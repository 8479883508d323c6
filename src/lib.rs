//! mediaproxy: a caching media reverse proxy for Mastodon.
//!
//! A request goes `key` → `local` → `cache` → upstreams (`resolve`, `upstream`) → `respond`; `server` owns the
//! sockets and `runtime` the state a reload swaps. `main.rs` is only the CLI.

pub mod admin;
pub mod cache;
pub mod check;
pub mod checksum;
pub mod cmd;
pub mod config;
pub mod copy;
pub mod envfile;
pub mod health;
pub mod key;
pub mod keys;
pub mod keyset;
pub mod local;
pub mod logwriter;
pub mod metrics;
pub mod object;
pub mod proxy;
pub mod resolve;
pub mod respond;
pub mod runtime;
pub mod server;
pub mod unix_time;
pub mod upstream;
pub mod zerocopy;
