//! moto's S3 server (`moto_server`, from PyPI's `moto[server]`; ci/install.sh puts it in
//! /opt/testtools/venv) on an ephemeral loopback port, and S3 stores pointed at it.
//!
//! The binary is `$THAW_MOTO_SERVER` when set, else /opt/testtools/venv/bin/moto_server, else
//! `moto_server` on `PATH`. When it is missing the tests skip with a message, unless
//! `THAW_REQUIRE_TOOLS=1` (CI sets it): then they fail.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thaw_server::store::S3Store;

/// Credentials moto accepts (it does not check them unless told to enforce auth).
pub const ACCESS_KEY: &str = "testing";
/// The secret that goes with [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "testing";

/// The moto_server binary, if there is one (see the module docs).
pub fn moto_server_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("THAW_MOTO_SERVER") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let venv = PathBuf::from("/opt/testtools/venv/bin/moto_server");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("moto_server"))
            .find(|p| p.is_file())
    })
}

/// Whether missing tools fail the tests (`THAW_REQUIRE_TOOLS=1`).
pub fn tools_required() -> bool {
    std::env::var("THAW_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// A running moto_server, killed (and reaped) on drop.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Its stderr log (for failure messages).
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts moto_server, or returns `None` (after printing why) when it is not installed and
    /// tools are not required. `enforce_auth`: moto then checks access keys (a wrong one gets
    /// `InvalidAccessKeyId`), and every request needs known credentials.
    pub fn start(enforce_auth: bool) -> Option<Self> {
        Self::start_with(if enforce_auth { Some(0) } else { None })
    }

    /// Starts moto_server with authentication enforced after `free` unauthenticated actions
    /// (`None`: never enforced).
    pub fn start_with(free: Option<u32>) -> Option<Self> {
        let Some(bin) = moto_server_path() else {
            assert!(
                !tools_required(),
                "moto_server not found (THAW_REQUIRE_TOOLS=1): run ci/install.sh or set THAW_MOTO_SERVER"
            );
            eprintln!("SKIP: moto_server not found (run ci/install.sh or set THAW_MOTO_SERVER)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        // Ask the kernel for a free port, then hand it to moto (it cannot report its own).
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut cmd = Command::new(&bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(free) = free {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", free.to_string());
        } else {
            cmd.env_remove("INITIAL_NO_AUTH_ACTION_COUNT");
        }
        let child = cmd.spawn().unwrap();
        let mut moto = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        moto.wait_ready(port);
        Some(moto)
    }

    /// Waits until moto answers HTTP on `port` (it prints nothing useful when ready).
    fn wait_ready(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "moto_server exited early ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
                let mut head = [0u8; 12];
                if s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on port {port} within 60 s: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The store URL of `bucket/prefix` on this server (extra parameters appended).
    pub fn url(&self, bucket_and_prefix: &str, extra: &str) -> String {
        let mut url = format!("s3://{bucket_and_prefix}?endpoint={}", self.endpoint);
        if !extra.is_empty() {
            url.push('&');
            url.push_str(extra);
        }
        url
    }

    /// A store on this server with the given credentials (`None`: unsigned requests).
    pub fn store_as(&self, url: &str, creds: Option<(&str, &str)>) -> S3Store {
        let (id, secret) = creds.map_or((None, None), |(i, s)| {
            (Some(i.to_owned()), Some(s.to_owned()))
        });
        S3Store::open_with_env(url, &move |name| match name {
            "AWS_ACCESS_KEY_ID" => id.clone(),
            "AWS_SECRET_ACCESS_KEY" => secret.clone(),
            // Keep the tests fast when something is wrong: no long retry budgets.
            "THAW_HTTP_BUDGET" => Some("20s".to_owned()),
            _ => None,
        })
        .unwrap()
    }

    /// A store with moto's test credentials whose bucket exists.
    pub fn store(&self, bucket_and_prefix: &str, extra: &str) -> S3Store {
        let store = self.store_as(
            &self.url(bucket_and_prefix, extra),
            Some((ACCESS_KEY, SECRET_KEY)),
        );
        store.create_bucket().unwrap();
        store
    }

    /// A `thaw` command with moto's credentials in its environment (and no other AWS settings).
    pub fn thaw(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_thaw"));
        for var in [
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_PROFILE",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        cmd
    }
}

/// On a moto started with `start_with(Some(3))`: creates an IAM user allowed `s3:*` and returns
/// its access key and secret (moto then checks SigV4 signatures made with them). Uses boto3 from
/// moto's own venv (installed with `moto[server]`); the three IAM calls are the free actions.
pub fn iam_credentials(moto: &Moto) -> (String, String) {
    let python = moto_server_path()
        .and_then(|p| p.parent().map(|d| d.join("python")))
        .filter(|p| p.is_file())
        .expect("moto's venv python (for boto3)");
    let script = r#"
import boto3, json, sys
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam.create_user(UserName="thaw")
iam.put_user_policy(UserName="thaw", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17",
     "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="thaw")["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
    let out = Command::new(python)
        .args(["-c", script, &moto.endpoint])
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "creating IAM credentials in moto: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut words = text.split_whitespace();
    let id = words.next().unwrap().to_owned();
    let secret = words.next().unwrap().to_owned();
    (id, secret)
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
