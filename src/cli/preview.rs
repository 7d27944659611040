//! `preview`: what the next run of an import would do, found now — sending nothing to Braze
//! and writing nothing to the cluster.
//!
//! It is a run's own first half ([`crate::run::preview_import`]): the source is read the way
//! the controller reads it (Secrets through the one reader, [`KubeObjects`]), sorted within the
//! same memory budget, diffed against the import's live snapshot and put to the removal
//! guard. Only the user's kubeconfig is used, so RBAC decides what a person may preview; the
//! snapshot is read through [`ReadOnlySnapshots`], which refuses every write by type, and no
//! Braze client exists here at all.
//!
//! `preview NAME` previews an applied import. `preview -f FILE` previews a manifest: checked
//! first exactly as the controller checks a spec ([`crate::domain::validate`]), then diffed
//! against the snapshot of the import of that name if it exists (the manifest changes it),
//! or against nothing (a new import sends every member).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use serde::Serialize;

use super::CliError;
use crate::api::{CohortImport, RunTrigger};
use crate::controller::conflict::CohortKey;
use crate::controller::pipeline::cohort_snapshot_key;
use crate::domain::guard::BlockReason;
use crate::domain::validate::{SpecErrors, validate};
use crate::run::{ImportRun, RunReport, identifier_fingerprint, new_run_id, preview_import};
use crate::snapshot::cluster::ClusterSnapshotStore;
use crate::snapshot::{DoubtMeta, Loaded, SnapshotError, SnapshotMeta, SnapshotStore};
use crate::source::kube::KubeObjects;
use crate::source::open_source;

/// Most ids a preview lists per direction (`--sample`).
pub const MAX_SAMPLE: usize = 1000;

/// How to preview.
#[derive(Clone, Debug)]
pub struct PreviewOptions {
    /// Ids listed per direction; at most [`MAX_SAMPLE`].
    pub sample: usize,
    /// Where the cohort is sorted when it does not fit in memory.
    pub scratch_dir: PathBuf,
}

/// Why a preview could not be made (a failing source or snapshot is a [`Preview`] with
/// `error` instead: the counts found before it failed still say something).
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error(transparent)]
    NotFound(#[from] CliError),
    #[error("{}", field_lines(.origin, .errors))]
    InvalidSpec { origin: String, errors: SpecErrors },
    #[error("{path}: {message}")]
    Manifest { path: String, message: String },
    #[error("opening the source failed: {0}")]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("reading CohortImport {namespace}/{name}: {message}")]
    Kube { namespace: String, name: String, message: String },
}

/// One line per broken rule, each naming its field and the fix.
fn field_lines(origin: &str, errors: &SpecErrors) -> String {
    let mut text = format!("{origin} is not valid ({} problems); the controller would not run it:", errors.0.len());
    for e in errors.errors() {
        let _ = write!(text, "\n  {}: {}", e.path, e.problem);
    }
    text
}

/// The removal guard's verdict on the previewed changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict")]
pub enum GuardVerdict {
    /// The run would send its removals.
    Proceed,
    /// The run would be stopped before sending anything, until a person approves it.
    #[serde(rename_all = "camelCase")]
    Block { reason: &'static str, message: String, max_removal_percent: u8 },
}

/// What the next run would do. `-o json` prints exactly this.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Preview {
    pub namespace: String,
    pub name: String,
    pub cohort_id: String,
    /// Whether the import exists in the cluster (false: a manifest not yet applied).
    pub applied: bool,
    /// Members in the source, after normalisation and de-duplication.
    pub cohort_size: u64,
    /// Members Braze holds from the last successful run (the snapshot diffed against; 0 when
    /// there is none).
    pub previous_size: u64,
    pub adds: u64,
    pub removes: u64,
    pub unchanged: u64,
    /// Changes an interrupted run left in doubt, sent again.
    pub resent: u64,
    pub rows: u64,
    pub skipped_rows: u64,
    pub duplicate_rows: u64,
    pub guard: GuardVerdict,
    pub sample_adds: Vec<String>,
    pub sample_removes: Vec<String>,
    pub notes: Vec<String>,
    /// Why the preview could not finish (the source or the snapshot failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Preview {
    /// From the report of [`preview_import`]. Pure.
    pub fn from_report(import: &CohortImport, applied: bool, report: RunReport) -> Self {
        let guard = match &report.blocked {
            None => GuardVerdict::Proceed,
            Some(b) => GuardVerdict::Block {
                reason: match b.reason {
                    BlockReason::EmptySource => "EmptySource",
                    BlockReason::TooManyRemovals => "TooManyRemovals",
                },
                message: b.summary().replace("; nothing sent", ""),
                max_removal_percent: b.max_removal_percent,
            },
        };
        Preview {
            namespace: import.namespace().unwrap_or_default(),
            name: import.name_any(),
            cohort_id: import.spec.cohort.id.clone(),
            applied,
            cohort_size: report.cohort_size,
            previous_size: report.previous_size,
            adds: report.added,
            removes: report.removed,
            unchanged: report.unchanged,
            resent: report.resent,
            rows: report.rows,
            skipped_rows: report.skipped.total(),
            duplicate_rows: report.duplicates,
            guard,
            sample_adds: report.sample_added,
            sample_removes: report.sample_removed,
            notes: report.notes,
            error: report.error.as_ref().map(|e| crate::secret::error_chain(e)),
            hint: report.error.as_ref().and(report.hint),
        }
    }

