//! Logging: `tracing` events to syslog/journald or stderr, structured, masked.
//!
//! Owns: the subscriber, its sinks, the reloadable level filter and the masking of every line.
//! Must never: write a line that has not passed through [`mask::mask_line`], block the caller
//! on an unbounded buffer (one line is bounded by `log.max_line`), or panic when the sink fails.

pub mod mask;

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogConfig, LogFormat, LogTarget};

type SyslogLogger = syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>;

#[derive(Clone)]
enum Sink {
    Stderr,
    Syslog(Arc<Mutex<SyslogLogger>>),
}

/// Creates one buffered writer per event; the buffer is masked and emitted as one line on drop.
#[derive(Clone)]
struct MaskingMakeWriter {
    sink: Sink,
    max_line: usize,
}

struct LineWriter {
    buffer: Vec<u8>,
    level: Level,
    sink: Sink,
    max_line: usize,
}

impl Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        // Keep a little beyond the cap so the cut can be marked; drop the rest silently rather
        // than growing without bound.
        let room = (self.max_line + 64).saturating_sub(self.buffer.len());
        self.buffer
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.buffer);
        let text = text.trim_end_matches('\n');
        let masked = mask::mask_line(text);
        let line: std::borrow::Cow<str> = if masked.len() > self.max_line {
            let mut cut = self.max_line;
            while !masked.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{} [truncated at log.max_line]", &masked[..cut]).into()
        } else {
            masked
        };
        match &self.sink {
            Sink::Stderr => {
                let mut stderr = io::stderr().lock();
                if FINAL_LINE_WRITTEN.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                // A failing stderr has nowhere to report to; dropping the line is the only option.
                let _ = writeln!(stderr, "{line}");
            }
            Sink::Syslog(logger) => {
                let Ok(mut logger) = logger.lock() else {
                    return;
                };
                let line = line.into_owned();
                let _ = match self.level {
                    Level::ERROR => logger.err(line),
                    Level::WARN => logger.warning(line),
                    Level::INFO => logger.info(line),
                    Level::DEBUG | Level::TRACE => logger.debug(line),
                };
            }
        }
    }
}

impl<'a> MakeWriter<'a> for MaskingMakeWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        self.line(Level::INFO)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter {
        self.line(*meta.level())
    }
}

impl MaskingMakeWriter {
    fn line(&self, level: Level) -> LineWriter {
        LineWriter {
            buffer: Vec::with_capacity(256),
            level,
            sink: self.sink.clone(),
            max_line: self.max_line,
        }
    }
}

static TO_STDERR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static FINAL_LINE_WRITTEN: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Writes the process's last line to stderr; log lines after it are dropped, so an operator
/// (and systemd's status) sees the reason for the exit last, not a background thread's
/// afterthought. Checked under the stderr lock, so no line can slip in after it.
pub fn print_final_line(line: &str) {
    let mut stderr = io::stderr().lock();
    FINAL_LINE_WRITTEN.store(true, std::sync::atomic::Ordering::Release);
    let _ = writeln!(stderr, "{line}");
}

/// Whether the log already goes to stderr (so a fatal line printed there would appear twice).
pub fn writes_to_stderr() -> bool {
    TO_STDERR.load(std::sync::atomic::Ordering::Relaxed)
}

/// Lets SIGHUP change the level filter without restarting.
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
}

impl LogHandle {
    pub fn set_level(&self, level: &str) -> anyhow::Result<()> {
        let filter = EnvFilter::builder()
            .parse(level)
            .with_context(|| format!("log.level \"{level}\" is not a filter"))?;
        self.filter
            .reload(filter)
            .context("reloading the log filter")?;
        Ok(())
    }
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(config: &LogConfig, process_name: &str) -> anyhow::Result<LogHandle> {
    let sink = match config.target {
        LogTarget::Stderr => {
            TO_STDERR.store(true, std::sync::atomic::Ordering::Relaxed);
            Sink::Stderr
        }
        LogTarget::Syslog => {
            let facility = config.syslog_facility.parse().map_err(|()| {
                anyhow::anyhow!(
                    "log.syslog_facility \"{}\" is unknown",
                    config.syslog_facility
                )
            })?;
            let formatter = syslog::Formatter3164 {
                facility,
                hostname: None,
                process: process_name.to_string(),
                pid: std::process::id(),
            };
            let logger = syslog::unix(formatter).map_err(|e| {
                anyhow::anyhow!(
                    "cannot connect to syslog (/dev/log): {e}; is journald or rsyslog running? \
                     Or set log.target = \"stderr\""
                )
            })?;
            Sink::Syslog(Arc::new(Mutex::new(logger)))
        }
    };
    let writer = MaskingMakeWriter {
        sink,
        max_line: config.max_line,
    };
    let filter = EnvFilter::builder()
        .parse(&config.level)
        .with_context(|| format!("log.level \"{}\" is not a filter", config.level))?;
    let (filter, handle) = reload::Layer::new(filter);
    // Syslog and journald stamp their own time; stderr under systemd goes to the journal too,
    // but a developer running by hand wants timestamps.
    let with_time = config.target == LogTarget::Stderr;
    let registry = tracing_subscriber::registry().with(filter);
    let result = match (config.format, with_time) {
        (LogFormat::Json, _) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(writer),
            )
            .try_init(),
        (LogFormat::Text, true) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(writer),
            )
            .try_init(),
        (LogFormat::Text, false) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .without_time()
                    .with_level(true)
                    .with_writer(writer),
            )
            .try_init(),
    };
    result.context("installing the log subscriber")?;
    Ok(LogHandle { filter: handle })
}
