//! For benchmarks that measure a piece of work in a process of its own — this executable
//! run again — so that the peak RSS they print is the work's own, not the harness's.

use std::process::Command;

/// This process's peak resident set size (`VmHWM`), in MiB; NaN where `/proc` does not say.
pub fn peak_rss_mib() -> f64 {
    vm_hwm_kib("self").map_or(f64::NAN, |kib| kib as f64 / 1024.0)
}

/// Process `pid`'s peak resident set size so far (`VmHWM`), in KiB; `None` once it is gone.
pub fn peak_rss_kib_of(pid: u32) -> Option<u64> {
    vm_hwm_kib(&pid.to_string())
}

/// Process `pid`'s resident set size now (`VmRSS`), in KiB; `None` once it is gone.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    status_kib(&pid.to_string(), "VmRSS:")
}

/// CPU time process `pid` has used so far (user + system), in seconds; `None` once it is gone.
pub fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks as f64 / per_second as f64)
}

fn vm_hwm_kib(pid: &str) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Prints the child's result as the line [`child_result`] looks for.
pub fn print_result(result: &serde_json::Value) {
    println!("RESULT {result}");
}

/// Runs this executable again with `env` set (the child sees it and does the work) and
/// returns the JSON of its `RESULT` line; panics with the child's output when there is none.
pub fn child_result(what: &str, env: &[(&str, String)]) -> serde_json::Value {
    let mut command = Command::new(std::env::current_exe().expect("this executable"));
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("the benchmark runs itself again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Some(line) = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        panic!("{what} failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    };
    serde_json::from_str(line).expect("the child's RESULT is JSON")
}