    /// Whether the preview finished (exit status 0).
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// For people. Pure.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let state = if self.applied { "" } else { " (not applied)" };
        let _ =
            writeln!(out, "CohortImport {}/{}{state} → Braze cohort {:?}", self.namespace, self.name, self.cohort_id);
        let _ = writeln!(out, "Preview only: nothing was sent to Braze and nothing was written.");
        if let Some(error) = &self.error {
            let _ = writeln!(out, "Error: {error}");
            if let Some(hint) = &self.hint {
                let _ = writeln!(out, "Hint: {hint}");
            }
            return out;
        }
        let _ = writeln!(out, "Braze holds:    {} (the snapshot of the last successful run)", self.previous_size);
        let _ = writeln!(out, "Cohort size:    {}", self.cohort_size);
        let _ = writeln!(out, "Adds:           {}", self.adds);
        let _ = writeln!(out, "Removes:        {}", self.removes);
        let _ = writeln!(out, "Unchanged:      {}", self.unchanged);
        if self.resent > 0 {
            let _ = writeln!(out, "Resent:         {} (left in doubt by an interrupted run)", self.resent);
        }
        if self.skipped_rows > 0 || self.duplicate_rows > 0 {
            let _ = writeln!(
                out,
                "Source rows:    {} ({} skipped, {} duplicates)",
                self.rows, self.skipped_rows, self.duplicate_rows
            );
        }
        match &self.guard {
            GuardVerdict::Proceed => out.push_str("Removal guard:  proceed\n"),
            GuardVerdict::Block { message, .. } => {
                let _ = writeln!(out, "Removal guard:  WOULD BLOCK the run: {message}");
            }
        }
        sample_lines(&mut out, "adds", &self.sample_adds, self.adds);
        sample_lines(&mut out, "removes", &self.sample_removes, self.removes);
        for note in &self.notes {
            let _ = writeln!(out, "Note: {note}");
        }
        out
    }
}

fn sample_lines(out: &mut String, what: &str, ids: &[String], total: u64) {
    if ids.is_empty() {
        return;
    }
    let _ = writeln!(out, "Sample of {what} ({} of {total}):", ids.len());
    for id in ids {
        let _ = writeln!(out, "  {id}");
    }
}

/// The snapshot of an import, read and never written: every write is refused, so a preview
/// cannot change what the next run diffs against. `None` inside: no snapshot (a new import).
pub struct ReadOnlySnapshots(Option<ClusterSnapshotStore>);

impl ReadOnlySnapshots {
    fn refused(&self) -> SnapshotError {
        SnapshotError::Io {
            what: self.describe(),
            action: "write",
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "a preview writes nothing"),
        }
    }
}

#[async_trait::async_trait]
impl SnapshotStore for ReadOnlySnapshots {
    fn describe(&self) -> String {
        self.0.as_ref().map_or_else(|| "(none: a new import)".to_owned(), SnapshotStore::describe)
    }

    async fn load(&self, scratch: &Path) -> Result<Loaded, SnapshotError> {
        match &self.0 {
            Some(store) => store.load(scratch).await,
            None => Ok(Loaded::default()),
        }
    }

    async fn record_doubt(&self, _: &DoubtMeta, _: &Path) -> Result<(), SnapshotError> {
        Err(self.refused())
    }

