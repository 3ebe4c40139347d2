//! The command-line surface: every subcommand exists and explains itself.

use crate::harness::Dir;

const SUBCOMMANDS: [&str; 9] = [
    "prepare",
    "train",
    "eval",
    "index",
    "serve",
    "recommend",
    "health",
    "pipeline",
    "bench",
];

#[test]
fn help_lists_every_subcommand() {
    let help = Dir::new().command(&["--help"]).ok();
    for sub in SUBCOMMANDS {
        assert!(help.contains(sub), "`{sub}` missing from --help:\n{help}");
    }
}

#[test]
fn unknown_subcommand_fails_with_usage() {
    let err = Dir::new().command(&["frobnicate"]).fails();
    assert!(err.contains("frobnicate") && err.contains("Usage"), "{err}");
}
