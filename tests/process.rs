//! Broker processes a test owns: started on a free loopback port, stopped
//! and started again on purpose, and always stopped when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// A free TCP port on 127.0.0.1.
///
/// # Errors
///
/// The OS has no port to give.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(listener.local_addr()?.port())
}

/// Sends `signal` (`-TERM`, `-STOP`, `-CONT`, `-KILL`, ...) to process `pid`.
///
/// # Errors
///
/// `kill` could not run, or refused.
pub fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .with_context(|| format!("running kill {signal} {pid}"))?;
    if !status.success() {
        bail!("kill {signal} {pid} failed");
    }
    Ok(())
}

/// The first of `candidates` that exists, or a program of that name on `PATH`.
pub fn find_program(name: &str, candidates: &[&str]) -> Option<PathBuf> {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
}

/// A server process this test started.
#[derive(Debug)]
pub struct ServerProcess {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    port: u16,
    log: PathBuf,
    dir: Option<PathBuf>,
    envs: Vec<(String, String)>,
    child: Option<Child>,
}

impl ServerProcess {
    /// Describes a server; nothing runs until [`start`](Self::start).
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        args: Vec<String>,
        port: u16,
        log: impl Into<PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args,
            port,
            log: log.into(),
            dir: None,
            envs: Vec::new(),
            child: None,
        }
    }

    /// Runs it in `dir` (for servers that resolve paths against it).
    #[must_use]
    pub fn in_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Sets an environment variable for it.
    #[must_use]
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where its output goes.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Starts it and waits until its port accepts connections.
    ///
    /// # Errors
    ///
    /// It could not be spawned, exited, or did not listen within 30 s.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut command = Command::new(&self.program);
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        let child = command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "{} exited with {status} while starting; see {}",
                    self.name,
                    self.log.display()
                );
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} did not listen on 127.0.0.1:{} within 30 s; see {}",
                    self.name,
                    self.port,
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops it the way an operator would (SIGTERM), and waits for it to exit
    /// (SIGKILL after 20 s).
    ///
    /// # Errors
    ///
    /// The signal could not be sent.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        signal(child.id(), "-TERM")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if tokio::time::Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Kills it (SIGKILL), as a crash would, and waits for it to exit.
    ///
    /// # Errors
    ///
    /// The signal could not be sent.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("sending SIGKILL")?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
