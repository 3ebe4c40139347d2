//! Integration tests of the `twotower` binary, run as a user would run it.

mod compose;
mod e2e;
mod harness;
mod index;
mod pipeline;
mod prepare;
mod serve;
mod stack;
mod subcommands;
mod train;
