//! Integration tests: the built binary against kinesalite on loopback and a real HTTP
//! backend on loopback, each started by the test on a free port.

mod actions;
mod authoring;
mod cli;
mod console;
mod damage;
mod decode;
mod docs;
mod dry_run;
mod fanout;
mod faults;
mod fleet;
mod idle;
mod lease;
mod live;
mod obligations;
mod operate;
mod pause;
mod pipeline;
mod preview;
mod resharding;
mod rules;
mod source;
mod support;
