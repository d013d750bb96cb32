//! Debian's nginx as the load balancer in front of Portcullis: a reverse proxy on a loopback
//! port that appends the address it was reached from to `X-Forwarded-For`, as load balancers
//! do, and connects onwards from an address of its own. Stopped when dropped.

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx on `127.0.0.1:<free port>`, proxying everything to `to` from the local address
    /// `from` (another loopback address: `127.0.0.3`), with `Host` as the client sent it.
    pub async fn in_front_of(to: SocketAddr, from: IpAddr) -> Nginx {
        let dir = tempfile::tempdir().expect("nginx's directory");
        let port = crate::free_port();
        let prefix = dir.path().display();
        let conf = format!(
            "master_process off;\ndaemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n\
             error_log {prefix}/error.log warn;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {prefix}/body;\n\
             proxy_temp_path {prefix}/proxy;\n  fastcgi_temp_path {prefix}/fastcgi;\n\
             uwsgi_temp_path {prefix}/uwsgi;\n  scgi_temp_path {prefix}/scgi;\n\
             server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
             proxy_pass http://{to};\n      proxy_bind {from};\n\
             proxy_set_header Host $http_host;\n\
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("write nginx.conf");
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("nginx is missing: run scripts/deps.sh test");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let mut nginx = Nginx {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            _dir: dir,
        };
        // Ready once it takes connections; a loaded machine may take a while.
        let deadline = Instant::now() + Duration::from_secs(120);
        while tokio::net::TcpStream::connect(nginx.addr).await.is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let log = std::fs::read_to_string(nginx._dir.path().join("error.log"));
                panic!("nginx exited with {status}: {}", log.unwrap_or_default());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nginx
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A plain HTTP/1.1 client that connects from `from` (another loopback address, such as
    /// `127.0.0.2`): a client the balancer and Portcullis can tell from each other.
    pub fn client_from(from: IpAddr) -> reqwest::Client {
        crate::client::plain_client_builder()
            .local_address(from)
            .build()
            .expect("build reqwest client")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
