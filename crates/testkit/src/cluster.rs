//! A real control plane — etcd + kube-apiserver v1.20.2 — started by
//! `scripts/control-plane.sh`, which also builds and caches the server on first use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// A running control plane. Dropping it stops etcd and the API server.
pub struct Cluster {
    dir: tempfile::TempDir,
}

/// Directories of process-wide clusters still to stop at exit.
static AT_EXIT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/control-plane.sh")
}

fn run_script(args: &[&str]) -> std::io::Result<std::process::ExitStatus> {
    Command::new("bash").arg(script()).args(args).status()
}

impl Cluster {
    /// Starts a fresh control plane (about 5 s; the first use on a machine builds the
    /// server, which takes minutes). Panics with the script's output when it cannot.
    pub fn start() -> Cluster {
        let dir = tempfile::Builder::new().prefix("cohort-cluster-").tempdir().expect("temp dir");
        let dir_str = dir.path().to_str().expect("utf-8 temp path");
        let status = run_script(&["start", dir_str]).expect("bash runs scripts/control-plane.sh");
        assert!(status.success(), "scripts/control-plane.sh start failed (see its output above)");
        Cluster { dir }
    }

    /// One control plane shared by every test in this process; stopped when it exits.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            let cluster = Cluster::start();
            AT_EXIT.lock().unwrap().push(cluster.dir.path().to_owned());
            // Statics are never dropped; stop the processes when the test binary exits.
            extern "C" fn stop_shared() {
                if let Ok(dirs) = AT_EXIT.lock() {
                    for dir in dirs.iter() {
                        let _ = run_script(&["stop", dir.to_str().unwrap_or_default()]);
                        let _ = std::fs::remove_dir_all(dir);
                    }
                }
            }
            unsafe { libc::atexit(stop_shared) };
            cluster
        })
    }

    /// The process ids of the API server and etcd, by name (for benchmarks that account
    /// for their CPU).
    pub fn server_pids(&self) -> Vec<(&'static str, u32)> {
        let pid =
            |name: &str| std::fs::read_to_string(self.dir.path().join(format!("{name}.pid"))).ok()?.trim().parse().ok();
        [("kube-apiserver", pid("apiserver")), ("etcd", pid("etcd"))]
            .into_iter()
            .filter_map(|(name, pid)| Some((name, pid?)))
            .collect()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// A client authenticated as a cluster administrator.
    pub async fn client(&self) -> kube::Client {
        self.client_as(None).await
    }

    /// A client that impersonates `user` (e.g. `system:serviceaccount:ns:name`) through the
    /// administrator's token, to test what that identity may do under RBAC.
    pub async fn client_as(&self, user: Option<&str>) -> kube::Client {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig()).expect("kubeconfig readable");
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig valid");
        if let Some(user) = user {
            config.auth_info.impersonate = Some(user.to_owned());
            if let Some((ns, _)) = user.strip_prefix("system:serviceaccount:").and_then(|r| r.split_once(':')) {
                config.auth_info.impersonate_groups = Some(vec![
                    "system:serviceaccounts".to_owned(),
                    format!("system:serviceaccounts:{ns}"),
                    "system:authenticated".to_owned(),
                ]);
            }
        }
        kube::Client::try_from(config).expect("client from kubeconfig")
    }

    /// Creates a namespace with a unique name starting with `prefix`, so tests sharing a
    /// cluster do not see each other's objects. (This server has no namespace controller,
    /// so namespaces are never deleted; they vanish with the cluster.)
    pub async fn namespace(&self, prefix: &str) -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name }
        }))
        .expect("namespace object");
        Api::<Namespace>::all(self.client().await).create(&PostParams::default(), &ns).await.expect("create namespace");
        name
    }

    /// Applies `crd` (server-side, as a re-install would) and waits until the server serves
    /// its resource (`Established`). Panics if it is refused or not served within 60 s.
    pub async fn install_crd(&self, crd: &CustomResourceDefinition) {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client().await);
        let name = crd.metadata.name.as_deref().expect("the CRD has a name");
        crds.patch(name, &PatchParams::apply("testkit").force(), &Patch::Apply(crd))
            .await
            .unwrap_or_else(|e| panic!("CRD {name} refused: {e}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let established = crds.get(name).await.ok().and_then(|c| c.status).is_some_and(|s| {
                s.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Established" && c.status == "True")
            });
            if established {
                return;
            }
            assert!(Instant::now() < deadline, "CRD {name} not Established within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = run_script(&["stop", self.dir.path().to_str().unwrap_or_default()]);
    }
}
