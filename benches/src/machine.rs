//! The machine a run was made on, printed at the top of the benchmark's output.

use std::fs;
use std::process::Command;

/// `# tpvpn-bench, <date UTC>` and a line with CPU model, logical CPUs, memory, OS, kernel.
pub fn header() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, v)| v.trim()))
        .unwrap_or("unknown CPU");
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        })
        .map_or(0.0, |kib: f64| kib / (1024.0 * 1024.0));
    let os = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")).map(|v| v.trim_matches('"').to_string()))
        .unwrap_or_else(|| "unknown OS".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "# tpvpn-bench, {date}\n\nMachine: {cpu}, {cpus} logical CPUs, {mem_gib:.0} GiB, {os}, Linux {}.\n",
        kernel.trim()
    )
}
