//! Hot reload of the risk directory: file changes are watched with `notify` (and SIGHUP asks
//! for a reload too); a new set is loaded and checked completely, then swapped in whole.
//!
//! Owns: the watcher thread, the debounce, and the record of the last reload (for /metrics and
//! `kunpayctl risk status`).
//! Must never: replace the running set with one that failed to load: an invalid file is logged
//! with its file, line and reason and the old set keeps deciding.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};

use super::{LoadError, RiskEngine, load_dir};

/// How long the directory must be quiet before a reload (an editor writes in several steps).
const DEBOUNCE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub reloads: u64,
    pub failures: u64,
    /// The last failure, while it is the latest word (cleared by a good reload).
    pub last_error: Option<LoadError>,
}

pub struct Reloader {
    dir: PathBuf,
    engine: Arc<RiskEngine>,
    status: Mutex<ReloadStatus>,
}

impl Reloader {
    pub fn new(dir: &Path, engine: Arc<RiskEngine>) -> Arc<Reloader> {
        Arc::new(Reloader {
            dir: dir.to_path_buf(),
            engine,
            status: Mutex::new(ReloadStatus::default()),
        })
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the directory and swaps it in; on any error the running set stays.
    pub fn reload_now(&self) -> Result<String, LoadError> {
        let result = load_dir(&self.dir).and_then(|loaded| {
            let version = loaded.version.clone();
            let rules = loaded.rules.rules.len();
            self.engine.replace(loaded)?;
            Ok((version, rules))
        });
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok((version, rules)) => {
                status.reloads += 1;
                status.last_error = None;
                tracing::info!(%version, rules, "risk rules reloaded");
                Ok(version)
            }
            Err(e) => {
                status.failures += 1;
                status.last_error = Some(e.clone());
                tracing::error!(
                    running = %self.engine.version(),
                    "risk rules NOT reloaded, the running set stays: {e}"
                );
                Err(e)
            }
        }
    }

    /// A handle that asks for a reload (SIGHUP).
    pub fn start_watching(self: &Arc<Self>) -> notify::Result<SyncSender<()>> {
        let (poke, pokes) = sync_channel::<()>(1);
        let file_poke = poke.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    // A full channel already holds a reload request.
                    let _ = file_poke.try_send(());
                }
            })?;
        watcher.watch(&self.dir, RecursiveMode::Recursive)?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("risk-reload".into())
            .spawn(move || {
                let _watcher = watcher;
                while pokes.recv().is_ok() {
                    // Wait until the directory has been quiet for a moment.
                    loop {
                        match pokes.recv_timeout(DEBOUNCE) {
                            Ok(()) => continue,
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    let _ = me.reload_now();
                }
            })
            .expect("spawning the risk reload thread");
        Ok(poke)
    }
}
