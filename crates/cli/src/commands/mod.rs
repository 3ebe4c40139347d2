//! One module per subcommand: parse-time arguments in, a library call, a printed result out.

pub mod bench;
pub mod eval;
pub mod index;
pub mod pipeline;
pub mod prepare;
pub mod recommend;
pub mod serve;
pub mod train;

/// Parses `--device`, turning the library error into a CLI error.
pub fn device(spec: &str) -> anyhow::Result<tch::Device> {
    Ok(towers::parse_device(spec)?)
}
