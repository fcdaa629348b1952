//! A TCP proxy for tests: put it between kunpay and a real server (RabbitMQ, PostgreSQL) to
//! sever the connection, refuse new ones, or delay the bytes, mid-flow.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct State {
    up: AtomicBool,
    delay_ms: AtomicU64,
    open: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
}

impl Proxy {
    /// Listens on a free local port and forwards to `target` (host:port).
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            up: AtomicBool::new(true),
            delay_ms: AtomicU64::new(0),
            open: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let target = target.to_string();
        let accept_state = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_state.stop.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                if !accept_state.up.load(Ordering::Acquire) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                {
                    let mut open = accept_state.open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let state = accept_state.clone();
                    std::thread::spawn(move || pump(from, to, &state));
                }
            }
        });
        Proxy { port, state }
    }

    /// Cuts every open connection and refuses new ones until `restore`.
    pub fn sever(&self) {
        self.state.up.store(false, Ordering::Release);
        for stream in self.state.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.state.up.store(true, Ordering::Release);
    }

    /// Holds every chunk of bytes this long before passing it on.
    pub fn delay(&self, by: Duration) {
        self.state
            .delay_ms
            .store(by.as_millis() as u64, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        self.sever();
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, state: &State) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = state.delay_ms.load(Ordering::Acquire);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        if !state.up.load(Ordering::Acquire) || to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
