//! The port-forward section: tpvpn reaching the manager through the API server's
//! port-forward (the lab's stand-in, WebSocket), against the raw port-forward the same
//! stand-in carries (a local listener that opens one kube port-forward per connection
//! and splices it, as `kubectl port-forward` would carry a stream; with TCP_NODELAY, as
//! kubectl's Go sockets have it) and tpvpn over QUIC,
//! in the same run. Measured on each: one TCP stream each way (iperf3), the 1-byte
//! ping-pong and connect. The bar: tpvpn over the port-forward ≥ [`BAR`] × the raw
//! port-forward's stream, each direction.
//!
//! The tool `tpvpn-bench port-forward` is that local listener ([`forward_cmd`]).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tpvpn_lab::{show, wait_until, Lab, MANAGER_POD, TEST_SERVERS_IP};

use crate::daemon::Daemon;
use crate::iperf;
use crate::latency::{self, PORT};
use crate::paths::{measure, us};

/// The bar: tpvpn over the port-forward against the raw port-forward, each direction.
const BAR: f64 = 0.7;

/// Local listeners on 127.0.0.1 in the laptop namespace, forwarding the iperf3 and
/// ping-pong ports to the manager's pod (on the node's address, where both servers
/// listen) through the API stand-in.
fn raw_forwarders(lab: &Lab) -> Result<Vec<Daemon>> {
    let exe = std::env::current_exe().context("cannot find the current executable")?.display().to_string();
    let kc = lab.kubeconfig().display().to_string();
    let mut daemons = Vec::new();
    for port in [5201u16, PORT] {
        let listen = format!("127.0.0.1:{port}");
        let log = lab.dir().join(format!("port-forward-{port}.log"));
        let p = port.to_string();
        let cmd = [
            exe.as_str(),
            "port-forward",
            "--kubeconfig",
            &kc,
            "--pod",
            MANAGER_POD,
            "--port",
            &p,
            "--listen",
            &listen,
        ];
        let mut d = Daemon::spawn(lab.laptop(), &cmd, &[], &log)?;
        let filter = format!("sport = :{port}");
        let listening = wait_until(Duration::from_secs(5), || {
            !lab.exec_timeout(lab.laptop(), &["ss", "-Hltn", &filter], Duration::from_secs(5)).stdout.is_empty()
        });
        if !listening {
            d.check_running()?;
            bail!("port-forward not listening on {listen} after 5 s");
        }
        daemons.push(d);
    }
    Ok(daemons)
}

fn up_portforward(lab: &Lab) -> Result<()> {
    let _ = lab.tpvpn(&["down"]);
    let kc = lab.kubeconfig().display().to_string();
    let out = lab.tpvpn_env(&["up", "--transport", "portforward"], &[("KUBECONFIG", &kc)], Duration::from_secs(60));
    if !out.status.success() {
        bail!("tpvpn up --transport portforward: {}", show(&out));
    }
    Ok(())
}

