//! The server over real loopback gRPC, with a model trained and an index built in-process from
//! a small synthetic dataset (one fixture shared by every test).

mod bus;
mod fixture;
mod fuzz;
mod parity;
mod protocol;
mod recommend;
mod reload;
mod state;
