//! The user-facing subcommands — `trigger`, `history`, `suspend`, `resume`, `approve`,
//! `preview`, `resync`, `snapshots` — also usable as a kubectl plugin (`kubectl cohort …` when
//! installed as `kubectl-cohort`).
//!
//! They change only what a person may change: the `cohorts.dev/run-requested-at`,
//! `cohorts.dev/approve-removals` and `cohorts.dev/approve-resync` annotations and
//! `spec.suspend`, by merge patch under a
//! field manager of their own. The controller never writes the spec, and these commands
//! never write the status. [`preview`] writes nothing at all.

use std::fmt::Write as _;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::await_condition;
use serde_json::json;

pub mod args;
pub mod controller;
pub mod preview;

use crate::api::{
    APPROVE_REMOVALS_ANNOTATION, APPROVE_RESYNC_ANNOTATION, CohortImport, CohortImportStatus, RUN_REQUESTED_ANNOTATION,
    RunRecord,
};
use crate::snapshot::cluster::{SnapshotListing, list_snapshots};

/// Field manager of the CLI's patches, apart from the controller's.
pub const CLI_FIELD_MANAGER: &str = "kubectl-cohort";

/// How to reach the cluster: `KUBECONFIG` (or `~/.kube/config`, or in-cluster), optionally
/// another context, and the namespace (`-n`, else the context's).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Target {
    /// Namespace of the CohortImport; defaults to the kubeconfig context's.
    #[arg(short = 'n', long = "namespace", global = true)]
    pub namespace: Option<String>,
    /// Kubeconfig context to use instead of the current one.
    #[arg(long = "context", global = true)]
    pub context: Option<String>,
}

impl Target {
    pub async fn client(&self) -> anyhow::Result<(kube::Client, String)> {
        let config = match &self.context {
            None => kube::Config::infer().await?,
            Some(context) => {
                let options = KubeConfigOptions { context: Some(context.clone()), ..Default::default() };
                kube::Config::from_custom_kubeconfig(Kubeconfig::read()?, &options).await?
            }
        };
        let namespace = self.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        Ok((kube::Client::try_from(config)?, namespace))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("CohortImport {namespace}/{name} not found")]
    NotFound { namespace: String, name: String },
    #[error("run request {value} on {namespace}/{name} not finished within {seconds} s")]
    Timeout { namespace: String, name: String, value: String, seconds: u64 },
    #[error(
        "CohortImport {namespace}/{name} has no run blocked for a missing snapshot (Ready reason SnapshotMissing); \
         see `cohort-operator history {name} -n {namespace}`"
    )]
    NothingToResync { namespace: String, name: String },
}

fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(CLI_FIELD_MANAGER.to_owned()), ..Default::default() }
}

