//! The broker side of tests that need RabbitMQ: the URL, the test MAC key, and queue names
//! of a test's own that are deleted when it ends.

use std::sync::Arc;
use std::time::Duration;

use kunpay::core::amqp::AmqpSettings;
use kunpay::core::wire::MacKeys;
use uuid::Uuid;
use zeroize::Zeroizing;

pub fn amqp_url() -> String {
    std::env::var("KUNPAY_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub const MAC_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

pub fn keys() -> Arc<MacKeys> {
    Arc::new(MacKeys::single("test-2026", Zeroizing::new(hex::decode(MAC_HEX).unwrap())).unwrap())
}

/// Queue names of one test; the queues are deleted when it ends.
pub struct Queues {
    pub request: String,
    pub reply: String,
    pub dead: String,
}

impl Queues {
    pub fn new() -> Queues {
        let tag = Uuid::now_v7().simple().to_string();
        Queues {
            request: format!("test.{tag}.request"),
            reply: format!("test.{tag}.reply"),
            dead: format!("test.{tag}.dead"),
        }
    }

    pub fn settings(&self, consume: &str, app: &str) -> AmqpSettings {
        AmqpSettings {
            uri: amqp_url(),
            queues: vec![self.request.clone(), self.reply.clone()],
            dead_letter_queue: self.dead.clone(),
            consume_queue: consume.to_string(),
            prefetch: 32,
            concurrency: if app == "coresim" { 8 } else { 1 },
            confirm_timeout: Duration::from_secs(5),
            connection_name: format!("test {app}"),
            app_id: app.into(),
        }
    }

    /// Settings that declare and consume `queue` alone (a core simulator on the request queue,
    /// a forger on a queue of its own).
    pub fn only(&self, queue: &str, app: &str) -> AmqpSettings {
        AmqpSettings {
            queues: vec![queue.to_string()],
            ..self.settings(queue, app)
        }
    }

    /// Messages waiting in a queue (RabbitMQ's count, after a moment to settle).
    pub fn depth(&self, queue: &str) -> u32 {
        std::thread::sleep(Duration::from_millis(300));
        inspect(queue).expect("the queue exists").0
    }

    /// Consumers of a queue; `None` while nobody has declared it.
    pub fn consumers(&self, queue: &str) -> Option<u32> {
        inspect(queue).map(|(_, consumers)| consumers)
    }
}

/// (messages, consumers) of a queue, by a passive declare; `None` when it does not exist.
fn inspect(queue: &str) -> Option<(u32, u32)> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let q = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .ok()?;
        Some((q.message_count(), q.consumer_count()))
    })
}

impl Drop for Queues {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Runtime::new() else {
            return;
        };
        runtime.block_on(async {
            let Ok(conn) =
                lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                    .await
            else {
                return;
            };
            let Ok(channel) = conn.create_channel().await else {
                return;
            };
            let forger = format!("{}.forger", self.request);
            for q in [&self.request, &self.reply, &self.dead, &forger] {
                let _ = channel
                    .queue_delete(
                        q.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
            }
        });
    }
}

pub fn write_secret(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `amqp_url()` split into (scheme, user, password, host:port).
pub fn broker_parts() -> (String, String, String, String) {
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let (userinfo, host) = rest.split_once('@').unwrap();
    let (user, password) = userinfo.split_once(':').unwrap();
    (
        scheme.into(),
        user.into(),
        password.into(),
        host.split('/').next().unwrap().into(),
    )
}
