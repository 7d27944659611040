use clap::{Parser, Subcommand};

/// Keeps analytics cohorts imported into Braze.
#[derive(Parser)]
#[command(name = "cohort-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CohortImport CustomResourceDefinition as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", cohort_operator::api::crd_yaml()),
    }
    Ok(())
}