    async fn record_doubt_with_plan(
        &self,
        _: &DoubtMeta,
        _: &Path,
        _: &crate::snapshot::plan::PlanMeta,
        _: &Path,
    ) -> Result<bool, SnapshotError> {
        Err(self.refused())
    }

    async fn checkpoint(
        &self,
        _: &crate::snapshot::plan::PlanMeta,
        _: &crate::snapshot::plan::Progress,
    ) -> Result<(), SnapshotError> {
        Err(self.refused())
    }

    async fn commit(&self, _: &SnapshotMeta, _: &Path) -> Result<(), SnapshotError> {
        Err(self.refused())
    }

    async fn delete(&self) -> Result<(), SnapshotError> {
        Err(self.refused())
    }
}

/// Previews the applied import `namespace/name`.
pub async fn preview_named(
    client: kube::Client,
    namespace: &str,
    name: &str,
    options: &PreviewOptions,
) -> Result<Preview, PreviewError> {
    let live = get_import(&client, namespace, name)
        .await?
        .ok_or_else(|| CliError::NotFound { namespace: namespace.to_owned(), name: name.to_owned() })?;
    let origin = format!("CohortImport {namespace}/{name}");
    preview(client, live.clone(), Some(live), origin, options).await
}

/// Previews the one CohortImport in the manifest `path` (`-` for standard input). Its
/// namespace is the manifest's, else `namespace`.
pub async fn preview_file(
    client: kube::Client,
    namespace: &str,
    namespace_given: bool,
    path: &Path,
    options: &PreviewOptions,
) -> Result<Preview, PreviewError> {
    let shown = path.display().to_string();
    let text =
        if path == Path::new("-") { std::io::read_to_string(std::io::stdin()) } else { std::fs::read_to_string(path) }
            .map_err(|e| PreviewError::Manifest { path: shown.clone(), message: format!("cannot read it: {e}") })?;
    let mut import =
        parse_manifest(&text).map_err(|message| PreviewError::Manifest { path: shown.clone(), message })?;
    let namespace = match import.metadata.namespace.as_deref() {
        Some(ns) if namespace_given && ns != namespace => {
            return Err(PreviewError::Manifest {
                path: shown,
                message: format!("metadata.namespace is {ns:?} but -n says {namespace:?}; drop -n or make them agree"),
            });
        }
        Some(ns) => ns.to_owned(),
        None => namespace.to_owned(),
    };
    import.metadata.namespace = Some(namespace.clone());
    let live = get_import(&client, &namespace, &import.name_any()).await?;
    let origin = format!("{shown} (CohortImport {namespace}/{})", import.name_any());
    preview(client, import, live, origin, options).await
}

/// The one CohortImport among the documents of `text`, read field by field so that a wrong
/// type names its path. Pure.
pub fn parse_manifest(text: &str) -> Result<CohortImport, String> {
    use serde::Deserialize as _;
    let mut found = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document).map_err(|e| format!("document {}: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(serde_yaml::Value::as_str).unwrap_or_default();
        if kind == "CohortImport" {
            found.push((i + 1, value));
        }
    }
    let (index, value) = match found.len() {
        1 => found.remove(0),
        0 => return Err("holds no document of kind CohortImport; give a CohortImport manifest".to_owned()),
        n => return Err(format!("holds {n} CohortImports; preview one at a time (one per file)")),
    };
    let api_version = value.get("apiVersion").and_then(serde_yaml::Value::as_str).unwrap_or_default().to_owned();
    if api_version != "cohorts.dev/v1alpha1" {
        return Err(format!("document {index}: apiVersion is {api_version:?}; use cohorts.dev/v1alpha1"));
    }
    let import: CohortImport = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("document {index}: {path}: {}", e.inner())
    })?;
    if import.metadata.name.as_deref().is_none_or(str::is_empty) {
        return Err(format!("document {index}: metadata.name is not set; name the import"));
    }
    Ok(import)
}

async fn get_import(client: &kube::Client, namespace: &str, name: &str) -> Result<Option<CohortImport>, PreviewError> {
    let api: Api<CohortImport> = Api::namespaced(client.clone(), namespace);
    api.get_opt(name).await.map_err(|e| PreviewError::Kube {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        message: e.to_string(),
    })
}

