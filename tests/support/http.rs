//! A minimal HTTP/1.1 client for the tests (one request per connection), so that the tests
//! exercise the server over real sockets without pulling in a client library.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// GET `path` (already percent-encoded) with an optional bearer token.
pub fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the reply");
    let text = String::from_utf8(raw).expect("UTF-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("headers end");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Reply {
        status,
        content_type,
        body: body.to_string(),
    }
}

/// A `canopy` process that serves the API; killed when dropped.
pub struct Served {
    pub child: Child,
    pub addr: SocketAddr,
    pub stdout: BufReader<ChildStdout>,
}

impl Served {
    /// Starts `cmd` (which must print `... http://ADDR/...` on its first stdout line).
    pub fn start(mut cmd: Command) -> Served {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("canopy starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).expect("first line");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Served {
            child,
            addr,
            stdout,
        }
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Reply {
        get(self.addr, path, token)
    }

    /// The first hierarchy of `tenant`, as the API lists them.
    pub fn first_hierarchy(&self, tenant: &str, token: Option<&str>) -> String {
        let hs = self
            .get(&format!("/v1/tenants/{}/hierarchies", enc(tenant)), token)
            .json();
        hs["hierarchies"][0]["hierarchy"]
            .as_str()
            .unwrap_or_else(|| panic!("{tenant} has no hierarchy: {hs}"))
            .to_string()
    }

    /// The first root of `tenant`'s `hierarchy` in the API's ranking, as listed (`node`,
    /// `subtree`...).
    pub fn first_root(
        &self,
        tenant: &str,
        hierarchy: &str,
        token: Option<&str>,
    ) -> serde_json::Value {
        let path = format!(
            "/v1/tenants/{}/hierarchies/{}/roots",
            enc(tenant),
            enc(hierarchy)
        );
        self.get(&path, token).json()["items"][0].take()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        self.child.wait().expect("wait")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes one path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
