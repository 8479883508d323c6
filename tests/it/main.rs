//! One integration-test binary (one link) driving the real `mediaproxy` binary over loopback.

mod cache;
mod cache_commands;
mod cli;
mod common;
mod copy;
mod defaults;
mod fills;
mod http2;
mod init;
mod lifecycle;
mod local;
mod mastodon;
mod migrate;
mod misses;
mod privacy;
mod readiness;
mod restart;
mod sendfile;
mod upstreams;
