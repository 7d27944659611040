//! A throw-away PostgreSQL cluster on a free loopback port.
//!
//! `initdb` and `postgres` from Debian's `postgresql` package (installed with apt-get when
//! missing). PostgreSQL refuses to run as root, so under root both run as the `postgres`
//! user on a directory it owns. The server is a child of the test process; dropping
//! [`Postgres`] stops it (`pg_ctl stop -m immediate`) and removes its directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A running PostgreSQL server with trust authentication for user `postgres`.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    server: Option<Child>,
    /// uid/gid the server runs as when the tests run as root.
    run_as: Option<(u32, u32)>,
}

/// A server to stop at exit: its `bin/`, data directory and the user it runs as.
type ExitStop = (PathBuf, PathBuf, Option<(u32, u32)>);

/// Process-wide servers still to stop at exit.
static AT_EXIT: Mutex<Vec<ExitStop>> = Mutex::new(Vec::new());

impl Postgres {
    /// Starts a fresh cluster (about 2 s). Panics with the server's log when it cannot.
    pub fn start() -> Postgres {
        let bin = binaries();
        let run_as = if unsafe { libc::geteuid() } == 0 { Some(postgres_user()) } else { None };
        let mut dir = tempfile::Builder::new().prefix("cohort-pg-").tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        if let Some((uid, gid)) = run_as {
            chown(dir.path(), uid, gid);
            chown(&data, uid, gid);
        }
        let status = command(&bin.join("initdb"), run_as)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .expect("initdb runs");
        assert!(status.success(), "initdb failed for {}", data.display());

        // A free port can be taken between choosing and binding it: try a few.
        for _ in 0..5 {
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("server.log")).expect("log file");
            if let Some((uid, gid)) = run_as {
                chown(&dir.path().join("server.log"), uid, gid);
            }
            let server = command(&bin.join("postgres"), run_as)
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
                .arg(dir.path())
                // Throw-away data: durability only costs time.
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("postgres starts");
            let mut pg = Postgres { dir, bin: bin.clone(), port, server: Some(server), run_as };
            if pg.wait_ready(Duration::from_secs(30)) {
                return pg;
            }
            let log = std::fs::read_to_string(pg.dir.path().join("server.log")).unwrap_or_default();
            pg.stop();
            if !log.contains("Address already in use") {
                panic!("PostgreSQL did not start:\n{log}");
            }
            dir = std::mem::replace(&mut pg.dir, tempfile::tempdir().expect("temp dir"));
        }
        panic!("PostgreSQL found no free port in 5 tries");
    }

    /// One server shared by every test in this process; stopped when the process exits.
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| {
            let pg = Postgres::start();
            AT_EXIT.lock().unwrap().push((pg.bin.clone(), pg.dir.path().join("data"), pg.run_as));
            extern "C" fn stop_shared() {
                if let Ok(servers) = AT_EXIT.lock() {
                    for (bin, data, run_as) in servers.iter() {
                        pg_ctl_stop(bin, data, *run_as);
                        if let Some(dir) = data.parent() {
                            let _ = std::fs::remove_dir_all(dir);
                        }
                    }
                }
            }
            unsafe { libc::atexit(stop_shared) };
            pg
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB?sslmode=disable`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable", self.port)
    }

    /// Runs SQL with `psql` (stops at the first error); returns what it printed, unaligned.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &self.port.to_string(), "-d", database, "-c", sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Creates a database; tests sharing a server each use their own.
    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\"")).expect("create database");
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(server) = &mut self.server
                && let Ok(Some(_)) = server.try_wait()
            {
                return false;
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            pg_ctl_stop(&self.bin, &self.dir.path().join("data"), self.run_as);
            if !matches!(server.try_wait(), Ok(Some(_))) {
                let _ = server.kill();
            }
            let _ = server.wait();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pg_ctl_stop(bin: &Path, data: &Path, run_as: Option<(u32, u32)>) {
    let _ = command(&bin.join("pg_ctl"), run_as)
        .args(["stop", "-m", "immediate", "-w", "-D"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn command(program: &Path, run_as: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    cmd.current_dir("/");
    cmd
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to the postgres user");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port").local_addr().unwrap().port()
}

/// The newest installed server's `bin/`, installing Debian's `postgresql` when none is.
fn binaries() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = newest_installed() {
            return bin;
        }
        let status = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "postgresql"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .expect("apt-get runs");
        assert!(status.success(), "apt-get install postgresql failed");
        newest_installed().expect("postgresql installed but no /usr/lib/postgresql/*/bin/initdb")
    })
    .clone()
}

fn newest_installed() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The `postgres` system user's uid and gid (from /etc/passwd; Debian's package makes it).
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.first() != Some(&"postgres") || f.len() < 4 {
                return None;
            }
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        })
        .expect("a postgres user (made by Debian's postgresql package)")
}