async fn patch(
    api: &Api<CohortImport>,
    namespace: &str,
    name: &str,
    body: serde_json::Value,
) -> anyhow::Result<CohortImport> {
    match api.patch(name, &patch_params(), &Patch::Merge(&body)).await {
        Ok(import) => Ok(import),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            Err(CliError::NotFound { namespace: namespace.to_owned(), name: name.to_owned() }.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Asks for one run now: sets `cohorts.dev/run-requested-at` to a new value. Returns it.
pub async fn trigger(client: kube::Client, namespace: &str, name: &str) -> anyhow::Result<String> {
    let api: Api<CohortImport> = Api::namespaced(client, namespace);
    // Nanoseconds make two requests in the same second different values.
    let value = Timestamp::now().to_string();
    patch(&api, namespace, name, json!({ "metadata": { "annotations": { RUN_REQUESTED_ANNOTATION: value } } })).await?;
    Ok(value)
}

/// Waits until the run asked for with `value` has finished; returns its record.
pub async fn wait_for_request(
    client: kube::Client,
    namespace: &str,
    name: &str,
    value: &str,
    timeout: Duration,
) -> anyhow::Result<Option<RunRecord>> {
    let api: Api<CohortImport> = Api::namespaced(client, namespace);
    let handled = {
        let value = value.to_owned();
        move |import: Option<&CohortImport>| {
            import.and_then(|i| i.status.as_ref()).is_some_and(|s| {
                s.last_handled_run_request.as_deref() == Some(value.as_str()) && s.current_run.is_none()
            })
        }
    };
    match tokio::time::timeout(timeout, await_condition(api, name, handled)).await {
        Ok(found) => Ok(found?.and_then(|i| i.status).and_then(|s| s.last_run)),
        Err(_) => Err(CliError::Timeout {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            value: value.to_owned(),
            seconds: timeout.as_secs(),
        }
        .into()),
    }
}

/// Sets `spec.suspend`.
pub async fn set_suspend(client: kube::Client, namespace: &str, name: &str, suspend: bool) -> anyhow::Result<()> {
    let api: Api<CohortImport> = Api::namespaced(client, namespace);
    patch(&api, namespace, name, json!({ "spec": { "suspend": suspend } })).await?;
    Ok(())
}

/// Approves the removals of a blocked run: sets `cohorts.dev/approve-removals` to its id.
pub async fn approve(client: kube::Client, namespace: &str, name: &str, run_id: &str) -> anyhow::Result<()> {
    let api: Api<CohortImport> = Api::namespaced(client, namespace);
    patch(&api, namespace, name, json!({ "metadata": { "annotations": { APPROVE_REMOVALS_ANNOTATION: run_id } } }))
        .await?;
    Ok(())
}

/// Approves a resync of the run blocked because the snapshot was missing (`run_id`, else
/// the one status names): sets `cohorts.dev/approve-resync` to its id. Returns the id.
pub async fn resync(client: kube::Client, namespace: &str, name: &str, run_id: Option<&str>) -> anyhow::Result<String> {
    let api: Api<CohortImport> = Api::namespaced(client, namespace);
    let not_found = || CliError::NotFound { namespace: namespace.to_owned(), name: name.to_owned() };
    let run_id = match run_id {
        Some(id) => id.to_owned(),
        None => {
            let import = api.get_opt(name).await?.ok_or_else(not_found)?;
            import
                .status
                .and_then(|s| s.snapshot_missing_run)
                .ok_or_else(|| CliError::NothingToResync { namespace: namespace.to_owned(), name: name.to_owned() })?
        }
    };
    patch(&api, namespace, name, json!({ "metadata": { "annotations": { APPROVE_RESYNC_ANNOTATION: run_id } } }))
        .await?;
    Ok(run_id)
}

/// The cohort snapshots kept as ConfigMaps (in `namespace`, or everywhere), as a table.
pub async fn snapshots(client: kube::Client, namespace: Option<&str>) -> anyhow::Result<String> {
    Ok(snapshots_table(&list_snapshots(client, namespace).await?))
}

/// Renders snapshots as a table. Pure.
pub fn snapshots_table(listed: &[SnapshotListing]) -> String {
    if listed.is_empty() {
        return "No cohort snapshots (the filesystem store keeps them on its volume instead).\n".into();
    }
    let header = ["NAMESPACE", "SNAPSHOT", "HELD BY", "GENERATION", "MEMBERS", "COMMITTED", "COHORT"];
    let rows: Vec<[String; 7]> = listed
        .iter()
        .map(|s| {
            [
                s.namespace.clone(),
                s.head.clone(),
                if s.released { format!("released (was {})", s.import) } else { s.import.clone() },
                s.generation.to_string(),
                s.members.to_string(),
                s.committed_at.map_or_else(|| "-".into(), |t| t.to_string()),
                s.cohort.clone(),
            ]
        })
        .collect();
    table(&header.map(str::to_owned), &rows)
}

/// Aligned columns, the last one as it is.
fn table<const N: usize>(header: &[String; N], rows: &[[String; N]]) -> String {
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(header).chain(rows) {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            text.push_str(cell);
            if i + 1 < cells.len() {
                text.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// The import's run history as a table.
pub async fn history(client: kube::Client, namespace: &str, name: &str) -> anyhow::Result<String> {
    let api: Api<CohortImport> = Api::namespaced(client, namespace);
    let import = api
        .get_opt(name)
        .await?
        .ok_or_else(|| CliError::NotFound { namespace: namespace.to_owned(), name: name.to_owned() })?;
    Ok(history_table(import.status.as_ref().unwrap_or(&CohortImportStatus::default())))
}

/// Renders status as a summary and a table, newest run first. Pure.
pub fn history_table(status: &CohortImportStatus) -> String {
    let mut out = String::new();
    if let Some(ready) = status.ready() {
        let _ = writeln!(out, "Ready: {} ({}) {}", ready.status, ready.reason, ready.message);
    }
    if let Some(run) = &status.current_run {
        let _ = writeln!(out, "Running: {} ({:?}) since {}", run.id, run.trigger, run.started_at);
    }
    if let Some(next) = &status.next_run_at {
        let _ = writeln!(out, "Next run: {next}");
    }
    if let Some(dry) = &status.last_dry_run {
        let guard = if dry.would_block { "; the removal guard would block it" } else { "" };
        let _ = writeln!(
            out,
            "Last dry run: {} would add {} and remove {} ({} members){guard}",
            dry.run_id, dry.would_add, dry.would_remove, dry.cohort_size
        );
        for (what, ids) in [("adds", &dry.sample_added), ("removes", &dry.sample_removed)] {
            if !ids.is_empty() {
                let _ = writeln!(out, "  sample of {what}: {}", ids.join(", "));
            }
        }
    }
    if status.history.is_empty() {
        out.push_str("No runs yet.\n");
        return out;
    }
    let header = ["RUN", "TRIGGER", "STARTED", "FINISHED", "RESULT", "MEMBERS", "ADDED", "REMOVED", "MESSAGE"];
    let rows: Vec<[String; 9]> = status
        .history
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                format!("{:?}", r.trigger),
                r.started_at.to_string(),
                r.finished_at.map_or_else(|| "-".into(), |t| t.to_string()),
                format!("{:?}", r.result),
                r.cohort_size.to_string(),
                sent_and_found(r.added, r.would_add),
                sent_and_found(r.removed, r.would_remove),
                r.message.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                text.push_str(cell);
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header.map(str::to_owned));
    for row in &rows {
        line(row);
    }
    out
}

/// What a run sent, and what it found when it did not send everything: `0 (would 40)`.
fn sent_and_found(sent: u64, found: Option<u64>) -> String {
    match found {
        Some(found) if found != sent => format!("{sent} (would {found})"),
        _ => sent.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{RunResult, RunTrigger};

    #[test]
    fn history_table_lists_runs_newest_first_in_aligned_columns() {
        let status = CohortImportStatus {
            next_run_at: Some("2026-03-03T06:30:00Z".parse().unwrap()),
            history: vec![
                RunRecord {
                    attempt: None,
                    id: "20260302-063000-beef".into(),
                    trigger: RunTrigger::Scheduled,
                    started_at: "2026-03-02T06:30:00Z".parse().unwrap(),
                    finished_at: Some("2026-03-02T06:30:04Z".parse().unwrap()),
                    result: RunResult::Succeeded,
                    cohort_size: 1200,
                    added: 3,
                    removed: 1,
                    would_add: None,
                    would_remove: None,
                    message: "1200 members: +3 −1 =1197".into(),
                },
                RunRecord {
                    attempt: None,
                    id: "20260301-100000-0001".into(),
                    trigger: RunTrigger::Manual,
                    started_at: "2026-03-01T10:00:00Z".parse().unwrap(),
                    finished_at: None,
                    result: RunResult::Blocked,
                    cohort_size: 0,
                    added: 0,
                    removed: 0,
                    would_add: Some(0),
                    would_remove: Some(40),
                    message: String::new(),
                },
            ],
            ..Default::default()
        };
        let table = history_table(&status);
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(lines[0], "Next run: 2026-03-03T06:30:00Z");
        assert!(lines[1].starts_with("RUN                   TRIGGER    STARTED"), "{table}");
        assert!(
            lines[2].starts_with(
                "20260302-063000-beef  Scheduled  2026-03-02T06:30:00Z  2026-03-02T06:30:04Z  Succeeded  1200"
            ),
            "{table}"
        );
        assert!(lines[3].contains("Manual") && lines[3].contains("Blocked") && lines[3].contains(" - "), "{table}");
        assert!(lines[3].contains("Blocked    0        0      0 (would 40)"), "a blocked run sent nothing: {table}");
        let column = lines[1].find("RESULT").unwrap();
        assert_eq!(&lines[2][column..column + 9], "Succeeded");
    }

    #[test]
    fn the_last_dry_run_is_shown_with_its_sample() {
        let status = CohortImportStatus {
            last_dry_run: Some(crate::api::DryRunSample {
                run_id: "20260302-063000-beef".into(),
                finished_at: "2026-03-02T06:30:04Z".parse().unwrap(),
                cohort_size: 12,
                would_add: 2,
                would_remove: 5,
                would_block: true,
                sample_added: vec!["external_id:a".into(), "external_id:b".into()],
                sample_removed: vec![],
            }),
            ..Default::default()
        };
        let table = history_table(&status);
        assert!(
            table.starts_with(
                "Last dry run: 20260302-063000-beef would add 2 and remove 5 (12 members); the removal guard would \
             block it\n  sample of adds: external_id:a, external_id:b\nNo runs yet.\n"
            ),
            "{table}"
        );
    }

    #[test]
    fn snapshots_table_says_who_holds_each_and_which_are_released() {
        let listed = [
            SnapshotListing {
                namespace: "growth".into(),
                head: "cohort-snapshot-s1-0123456789abcdef".into(),
                cohort: "cohort \"vip\" at https://rest.iad-01.braze.com (partner kubit)".into(),
                import: "vip".into(),
                released: true,
                generation: 4,
                members: 1200,
                committed_at: Some("2026-03-02T06:30:04Z".parse().unwrap()),
            },
            SnapshotListing {
                namespace: "growth".into(),
                head: "cohort-snapshot-s1-fedcba9876543210".into(),
                cohort: "-".into(),
                import: "churn".into(),
                released: false,
                generation: 1,
                members: 3,
                committed_at: None,
            },
        ];
        let table = snapshots_table(&listed);
        let lines: Vec<_> = table.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE  SNAPSHOT                             HELD BY"), "{table}");
        assert!(lines[1].contains("released (was vip)  4           1200     2026-03-02T06:30:04Z"), "{table}");
        assert!(lines[2].contains("  churn  ") && lines[2].ends_with("-"), "{table}");
        assert!(snapshots_table(&[]).starts_with("No cohort snapshots"));
    }

    #[test]
    fn no_runs_says_so() {
        assert_eq!(history_table(&CohortImportStatus::default()), "No runs yet.\n");
    }
}
