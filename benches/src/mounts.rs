//! The mounts section (`intercept --mount`): the intercepted pod's emptyDir read on the
//! laptop through the mount, against the same files read on the node (what the pod
//! reads: the volume's directory, bind-mounted into the container), and tpvpn's own bulk
//! stream of the same run. Bar (issue 23): a sequential read of 256 MiB at least half of
//! tpvpn's own stream rate.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use tpvpn_lab::{show, Lab, TEST_SERVERS_IP};

use crate::iperf;

/// The bar: sequential read through the mount against tpvpn's own stream.
const READ_FRACTION: f64 = 0.5;
const BIG: usize = 256 << 20;
const SMALL_FILES: usize = 1_000;
const ENTRIES: usize = 10_000;

/// Reads every file under `dir` (`find DIR -type f | xargs cat`); bytes read.
fn cat_all(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            n += cat_all(&p)?;
        } else {
            n += fs::read(&p)?.len() as u64;
        }
    }
    Ok(n)
}

/// Lists `dir` with every entry's attributes (`ls -lR`); entries seen.
fn list_all(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let m = fs::symlink_metadata(e.path())?;
        n += 1;
        if m.is_dir() {
            n += list_all(&e.path())?;
        }
    }
    Ok(n)
}

/// Seconds `f` takes, and what it gives.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let t = Instant::now();
    let v = f()?;
    Ok((t.elapsed().as_secs_f64(), v))
}

/// Reads `path` whole in 1 MiB reads; its bytes.
fn read_big(path: &Path) -> Result<Vec<u8>> {
    let mut f = fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut out = Vec::with_capacity(BIG);
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

pub fn section(lab: &mut Lab) -> Result<()> {
    lab.start_pods().context("pods for the mounts section")?;
    // The emptyDir of web-0 as the node has it (the container sees this directory).
    let node = lab.pod_volume_dir("web-0", "scratch").context("web-0's emptyDir")?;
    let mut data = vec![0u8; BIG];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    fs::write(node.join("big"), &data)?;
    for (dir, count, size) in [("small", SMALL_FILES, 4096), ("many", ENTRIES, 0)] {
        fs::create_dir_all(node.join(dir))?;
        for i in 0..count {
            fs::write(node.join(dir).join(format!("f{i:05}")), vec![b'x'; size])?;
        }
    }
    let own = iperf::one_stream(lab, TEST_SERVERS_IP, true)?;

    let dir = lab.dir().join("bench-files").display().to_string();
    let out = lab.tpvpn(&["intercept", "web", "--port", "18888:http", "--mount", &dir]);
    ensure!(out.status.success(), "tpvpn intercept --mount: {}", show(&out));
    let mounted = lab.daemon_view(&dir).join("var/scratch");
    let measured = (|| {
        let node_read = timed(|| read_big(&node.join("big")))?.0;
        let (cold, got) = timed(|| read_big(&mounted.join("big")))?;
        ensure!(got == data, "the 256 MiB read through the mount differs from the file");
        let warm = timed(|| read_big(&mounted.join("big")))?.0;
        let small = [timed(|| cat_all(&mounted.join("small")))?, timed(|| cat_all(&mounted.join("small")))?];
        ensure!(small[0].1 == (SMALL_FILES * 4096) as u64, "read {} bytes of the small files", small[0].1);
        let small_node = timed(|| cat_all(&node.join("small")))?.0;
        let many = [timed(|| list_all(&mounted.join("many")))?, timed(|| list_all(&mounted.join("many")))?];
        ensure!(many[0].1 == ENTRIES, "listed {} entries", many[0].1);
        let many_node = timed(|| list_all(&node.join("many")))?.0;
        Ok::<_, anyhow::Error>((node_read, cold, warm, small, small_node, many, many_node))
    })();
    let _ = lab.tpvpn(&["leave", "web"]);
    let (node_read, cold, warm, small, small_node, many, many_node) = measured?;
    let rate = |secs: f64| BIG as f64 * 8.0 / secs;

    println!("## Mounts: the intercepted pod's emptyDir on the laptop (`intercept --mount`)");
    println!();
    println!(
        "Through the mount (FUSE on the laptop, the file protocol through the manager to the node's agent, \
         which reads through the container's root), against the same files read on the node. Cold: the \
         first pass; warm: again at once (names and attributes cached for 1 s; a file's pages are \
         dropped at each open, so every read of data crosses the tunnel)."
    );
    println!();
    println!("| what | on the node | through the mount, cold | through the mount, warm |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| sequential read of 256 MiB (1 MiB reads) | {:.2} Gbit/s | {:.2} Gbit/s | {:.2} Gbit/s |",
        rate(node_read) / 1e9,
        rate(cold) / 1e9,
        rate(warm) / 1e9
    );
    println!(
        "| `find -type f \\| xargs cat`, {SMALL_FILES} files of 4 KiB | {:.0} ms | {:.0} ms | {:.0} ms |",
        small_node * 1e3,
        small[0].0 * 1e3,
        small[1].0 * 1e3
    );
    println!(
        "| `ls -lR`, {ENTRIES} entries | {:.0} ms | {:.0} ms | {:.0} ms |",
        many_node * 1e3,
        many[0].0 * 1e3,
        many[1].0 * 1e3
    );
    println!("| tpvpn's own stream (ClusterIP → laptop), same run | {:.2} Gbit/s | | |", own / 1e9);
    println!();
    let fraction = rate(cold) / own;
    let met = if fraction >= READ_FRACTION { "met" } else { "**missed**" };
    println!("| mounts against the bar | measured | bar | |");
    println!("| --- | --- | --- | --- |");
    println!("| sequential read, cold, against tpvpn's own stream | {fraction:.2}× | ≥ {READ_FRACTION}× | {met} |");
    println!();
    Ok(())
}
