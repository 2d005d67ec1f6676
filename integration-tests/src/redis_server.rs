//! A private `redis-server` process on a loopback port, for tests, the soak tool and the
//! benchmarks: started from the OS package's binary (never a mock), killed and restarted on the
//! same port and data directory on demand, removed when dropped.
//!
//! The binary is `redis-server` on the `PATH`, or `TETHER_REDIS_SERVER`. When it is missing,
//! [`RedisServer::start`] fails with a message that says how to install it: tests that need
//! Redis fail rather than skip.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::free_addr;

/// What a Redis instance writes to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Nothing: a restart starts empty.
    None,
    /// Append-only file, fsync once a second: a crash loses up to the last second of writes.
    AofEverySec,
    /// Append-only file, fsync before every reply: a crash loses nothing acknowledged.
    AofAlways,
}

/// A running private Redis.
#[derive(Debug)]
pub struct RedisServer {
    addr: SocketAddr,
    dir: PathBuf,
    persistence: Persistence,
    child: Option<Child>,
}

fn binary() -> String {
    std::env::var("TETHER_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

impl RedisServer {
    /// Starts a Redis without persistence on a free loopback port.
    pub fn start() -> Result<Self, String> {
        Self::start_with(Persistence::None)
    }

    /// Starts a Redis with `persistence` on a free loopback port.
    pub fn start_with(persistence: Persistence) -> Result<Self, String> {
        let addr = free_addr();
        let dir = std::env::temp_dir().join(format!(
            "tether-redis-{}-{}",
            std::process::id(),
            addr.port()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let mut server = RedisServer {
            addr,
            dir,
            persistence,
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(binary());
        cmd.arg("--port")
            .arg(self.addr.port().to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("")
            .arg("--daemonize")
            .arg("no")
            .arg("--protected-mode")
            .arg("yes")
            .arg("--logfile")
            .arg(self.dir.join("redis.log"));
        match self.persistence {
            Persistence::None => {
                cmd.arg("--appendonly").arg("no");
            }
            Persistence::AofEverySec => {
                cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"]);
            }
            Persistence::AofAlways => {
                cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
            }
        }
        // The server dies with the thread that started it, even when this process is killed
        // before it can drop the handle: no Redis outlives an aborted test or soak.
        crate::process::kill_with_parent(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {}: {e}. Install Redis 7 (Debian: `apt-get install redis-server`) \
                     or set TETHER_REDIS_SERVER; the tests that need Redis do not skip",
                    binary()
                )
            })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(10))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Ours answering, not whoever else may hold the port.
            let pid = self.child.as_ref().map(Child::id);
            if pid.is_some_and(|pid| answers_as(self.addr, pid)) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log =
                        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                    return Err(format!("redis-server exited with {status}: {log}"));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on {} not ready in {timeout:?}",
                    self.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server at once (SIGKILL: no save, no goodbye) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data directory (what survives depends on the
    /// [`Persistence`]).
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()
    }

    /// Sends one command (inline protocol) and returns the raw reply, for tests that look at
    /// the data behind the store.
    pub fn command(&self, line: &str) -> Result<String, String> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(format!("{line}\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// Whether the Redis at `addr` is up and is process `pid`.
fn answers_as(addr: SocketAddr, pid: u32) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    // INFO answers while the dataset is still loading (other commands get -LOADING then):
    // ready means ours, and done loading.
    if stream.write_all(b"INFO\r\n").is_err() {
        return false;
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    let needle = format!("process_id:{pid}\r\n");
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        if text.contains(&needle) && text.contains("\r\nloading:0\r\n") {
            return true;
        }
        if reply.len() > 64 * 1024 {
            break;
        }
    }
    false
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_keeps_data_across_restarts_with_aof() {
        let mut redis = RedisServer::start_with(Persistence::AofAlways).expect("redis starts");
        assert!(redis.command("SET k v").unwrap().starts_with("+OK"));
        redis.restart().unwrap();
        let got = redis.command("GET k").unwrap();
        assert!(
            got.contains('v'),
            "after the restart GET k answered {got:?}"
        );
        let mut volatile = RedisServer::start().unwrap();
        volatile.command("SET k v").unwrap();
        volatile.restart().unwrap();
        assert!(volatile.command("GET k").unwrap().starts_with("$-1"));
    }
}
