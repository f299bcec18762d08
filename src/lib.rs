//! gdpr-consumer: reads a Kinesis stream, runs compliance rules (Rhai) on every record, and
//! calls the backend once per privacy request, durably, with dead letters for what fails.
//!
//! Data flows one way:
//! [`source`] → [`decode`] → [`rules`] → dedup ([`state`]) → [`actions`] → [`state`],
//! wired per shard by [`pipeline`], one worker per shard run by [`supervisor`], set up by
//! [`daemon`]. What each outcome means for the person's request (its actions, jobs and
//! legal clock) is [`requests`], kept by the [`state`].

pub mod actions;
pub mod aws;
pub mod capture;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod control;
pub mod daemon;
pub mod decode;
pub mod dedup;
pub mod diff;
pub mod fanout;
pub mod fleet;
pub mod keys;
pub mod pipeline;
pub mod preview;
pub mod requests;
pub mod rules;
pub mod shutdown;
pub mod source;
pub mod state;
pub mod supervisor;
pub mod telemetry;
