//! `supra`: parses the command line and runs the command (the commands live in `cli/`).

mod cli;

use clap::{CommandFactory, FromArgMatches};

fn main() {
    // candle attaches a backtrace to its errors whenever RUST_BACKTRACE is set; users get the
    // message alone unless they ask for library backtraces explicitly.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    // `supra train --help` lists the presets, which live in the library as data.
    let matches = cli::Cli::command()
        .mut_subcommand("train", |c| c.after_long_help(supra::train::preset::help()))
        .get_matches();
    let result = cli::Cli::from_arg_matches(&matches)
        .map_err(anyhow::Error::from)
        .and_then(cli::run);
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
