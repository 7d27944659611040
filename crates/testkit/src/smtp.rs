//! A real SMTP server — Debian's `python3-aiosmtpd` — that records every message it
//! accepts, for tests of email sending. Plain, STARTTLS or implicit TLS (with a CA made
//! for the run), optionally requiring AUTH.
//!
//! ```no_run
//! let server = testkit::smtp::SmtpServer::start();
//! // ... send to 127.0.0.1:server.port() ...
//! let messages = server.wait_for_messages(1, std::time::Duration::from_secs(10));
//! assert_eq!(messages[0].subject().as_deref(), Some("Hello"));
//! ```

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const SERVER_SCRIPT: &str = include_str!("smtp_server.py");
const POLL: Duration = Duration::from_millis(20);
/// Debian's interpreter, where `python3-aiosmtpd` installs (a `python3` earlier on PATH,
/// e.g. pyenv's, does not see Debian's packages).
const PYTHON: &str = "/usr/bin/python3";

/// How the test server protects connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServerTls {
    #[default]
    None,
    /// STARTTLS offered and required before MAIL.
    StartTls,
    /// TLS from the first byte.
    Implicit,
}

#[derive(Clone, Debug, Default)]
pub struct SmtpServerOptions {
    pub tls: ServerTls,
    /// Require AUTH (PLAIN/LOGIN) with this user name and password.
    pub credentials: Option<(String, String)>,
}

/// A running SMTP server on `127.0.0.1:port()`. Dropping it stops the server.
pub struct SmtpServer {
    /// `None` once stopped; a mutex so waiting (`&self`) can notice the server died.
    child: Mutex<Option<Child>>,
    dir: tempfile::TempDir,
    port: u16,
    ca_pem: Option<String>,
}

impl SmtpServer {
    /// A plain server that accepts any message without AUTH.
    pub fn start() -> SmtpServer {
        Self::start_with(SmtpServerOptions::default())
    }

    /// Starts a server; installs `python3-aiosmtpd` with apt-get when it is missing.
    /// Panics, saying why, when it cannot start.
    pub fn start_with(options: SmtpServerOptions) -> SmtpServer {
        ensure_aiosmtpd();
        let dir = tempfile::Builder::new().prefix("testkit-smtp-").tempdir().expect("temp dir");
        let messages = dir.path().join("messages");
        std::fs::create_dir(&messages).expect("messages dir");
        let script = dir.path().join("smtp_server.py");
        std::fs::write(&script, SERVER_SCRIPT).expect("write server script");
        let port_file = dir.path().join("port");

        let mut command = Command::new(PYTHON);
        command
            .arg(&script)
            .arg("--dir")
            .arg(&messages)
            .arg("--port-file")
            .arg(&port_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        let mut ca_pem = None;
        if options.tls != ServerTls::None {
            let tls = make_certificates(dir.path());
            command.args(["--tls", if options.tls == ServerTls::StartTls { "starttls" } else { "implicit" }]);
            command.arg("--cert").arg(&tls.cert).arg("--key").arg(&tls.key);
            ca_pem = Some(tls.ca_pem);
        }
        if let Some((user, password)) = &options.credentials {
            command.args(["--user", user, "--password", password]);
        }
        let child = command.spawn().expect("start /usr/bin/python3 for the SMTP server");
        let mut server = SmtpServer { child: Mutex::new(Some(child)), dir, port: 0, ca_pem };

        let deadline = Instant::now() + Duration::from_secs(30);
        server.port = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                break text.trim().parse().expect("the server writes its port");
            }
            if let Some(status) = server.exit_status() {
                panic!("the SMTP server exited before listening ({status}); see its stderr above");
            }
            assert!(Instant::now() < deadline, "the SMTP server did not listen within 30 s");
            std::thread::sleep(POLL);
        };
        server
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The port it listens on; after [`stop`](Self::stop), a port nobody answers on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PEM of the CA that signed the server's certificate (for `127.0.0.1` and
    /// `localhost`), when the server uses TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Stops the server; connections to its port are refused from then on.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Messages accepted so far, in arrival order.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        let dir = self.dir.path().join("messages");
        let mut records: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("messages dir")
            .map(|entry| entry.expect("dir entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        records.sort();
        records.iter().map(|path| ReceivedMessage::load(path)).collect()
    }

    /// Waits until at least `count` messages arrived and returns them all; panics at
    /// `timeout` with what did arrive.
    pub fn wait_for_messages(&self, count: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(messages) = self.arrived(count, deadline) {
                return messages;
            }
            std::thread::sleep(POLL);
        }
    }