/// Measures the three paths and prints the table and the bar. Leaves tpvpn up over QUIC.
pub fn section(lab: &Lab) -> Result<()> {
    let _server = latency::start_server(lab)?;
    let raw = raw_forwarders(lab).and_then(|_f| measure(lab, "127.0.0.1"));
    let over_pf = up_portforward(lab).and_then(|()| measure(lab, TEST_SERVERS_IP));
    let _ = lab.tpvpn(&["down"]);
    let quic = lab.up(&[]).and_then(|()| measure(lab, TEST_SERVERS_IP));

    println!("## Through the API server's port-forward");
    println!();
    println!(
        "The lab's API stand-in (WebSocket, v4.channel.k8s.io) to the manager pod. Raw port-forward: a local \
         listener opening one kube port-forward per connection (as kubectl port-forward carries a stream). \
         One TCP stream: iperf3 -t {}, each direction; ping-pong and connect as in the paths section.",
        iperf::SECONDS
    );
    println!();
    println!("| path | laptop→cluster | cluster→laptop | ping-pong p50 | connect p50 |");
    println!("| --- | --- | --- | --- | --- |");
    let rows = [("raw port-forward", &raw), ("tpvpn over the port-forward", &over_pf), ("tpvpn over QUIC", &quic)];
    for (name, r) in rows {
        match r {
            Ok(m) => println!(
                "| {name} | {:.2} Gbit/s | {:.2} Gbit/s | {} | {} |",
                m.up / 1e9,
                m.down / 1e9,
                us(m.latency.pingpong_p50),
                us(m.latency.connect_p50)
            ),
            Err(e) => println!("| {name} | failed: {} | | | |", e.to_string().lines().next().unwrap_or("")),
        }
    }
    println!();
    if let (Ok(raw), Ok(pf)) = (&raw, &over_pf) {
        let met = |b: bool| if b { "met" } else { "**missed**" };
        let (u, d) = (pf.up / raw.up, pf.down / raw.down);
        println!("| tpvpn over the port-forward against the raw port-forward | measured | bar | |");
        println!("| --- | --- | --- | --- |");
        println!("| laptop→cluster | {u:.2}× | ≥ {BAR}× | {} |", met(u >= BAR));
        println!("| cluster→laptop | {d:.2}× | ≥ {BAR}× | {} |", met(d >= BAR));
        println!();
    }
    for (name, r) in rows {
        if let Err(e) = r {
            bail!("{name}: {e:#}");
        }
    }
    Ok(())
}

/// `port-forward --kubeconfig K [--context C] [--namespace NS] --pod P --port N --listen
/// ADDR`: accepts on ADDR and carries each connection over its own kube port-forward to
/// pod P port N, until `--max-seconds` (default 900).
pub fn forward_cmd(args: &[String]) -> Result<()> {
    let (mut kubeconfig, mut context, mut namespace) = (None, "lab".to_string(), "tpvpn".to_string());
    let (mut pod, mut port, mut listen, mut max_seconds) = (None, None, None, 900u64);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?.clone();
        match flag.as_str() {
            "--kubeconfig" => kubeconfig = Some(value),
            "--context" => context = value,
            "--namespace" => namespace = value,
            "--pod" => pod = Some(value),
            "--port" => port = Some(value.parse::<u16>().context("--port")?),
            "--listen" => listen = Some(value.parse::<std::net::SocketAddr>().context("--listen")?),
            "--max-seconds" => max_seconds = value.parse().context("--max-seconds")?,
            other => bail!("unknown flag {other}"),
        }
    }
    let (kubeconfig, pod, port, listen) = (
        kubeconfig.context("--kubeconfig is required")?,
        pod.context("--pod is required")?,
        port.context("--port is required")?,
        listen.context("--listen is required")?,
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
        let opts = kube::config::KubeConfigOptions { context: Some(context), ..Default::default() };
        // With TCP_NODELAY, as kubectl (Go) has it.
        let client =
            tpvpn_client::cluster::discovery::client_nodelay(kube::Config::from_custom_kubeconfig(kc, &opts).await?)?;
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, &namespace);
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let serve = async {
            loop {
                let (mut conn, _) = listener.accept().await?;
                let _ = conn.set_nodelay(true);
                let (pods, pod) = (pods.clone(), pod.clone());
                tokio::spawn(async move {
                    match pods.portforward(&pod, &[port]).await {
                        Ok(mut pf) => {
                            if let Some(mut s) = pf.take_stream(port) {
                                let _ = tokio::io::copy_bidirectional(&mut conn, &mut s).await;
                            }
                        }
                        Err(e) => eprintln!("port-forward: {e}"),
                    }
                });
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        };
        tokio::select! {
            r = serve => r,
            _ = tokio::time::sleep(Duration::from_secs(max_seconds)) => Ok(()),
        }
    })
}
