//! nginx as the baseline proxy: Debian's package, one worker pinned to the
//! proxy's CPU, a fair keep-alive reverse proxy (HTTP/1.1 to the upstream
//! with a pool of 128 idle connections, `Connection` cleared), access log
//! off like mesh-proxy, which has none. Keep-alive request limits are
//! raised on both sides: mesh-proxy has none, and nginx closing every
//! thousandth connection would only measure reconnects.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{http::Client, process::Proc};

/// A running nginx (master and one worker).
#[derive(Debug)]
pub struct Nginx {
    proc: Proc,
    addr: SocketAddr,
}

/// Where nginx routes: one upstream block per service.
#[derive(Clone, Debug)]
pub enum Routing {
    /// Every request to the one upstream `bench`.
    Single(SocketAddr),
    /// By Host to the upstream block of that name, as mesh-proxy routes
    /// by Host among its services.
    ByHost(Vec<(String, Vec<(String, u16)>)>),
}

// === impl Nginx ===

impl Nginx {
    /// Writes the config to `dir/<name>.conf` and starts nginx on `port`,
    /// pinned to `cpu`; waits until it answers.
    pub async fn start(
        bin: &Path,
        name: &str,
        dir: &Path,
        port: u16,
        cpu: Option<usize>,
        routing: &Routing,
    ) -> Result<Self> {
        let prefix = dir.join(name);
        std::fs::create_dir_all(prefix.join("tmp"))?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, config(&prefix, port, routing))
            .with_context(|| format!("write {}", conf.display()))?;
        let args: Vec<PathBuf> = vec![
            "-p".into(),
            prefix.clone(),
            "-e".into(),
            prefix.join("error.log"),
            "-c".into(),
            conf,
        ];
        let proc = Proc::spawn(name, bin, &args, cpu, dir, &[])?;
        let mut nginx = Self {
            proc,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        nginx.wait_answering().await?;
        Ok(nginx)
    }

    /// Its listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The master process (its worker is below it).
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Memory of master and worker: their PSS summed (their RSS would
    /// count the pages they share twice).
    pub fn pss_bytes(&self) -> Result<u64> {
        crate::procfs::tree(self.proc.pid())
            .into_iter()
            .map(crate::procfs::pss_bytes)
            .sum()
    }

    async fn wait_answering(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut client = Client::new(self.addr);
        loop {
            self.proc.check()?;
            // Any answer will do: nginx is up.
            if client.get("bench", "/").await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "nginx does not answer on {}:\n{}",
                    self.addr,
                    self.proc.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The configuration file.
pub fn config(prefix: &Path, port: u16, routing: &Routing) -> String {
    let p = prefix.display();
    let mut upstreams = String::new();
    let pass = match routing {
        Routing::Single(addr) => {
            upstream_block(
                &mut upstreams,
                "bench",
                &[(addr.ip().to_string(), addr.port())],
            );
            "http://bench"
        }
        Routing::ByHost(services) => {
            for (name, servers) in services {
                upstream_block(&mut upstreams, name, servers);
            }
            "http://$host"
        }
    };
    format!(
        r#"# Written by mesh-bench.
worker_processes 1;
daemon off;
pid {p}/nginx.pid;
error_log {p}/error.log error;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;

{upstreams}
    server {{
        listen 127.0.0.1:{port} default_server;
        location / {{
            proxy_pass {pass};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
    )
}

fn upstream_block(out: &mut String, name: &str, servers: &[(String, u16)]) {
    let _ = writeln!(out, "    upstream {name} {{");
    for (host, port) in servers {
        let _ = writeln!(out, "        server {host}:{port};");
    }
    let _ = writeln!(out, "        keepalive 128;");
    let _ = writeln!(out, "        keepalive_requests 1000000;");
    let _ = writeln!(out, "    }}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_routes_by_host_among_upstream_blocks() {
        let routing = Routing::ByHost(vec![
            ("a".into(), vec![("127.0.0.2".into(), 80)]),
            ("b".into(), vec![("127.0.0.3".into(), 81)]),
        ]);
        let c = config(Path::new("/x"), 8080, &routing);
        assert!(c.contains("upstream a {"));
        assert!(c.contains("server 127.0.0.3:81;"));
        assert!(c.contains("proxy_pass http://$host;"));
        assert!(c.contains("access_log off;"));
        assert!(c.contains("listen 127.0.0.1:8080"));
    }
}
