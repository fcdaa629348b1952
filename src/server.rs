//! HTTP serving shared by every listener: binding, a bound on open connections, in-flight
//! accounting, per-route metrics and graceful drain with a deadline.
//!
//! Owns: the life of a listening socket from bind to the last answered request.
//! Must never: accept without a bound (connections wait in the kernel backlog beyond
//! the limit), or cut off a request that is being answered before its drain deadline.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::ops::metrics::{ListenerLabels, Metrics, RequestLabels};

/// Binds before the privilege drop so ports below 1024 work; the error names the config key.
pub fn bind(addr: SocketAddr, config_key: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::AddrInUse => format!(
                "; another process holds it (find it with: ss -ltnp 'sport = :{}')",
                addr.port()
            ),
            io::ErrorKind::PermissionDenied => {
                "; ports below 1024 need root or CAP_NET_BIND_SERVICE".to_string()
            }
            io::ErrorKind::AddrNotAvailable => {
                "; no interface of this host has that address".to_string()
            }
            _ => String::new(),
        };
        anyhow::anyhow!("cannot listen on {addr} ({config_key}): {e}{hint}")
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A TCP listener that holds a permit per open connection.
struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

/// A connection and the permit it holds; the permit returns when the connection closes.
pub struct PermittedStream<S = TcpStream> {
    stream: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for PermittedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PermittedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = PermittedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (PermittedStream, SocketAddr) {
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(permit) => permit,
            // The semaphore is never closed; if it were, stop accepting rather than spin.
            Err(_) => std::future::pending().await,
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        PermittedStream {
                            stream,
                            _permit: permit,
                        },
                        peer,
                    );
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on a full fd table.
                    tracing::warn!(error = %e, "accept failed; retrying in 100ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[derive(Clone)]
struct Accounting {
    listener: &'static str,
    in_flight: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

async fn account(State(accounting): State<Accounting>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let labels = ListenerLabels {
        listener: accounting.listener,
    };
    let gauge = accounting
        .metrics
        .http_in_flight
        .get_or_create(&labels)
        .clone();
    accounting.in_flight.fetch_add(1, Ordering::SeqCst);
    gauge.inc();
    let started = Instant::now();
    let response = next.run(request).await;
    gauge.dec();
    accounting.in_flight.fetch_sub(1, Ordering::SeqCst);
    accounting
        .metrics
        .http_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    accounting
        .metrics
        .http_requests
        .get_or_create(&RequestLabels {
            listener: accounting.listener,
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// A listener being served; dropping it does not stop it, [`Served::drain`] does.
pub struct Served {
    pub name: &'static str,
    pub local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    in_flight: Arc<AtomicUsize>,
    task: JoinHandle<io::Result<()>>,
}

/// TLS in front of a listener: handshakes run in their own tasks (a slow client cannot hold up
/// accepting others) and only finished handshakes reach the HTTP server.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(
        PermittedStream<tokio_openssl::SslStream<TcpStream>>,
        SocketAddr,
    )>,
    local_addr: SocketAddr,
}

/// Bound on a TLS handshake; a client that stalls longer is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    fn spawn(
        inner: TcpListener,
        permits: Arc<Semaphore>,
        acceptor: openssl::ssl::SslAcceptor,
    ) -> io::Result<TlsListener> {
        let local_addr = inner.local_addr()?;
        let (ready_tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = Arc::new(acceptor);
        tokio::spawn(async move {
            let mut bounded = BoundedListener { inner, permits };
            loop {
                let (tcp, peer) = axum::serve::Listener::accept(&mut bounded).await;
                if ready_tx.is_closed() {
                    break;
                }
                let acceptor = acceptor.clone();
                let ready_tx = ready_tx.clone();
                tokio::spawn(async move {
                    let PermittedStream { stream, _permit } = tcp;
                    let Ok(ssl) = openssl::ssl::Ssl::new(acceptor.context()) else {
                        return;
                    };
                    let Ok(mut tls) = tokio_openssl::SslStream::new(ssl, stream) else {
                        return;
                    };
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, Pin::new(&mut tls).accept())
                        .await
                    {
                        Ok(Ok(())) => {
                            let _ = ready_tx
                                .send((
                                    PermittedStream {
                                        stream: tls,
                                        _permit,
                                    },
                                    peer,
                                ))
                                .await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local_addr })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = PermittedStream<tokio_openssl::SslStream<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

pub fn serve(
    name: &'static str,
    listener: std::net::TcpListener,
    router: Router,
    max_connections: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Served> {
    serve_with(name, listener, None, router, max_connections, metrics)
}

/// Like [`serve`], with TLS when `tls` is given.
pub fn serve_with(
    name: &'static str,
    listener: std::net::TcpListener,
    tls: Option<openssl::ssl::SslAcceptor>,
    router: Router,
    max_connections: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Served> {
    assert!(
        max_connections > 0,
        "a listener must accept at least one connection"
    );
    let listener = TcpListener::from_std(listener)?;
    let local_addr = listener.local_addr()?;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let router = router.layer(axum::middleware::from_fn_with_state(
        Accounting {
            listener: name,
            in_flight: in_flight.clone(),
            metrics,
        },
        account,
    ));
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(max_connections));
    let stop = async move {
        let _ = shutdown_rx.wait_for(|stop| *stop).await;
    };
    let task = match tls {
        None => {
            let bounded = BoundedListener {
                inner: listener,
                permits,
            };
            tokio::spawn(async move {
                axum::serve(bounded, router)
                    .with_graceful_shutdown(stop)
                    .await
            })
        }
        Some(acceptor) => {
            let tls = TlsListener::spawn(listener, permits, acceptor)?;
            tokio::spawn(async move { axum::serve(tls, router).with_graceful_shutdown(stop).await })
        }
    };
    Ok(Served {
        name,
        local_addr,
        shutdown,
        in_flight,
        task,
    })
}

impl Served {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Stops accepting, lets in-flight requests finish until `deadline`, then gives up on the
    /// rest. Returns how many requests were abandoned (0 on a clean drain).
    pub async fn drain(self, deadline: Instant) -> usize {
        let _ = self.shutdown.send(true);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let in_flight = self.in_flight.clone();
        let mut task = self.task;
        match tokio::time::timeout(remaining, &mut task).await {
            Ok(Ok(Ok(()))) => 0,
            Ok(Ok(Err(e))) => {
                tracing::error!(listener = self.name, error = %e, "listener failed while draining");
                in_flight.load(Ordering::SeqCst)
            }
            Ok(Err(join_error)) => {
                tracing::error!(listener = self.name, error = %join_error, "listener task failed while draining");
                in_flight.load(Ordering::SeqCst)
            }
            Err(_elapsed) => {
                task.abort();
                // Count at least one: the listener did not finish, so something was cut off
                // (possibly a connection still sending a request).
                in_flight.load(Ordering::SeqCst).max(1)
            }
        }
    }
}