/// Checks `import`'s spec as the controller does, opens its source and previews it against
/// the snapshot of `live` (the applied import of that name, if any).
async fn preview(
    client: kube::Client,
    import: CohortImport,
    live: Option<CohortImport>,
    origin: String,
    options: &PreviewOptions,
) -> Result<Preview, PreviewError> {
    let valid = validate(&import.spec).map_err(|errors| PreviewError::InvalidSpec { origin, errors })?;
    let spec = &valid.spec;
    let namespace = import.namespace().unwrap_or_default();
    // The preview runs as the person who asked for it: their own cloud identity is theirs
    // to use.
    let objects = KubeObjects::new(client.clone(), namespace.clone())
        .with_ambient_identity(std::sync::Arc::new(crate::source::AmbientIdentity::Everyone));
    let source = open_source(&valid.source, &valid.identifiers, &objects).await?;
    // The applied import's snapshot, under the key its runs use; what status says it holds
    // is checked as a run checks it (a preview of a lost snapshot says SnapshotMissing).
    let key = live.as_ref().map(|live| cohort_snapshot_key(live, spec));
    let store = ReadOnlySnapshots(match (&live, &key) {
        (Some(live), Some(key)) => {
            Some(ClusterSnapshotStore::new(client, live, key, &CohortKey::of(spec).to_string())?.read_only())
        }
        _ => None,
    });
    let expected = live.as_ref().and_then(|l| l.status.as_ref()).and_then(|s| s.committed_snapshot.clone());
    let now = Timestamp::now();
    let mut run =
        ImportRun::new(new_run_id(now), RunTrigger::Manual, &namespace, &import.name_any(), &spec.cohort.name);
    run.identifier_fingerprint = identifier_fingerprint(&spec.identifiers);
    run.removal_guard = spec.removal_guard.clone();
    run.dry_run = true;
    run.sample_size = options.sample.min(MAX_SAMPLE);
    run.expected_snapshot = expected.filter(|committed| Some(&committed.key) == key.as_ref());
    run.scratch_dir = options.scratch_dir.clone();
    let report = preview_import(&run, source.members(), &store, &spec.cohort.id).await;
    Ok(Preview::from_report(&import, live.is_some(), report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemberBatch;
    use futures::StreamExt as _;

    const MANIFEST: &str = r#"
apiVersion: cohorts.dev/v1alpha1
kind: CohortImport
metadata:
  name: vip
spec:
  cohort: { id: vip-users, name: VIP users }
  source: { inline: { rows: [{ id: a }] } }
  identifiers: { externalId: id }
  destination:
    braze:
      restEndpoint: https://rest.iad-01.braze.com
      partner: kubit
      dataImportKeySecretRef: { name: braze, key: data-import-key }
  schedule: { cadence: Daily, at: "06:30" }
"#;

    #[test]
    fn a_manifest_gives_its_one_cohort_import() {
        let text = format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{ name: other }}\n---\n{MANIFEST}");
        let import = parse_manifest(&text).unwrap();
        assert_eq!(import.name_any(), "vip");
        assert_eq!(import.spec.cohort.id, "vip-users");
        assert!(import.spec.dry_run_sample, "dryRunSample defaults to true");
    }

    #[test]
    fn a_malformed_manifest_names_the_field_and_the_fix() {
        let wrong_type = MANIFEST.replace("cadence: Daily", "cadence: Dayly");
        let e = parse_manifest(&wrong_type).unwrap_err();
        assert!(e.starts_with("document 1: spec.schedule.cadence: unknown variant `Dayly`"), "{e}");
        let e = parse_manifest(&MANIFEST.replace("metadata:\n  name: vip\n", "metadata: {}\n")).unwrap_err();
        assert!(e.contains("metadata.name is not set"), "{e}");
        let e = parse_manifest(&MANIFEST.replace("cohorts.dev/v1alpha1", "cohorts.dev/v1")).unwrap_err();
        assert!(e.contains("use cohorts.dev/v1alpha1"), "{e}");
        let e = parse_manifest("kind: ConfigMap\n").unwrap_err();
        assert!(e.contains("no document of kind CohortImport"), "{e}");
        let e = parse_manifest(&format!("{MANIFEST}---\n{MANIFEST}")).unwrap_err();
        assert!(e.contains("holds 2 CohortImports"), "{e}");
        let e = parse_manifest("spec: [unclosed").unwrap_err();
        assert!(e.starts_with("document 1:"), "{e}");
    }

    #[test]
    fn spec_errors_list_one_field_a_line_as_the_controller_finds_them() {
        let bad = MANIFEST
            .replace("at: \"06:30\"", "at: \"6:30pm\"")
            .replace("identifiers: { externalId: id }", "identifiers: {}");
        let import = parse_manifest(&bad).unwrap();
        let errors = validate(&import.spec).unwrap_err();
        let text = PreviewError::InvalidSpec { origin: "vip.yaml".into(), errors }.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "vip.yaml is not valid (2 problems); the controller would not run it:");
        assert!(lines.iter().any(|l| l.starts_with("  spec.schedule.at: \"6:30pm\" is not a wall time")), "{text}");
        assert!(lines.iter().any(|l| l.starts_with("  spec.identifiers: maps no identifier")), "{text}");
    }

    async fn previewed(members: Vec<&str>, sample: usize) -> Preview {
        let import = parse_manifest(MANIFEST).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut run = ImportRun::new("r", RunTrigger::Manual, "growth", "vip", "VIP users");
        run.scratch_dir = dir.path().to_owned();
        run.sample_size = sample;
        let batch = MemberBatch {
            members: members.into_iter().map(|m| crate::domain::member::Member::ExternalId(m.into())).collect(),
            ..Default::default()
        };
        let stream = futures::stream::iter([Ok(batch)]).boxed();
        let report = preview_import(&run, stream, &ReadOnlySnapshots(None), "vip-users").await;
        Preview::from_report(&import, false, report)
    }

    #[tokio::test]
    async fn a_new_import_would_add_every_member_and_shows_a_bounded_sample() {
        let preview = previewed(vec!["c", "a", "b", "a"], 2).await;
        assert!(preview.ok());
        assert_eq!((preview.cohort_size, preview.adds, preview.removes, preview.previous_size), (3, 3, 0, 0));
        assert_eq!((preview.rows, preview.duplicate_rows), (4, 1));
        assert_eq!(preview.sample_adds, ["external_id:a", "external_id:b"]);
        assert_eq!(preview.guard, GuardVerdict::Proceed);
        let text = preview.text();
        assert!(text.contains("CohortImport /vip (not applied)"), "{text}");
        assert!(text.contains("nothing was sent to Braze and nothing was written"), "{text}");
        assert!(text.contains("Adds:           3\n"), "{text}");
        assert!(text.contains("Sample of adds (2 of 3):\n  external_id:a\n  external_id:b\n"), "{text}");
        let json = serde_json::to_value(&preview).unwrap();
        assert_eq!(json["guard"], serde_json::json!({ "verdict": "Proceed" }));
        assert_eq!(json["adds"], 3);
        assert_eq!(json["sampleAdds"][1], "external_id:b");
    }

    #[tokio::test]
    async fn a_blocking_guard_is_shown_with_its_numbers() {
        let verdict = GuardVerdict::Block {
            reason: "TooManyRemovals",
            message: "would remove 8 of 10 members (80.0%), over the 20% allowed".into(),
            max_removal_percent: 20,
        };
        let json = serde_json::to_value(&verdict).unwrap();
        assert_eq!(json["verdict"], "Block");
        assert_eq!(json["maxRemovalPercent"], 20);
        let mut preview = previewed(vec!["a"], 10).await;
        preview.guard = verdict;
        assert!(
            preview.text().contains("Removal guard:  WOULD BLOCK the run: would remove 8 of 10"),
            "{}",
            preview.text()
        );
    }

    #[tokio::test]
    async fn the_read_only_store_refuses_every_write() {
        let store = ReadOnlySnapshots(None);
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::snapshot::tests::meta(1, 0);
        let e = store.commit(&meta, dir.path()).await.unwrap_err();
        assert!(e.to_string().contains("a preview writes nothing"), "{e}");
        assert!(store.delete().await.is_err());
        assert!(store.record_doubt(&crate::snapshot::tests::doubt(0, 1), dir.path()).await.is_err());
        let plan = crate::snapshot::plan::PlanMeta {
            format: 1,
            base_generation: 0,
            cohort_id: "vip".into(),
            run_id: "r".into(),
            recorded_at: jiff::Timestamp::UNIX_EPOCH,
            keys: [0; 5],
            bytes: [0; 5],
            progress: Default::default(),
            lease: None,
        };
        let doubt = crate::snapshot::tests::doubt(0, 1);
        assert!(store.record_doubt_with_plan(&doubt, dir.path(), &plan, dir.path()).await.is_err());
        assert!(store.checkpoint(&plan, &Default::default()).await.is_err());
        assert!(store.load(dir.path()).await.unwrap().snapshot.is_none());
    }
}
