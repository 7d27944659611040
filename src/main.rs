//! `cohort-operator`: the controller (`run`), the CRDs (`crd`), and the commands people use
//! on imports (`trigger`, `history`, `suspend`, `resume`, `approve`, `preview`). Installed as
//! `kubectl-cohort`, the same binary is a kubectl plugin: `kubectl cohort trigger NAME -n NS`.
//! The commands' shape is `cli::args`; `run` is `cli::controller`.

use std::path::PathBuf;
use std::time::Duration;

use cohort_operator::cli;
use cohort_operator::cli::args::{Cli, Command, CrdKind, PreviewArgs, PreviewOutput};
use cohort_operator::cli::controller::start_controller;

fn main() -> anyhow::Result<()> {
    // As a kubectl plugin the binary is `kubectl-cohort`; show that name in help.
    let invoked_as = std::env::args_os()
        .next()
        .and_then(|a| PathBuf::from(a).file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut command = <Cli as clap::CommandFactory>::command();
    if invoked_as.starts_with("kubectl-cohort") {
        command = command.bin_name("kubectl cohort").name("kubectl-cohort");
    }
    let matches = command.get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Crd { reference: true, .. } => print!("{}", cohort_operator::api::reference::markdown()),
        Command::Crd { kind: CrdKind::CohortImport, .. } => print!("{}", cohort_operator::api::crd_yaml()),
        Command::Crd { kind: CrdKind::CohortTrigger, .. } => print!("{}", cohort_operator::api::trigger_crd_yaml()),
        Command::Crd { kind: CrdKind::BrazeDestination, .. } => {
            print!("{}", cohort_operator::api::destination_crd_yaml())
        }
        Command::Crd { kind: CrdKind::ClusterBrazeDestination, .. } => {
            print!("{}", cohort_operator::api::cluster_destination_crd_yaml())
        }
        Command::Controller(args) => start_controller(*args).await?,
        Command::Trigger { name, wait, timeout_seconds, target } => {
            let (client, namespace) = target.client().await?;
            let value = cli::trigger(client.clone(), &namespace, &name).await?;
            println!("cohortimport {namespace}/{name}: run requested ({value})");
            if wait {
                let record =
                    cli::wait_for_request(client, &namespace, &name, &value, Duration::from_secs(timeout_seconds))
                        .await?;
                if let Some(run) = record {
                    println!("run {}: {:?} {}", run.id, run.result, run.message);
                }
            }
        }
        Command::History { name, target } => {
            let (client, namespace) = target.client().await?;
            print!("{}", cli::history(client, &namespace, &name).await?);
        }
        Command::Suspend { name, target } => {
            let (client, namespace) = target.client().await?;
            cli::set_suspend(client, &namespace, &name, true).await?;
            println!("cohortimport {namespace}/{name} suspended");
        }
        Command::Resume { name, target } => {
            let (client, namespace) = target.client().await?;
            cli::set_suspend(client, &namespace, &name, false).await?;
            println!("cohortimport {namespace}/{name} resumed");
        }
        Command::Approve { name, run_id, target } => {
            let (client, namespace) = target.client().await?;
            cli::approve(client, &namespace, &name, &run_id).await?;
            println!("cohortimport {namespace}/{name}: removals of run {run_id} approved");
        }
        Command::Resync { name, run_id, target } => {
            let (client, namespace) = target.client().await?;
            let run_id = cli::resync(client, &namespace, &name, run_id.as_deref()).await?;
            println!(
                "cohortimport {namespace}/{name}: resync of run {run_id} approved; members who left while the \
                 snapshot was lost stay in the Braze cohort"
            );
        }
        Command::Snapshots { all_namespaces, target } => {
            let (client, namespace) = target.client().await?;
            print!("{}", cli::snapshots(client, (!all_namespaces).then_some(namespace.as_str())).await?);
        }
        Command::Preview(args) => preview(*args).await?,
        Command::Version => println!("{}", version_line()),
    }
    Ok(())
}

/// `cohort-operator 0.2.0 (API cohorts.dev/v1alpha1)`: what a bug report or the krew
/// manifest needs to know.
fn version_line() -> String {
    use kube::Resource as _;
    let api = cohort_operator::api::CohortImport::api_version(&());
    format!("cohort-operator {} (API {api})", env!("CARGO_PKG_VERSION"))
}

/// Prints a preview; exits non-zero when it could not be made or the source failed.
async fn preview(args: PreviewArgs) -> anyhow::Result<()> {
    let (client, namespace) = args.target.client().await?;
    let options = cli::preview::PreviewOptions {
        sample: args.sample,
        scratch_dir: args.scratch_dir.unwrap_or_else(std::env::temp_dir),
    };
    let preview = match (&args.file, &args.name) {
        (Some(file), _) => {
            cli::preview::preview_file(client, &namespace, args.target.namespace.is_some(), file, &options).await?
        }
        (None, Some(name)) => cli::preview::preview_named(client, &namespace, name, &options).await?,
        (None, None) => anyhow::bail!("name an import, or give a manifest with -f"),
    };
    match args.output {
        PreviewOutput::Text => print!("{}", preview.text()),
        PreviewOutput::Json => println!("{}", serde_json::to_string_pretty(&preview)?),
    }
    if !preview.ok() {
        std::process::exit(2);
    }
    Ok(())
}
