//! How the process logs (`init`), and the writer behind it. Log lines leave through a bounded queue
//! and a thread of their own, never from the async workers directly: a journald that reads slowly (or a pipe nobody reads) would otherwise block a worker on
//! stderr, then every worker on its lock, and the watchdog would kill a proxy that was only logging.
//! When the queue is full, lines are dropped and counted; the count is written once there is room.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

/// Lines waiting for stderr before new ones are dropped.
const QUEUE: usize = 10_000;

/// Lines queued and not yet written, for [`drain`] at exit.
static PENDING: AtomicU64 = AtomicU64::new(0);

/// Waits (up to `timeout`) for the queued lines to reach stderr: called as the process ends, so its
/// last words ("stopped", an error) are not lost with the writer thread.
pub fn drain(timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while PENDING.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[derive(Clone)]
pub struct NonBlocking {
    tx: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl NonBlocking {
    /// Starts the writer thread (it ends with the process).
    pub fn stderr() -> NonBlocking {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let seen = dropped.clone();
        let _ = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    // Locked per line, not for the thread's life: `eprintln!` elsewhere must not
                    // wait for the next log line.
                    let mut err = std::io::stderr().lock();
                    let lost = seen.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        let _ = writeln!(
                            err,
                            "mediaproxy: {lost} log lines dropped (stderr was not being read)"
                        );
                    }
                    let _ = err.write_all(&line);
                    PENDING.fetch_sub(1, Ordering::AcqRel);
                }
            });
        NonBlocking { tx, dropped }
    }
}

impl Write for NonBlocking {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        PENDING.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(buf.to_vec()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                PENDING.fetch_sub(1, Ordering::AcqRel);
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                PENDING.fetch_sub(1, Ordering::AcqRel);
                // No writer thread (it could not start): write here rather than lose the line.
                let _ = std::io::stderr().write_all(buf);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for NonBlocking {
    type Writer = NonBlocking;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Logs on stderr, for journald: colours only on a terminal and without `NO_COLOR`; no timestamps
/// under systemd (journald adds its own). `MEDIAPROXY_LOG` is about mediaproxy: a bare level
/// (`debug`) applies to mediaproxy while its dependencies stay at `warn`; a full filter
/// (`info,hyper=debug`) is taken as written.
pub fn init() {
    use std::io::IsTerminal;
    let wanted = std::env::var("MEDIAPROXY_LOG").unwrap_or_default();
    let filter = match wanted.trim() {
        "" => "warn,mediaproxy=info".to_string(),
        level if !level.contains(['=', ',']) => format!("warn,mediaproxy={level}"),
        full => full.to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,mediaproxy=info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(NonBlocking::stderr());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
