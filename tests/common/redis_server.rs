//! A real `redis-server` on a free loopback port, with no persistence, stopped when
//! dropped. Without the binary, [`RedisServer::start`] says how to install it and
//! returns `None`, except under `CI`, where a missing server fails the test. Also the
//! readers of shared run logs that the Redis tests use.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tool_dispatch::{Frame, Resync, RunLog, RunReader};

/// Long enough for anything on loopback; a hang fails instead of blocking the run.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A running `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts a server on a free port; `None` when `redis-server` is missing outside CI.
    pub fn start() -> Option<RedisServer> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is missing; .ci/run installs it (apt-get install -y redis-server)"
            );
            eprintln!("skipped: redis-server is not installed (apt-get install -y redis-server)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Some(Self::start_on(port))
    }

    /// Starts a server on `port` (again, after [`stop`](Self::stop)).
    pub fn start_on(port: u16) -> RedisServer {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "tool-dispatch-redis-{}-{port}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let server = RedisServer {
            child: Some(child),
            port,
            dir,
        };
        for _ in 0..200 {
            if server.ping() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on port {port} did not answer PING");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// Whether `key` exists (an inline `EXISTS`; the key must not contain spaces).
    pub fn exists(&self, key: &str) -> bool {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("redis answers");
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        s.write_all(format!("EXISTS {key}\r\n").as_bytes())
            .expect("a command");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).expect("an answer");
        &buf == b":1\r\n"
    }

    /// How many members the sorted set `key` has (an inline `ZCARD`).
    pub fn zcard(&self, key: &str) -> u64 {
        let n = self.integer(&format!("ZCARD {key}"));
        u64::try_from(n).expect("a count")
    }

    /// How long `key` has to live, in ms (an inline `PTTL`: -2 when there is no such
    /// key, -1 when it does not expire).
    pub fn pttl(&self, key: &str) -> i64 {
        self.integer(&format!("PTTL {key}"))
    }

    /// The answer to an inline command whose reply is an integer (no spaces in its
    /// arguments).
    fn integer(&self, command: &str) -> i64 {
        let line = self.command(command);
        line.trim_start_matches(':')
            .parse()
            .unwrap_or_else(|_| panic!("{command}: not an integer reply: {line}"))
    }

    /// The first line of the answer to an inline command (its words separated by
    /// spaces), such as `+OK`.
    pub fn command(&self, command: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("redis answers");
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        s.write_all(format!("{command}\r\n").as_bytes())
            .expect("a command");
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while answer.last() != Some(&b'\n') {
            s.read_exact(&mut byte).expect("an answer");
            answer.push(byte[0]);
        }
        String::from_utf8_lossy(&answer).trim().to_owned()
    }

    /// Freezes the server (`SIGSTOP`): its sockets stay open and nothing answers, as
    /// with a server stuck in a long command or a network partition.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (`SIGCONT`).
    pub fn unpause(&self) {
        self.signal("-CONT");
    }

    /// Sends `which` to the server through the shell's own `kill` (a `sh` is on
    /// every machine the tests run on; a `kill` binary is not).
    fn signal(&self, which: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let line = format!("kill {which} {pid}");
        let sent = Command::new("sh").args(["-c", &line]).status();
        assert!(sent.is_ok_and(|s| s.success()), "{line}");
    }

    /// Kills the server (as a crash would) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The next `n` frames of `reader`, or a failure if they do not come in time.
pub async fn take(reader: &mut RunReader, n: usize) -> Vec<Frame> {
    let mut frames = Vec::with_capacity(n);
    while frames.len() < n {
        let next = tokio::time::timeout(PATIENCE, reader.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} frames came", frames.len()));
        frames.push(next.expect("the run goes on").expect("no resync"));
    }
    frames
}

/// A reader of the run once its frames have reached Redis.
pub async fn resumed(log: &RunLog, user: &str, run: &str, after: u64) -> RunReader {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match log.resume(user, run, after, None).await {
            Ok(r) => return r,
            Err(Resync::UnknownRun) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("{user}'s {run}: {e}"),
        }
    }
}

/// Runs `f` until it is true, or fails after [`PATIENCE`].
pub async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut f: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP relay on a free loopback port in front of a server, that can be cut like a
/// network partition (every connection through it closed, new ones refused) and
/// mended. Stopped when dropped.
pub struct Relay {
    /// Its port on 127.0.0.1.
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::AbortHandle,
}

impl Relay {
    /// A relay to the server on `port`, open.
    pub async fn start(port: u16) -> Relay {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free port");
        let me = listener.local_addr().expect("its address").port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (o, c) = (open.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if !o.load(SeqCst) {
                    continue; // refused: dropped at once
                }
                let relayed = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                c.lock().unwrap().push(relayed.abort_handle());
            }
        });
        Relay {
            port: me,
            open,
            conns,
            accept: accept.abort_handle(),
        }
    }

    /// `redis://127.0.0.1:PORT` of the relay.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Closes every connection through the relay, and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    /// Lets new connections through again.
    pub fn mend(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}
