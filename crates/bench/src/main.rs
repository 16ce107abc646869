//! The `parley-bench` binary: parse, run, print the human summary or `--json`.

use clap::Parser;
use parley_bench::{run, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = run(&cli.command).await?;
    if cli.command.common().json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{}", report.human());
    }
    if !report.ok() {
        std::process::exit(1);
    }
    Ok(())
}