    /// [`wait_for_messages`](Self::wait_for_messages) for async tests, where the sender
    /// runs on the same runtime.
    pub async fn wait_for_messages_async(&self, count: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(messages) = self.arrived(count, deadline) {
                return messages;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Every message once `count` have arrived; `None` to wait on. Panics past `deadline`,
    /// or when the server died.
    fn arrived(&self, count: usize, deadline: Instant) -> Option<Vec<ReceivedMessage>> {
        let messages = self.messages();
        if messages.len() >= count {
            return Some(messages);
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} message(s) at the SMTP server, got {}: {:?}",
            messages.len(),
            messages.iter().map(|m| m.subject()).collect::<Vec<_>>()
        );
        if let Some(status) = self.exit_status() {
            panic!("the SMTP server exited ({status}) while waiting for messages");
        }
        None
    }

    /// How the server process ended, if it did (not counting [`stop`](Self::stop)).
    fn exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One message as the server received it.
#[derive(Clone, Debug)]
pub struct ReceivedMessage {
    /// `MAIL FROM` address.
    pub envelope_from: String,
    /// `RCPT TO` addresses, in order.
    pub envelope_to: Vec<String>,
    /// The user name the client authenticated as.
    pub auth_login: Option<String>,
    /// Whether the connection was encrypted when the message arrived.
    pub tls: bool,
    /// The message as sent, headers and body.
    pub raw: Vec<u8>,
    /// Headers in order, values decoded (RFC 2047) and unfolded.
    pub headers: Vec<(String, String)>,
    /// `type/subtype` of the whole message.
    pub content_type: String,
    /// Leaf MIME parts in order, bodies decoded.
    pub parts: Vec<MessagePart>,
}

#[derive(Clone, Debug)]
pub struct MessagePart {
    /// `type/subtype`, lower case.
    pub content_type: String,
    pub charset: String,
    pub body: String,
}

impl ReceivedMessage {
    fn load(record_path: &Path) -> ReceivedMessage {
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(record_path).expect("read message record"))
                .expect("message record is JSON");
        let raw = std::fs::read(record_path.with_extension("eml")).expect("read message");
        let parsed = mailparse::parse_mail(&raw).unwrap_or_else(|e| {
            panic!("the SMTP server received an unparsable message ({e}): {}", String::from_utf8_lossy(&raw))
        });
        let headers = parsed.headers.iter().map(|h| (h.get_key(), h.get_value())).collect();
        let mut parts = Vec::new();
        collect_parts(&parsed, &mut parts);
        ReceivedMessage {
            envelope_from: record["mail_from"].as_str().unwrap_or_default().to_owned(),
            envelope_to: record["rcpt_tos"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
            auth_login: record["auth_login"].as_str().map(str::to_owned),
            tls: record["tls"].as_bool().unwrap_or(false),
            content_type: parsed.ctype.mimetype.clone(),
            headers,
            parts,
            raw,
        }
    }

    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn subject(&self) -> Option<String> {
        self.header("Subject").map(str::to_owned)
    }

    /// The first leaf part of `content_type` (e.g. `text/plain`).
    pub fn part(&self, content_type: &str) -> Option<&MessagePart> {
        self.parts.iter().find(|p| p.content_type.eq_ignore_ascii_case(content_type))
    }

    pub fn text_body(&self) -> Option<&str> {
        self.part("text/plain").map(|p| p.body.as_str())
    }

    pub fn html_body(&self) -> Option<&str> {
        self.part("text/html").map(|p| p.body.as_str())
    }
}

fn collect_parts(mail: &mailparse::ParsedMail<'_>, out: &mut Vec<MessagePart>) {
    if mail.subparts.is_empty() {
        out.push(MessagePart {
            content_type: mail.ctype.mimetype.to_ascii_lowercase(),
            charset: mail.ctype.charset.clone(),
            body: mail.get_body().expect("decodable MIME part"),
        });
    }
    for part in &mail.subparts {
        collect_parts(part, out);
    }
}

struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    ca_pem: String,
}

/// A CA made for this server and a certificate it signed for 127.0.0.1 and localhost.
fn make_certificates(dir: &Path) -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "testkit SMTP CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA certificate");

    let key = KeyPair::generate().expect("server key");
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("server params");
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca).expect("server certificate");

    let files = TlsFiles { cert: dir.join("server.pem"), key: dir.join("server-key.pem"), ca_pem: ca.pem() };
    std::fs::write(&files.cert, cert.pem()).expect("write certificate");
    let mut key_file = std::fs::File::create(&files.key).expect("create key file");
    key_file.write_all(key.serialize_pem().as_bytes()).expect("write key");
    files
}

/// Installs Debian's `python3-aiosmtpd` when Debian's `python3` cannot import it (CI runs
/// as root).
fn ensure_aiosmtpd() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let importable = || {
            Command::new(PYTHON)
                .args(["-c", "import aiosmtpd"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if importable() {
            return;
        }
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        let install = ["-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", "python3-aiosmtpd"];
        if !apt(&install) {
            apt(&["-o", "DPkg::Lock::Timeout=300", "update"]);
            apt(&install);
        }
        assert!(importable(), "python3-aiosmtpd is missing and `apt-get install python3-aiosmtpd` failed");
    });
}
