//! The message transport under the core link, as a trait: what the MQ bridge (`bridge.rs`) and
//! the simulator service (`coresim.rs`) need from a broker, so IBM MQ, RocketMQ or TongLINK/Q
//! can be added next to AMQP (`amqp.rs`) without touching them. docs/core-link.md says what an
//! adapter must guarantee.
//!
//! Owns: the transport-neutral message (`RawMessage`: the envelope fields as received, nothing
//! verified), the handler a transport feeds every delivery to, and the publish verdicts.
//! Must never: interpret a message (the handler does), or blur the three publish verdicts:
//! confirmed, certainly not sent, and unknown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::wire::Envelope;

/// A received message as the broker gave it; nothing is verified yet.
#[derive(Clone)]
pub struct RawMessage {
    pub message_type: Option<String>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub sent_at_ms: Option<u64>,
    pub key_id: Option<String>,
    pub mac: Option<String>,
    pub body: Vec<u8>,
    pub redelivered: bool,
}

impl RawMessage {
    /// Checks the MAC and rebuilds the envelope.
    pub fn open(&self, keys: &super::wire::MacKeys) -> Result<Envelope, super::wire::WireError> {
        Envelope::open(
            keys,
            self.message_type.as_deref(),
            self.message_id.as_deref(),
            self.correlation_id.as_deref(),
            self.sent_at_ms,
            self.key_id.as_deref(),
            self.mac.as_deref(),
            &self.body,
        )
    }
}

/// What to do with a received message once its handler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    /// Rejected without requeue: the broker moves it to the dead-letter queue for a person.
    DeadLetter,
    /// Given back to the queue for another attempt (the handler could not finish it).
    Requeue,
}

/// Runs once per delivery, in order; the delivery is settled with what it returns. A handler
/// that answers (the core simulator) publishes its reply before returning, so a delivery is
/// acknowledged only once its reply is with the broker.
pub type Handler = Arc<
    dyn Fn(RawMessage) -> std::pin::Pin<Box<dyn std::future::Future<Output = Disposition> + Send>>
        + Send
        + Sync,
>;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    /// The message certainly did not reach a queue.
    #[error("not sent: {0}")]
    NotSent(String),
    /// It may or may not have reached the queue (the connection failed before the confirm).
    #[error("not confirmed: {0}")]
    Unconfirmed(String),
}

impl RawMessage {
    /// The message as a transport delivers `envelope` (sent with `reply_to`).
    pub fn from_envelope(envelope: &Envelope, reply_to: Option<&str>) -> RawMessage {
        RawMessage {
            message_type: Some(envelope.message_type.name().to_string()),
            message_id: Some(envelope.message_id.clone()),
            correlation_id: Some(envelope.correlation_id.clone()),
            reply_to: reply_to.map(str::to_string),
            sent_at_ms: Some(envelope.sent_at_ms),
            key_id: Some(envelope.key_id.clone()),
            mac: Some(envelope.mac_hex()),
            body: envelope.body.clone(),
            redelivered: false,
        }
    }
}

/// The wait for the broker's verdict on one message it was handed.
pub type Confirm = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

/// A running connection to a broker: it reconnects by itself until `stop`, and feeds every
/// delivery of the queue it consumes to the handler it was started with.
pub trait Transport: Send + Sync {
    /// Hands `envelope` to the broker for `queue` (persistent, with `reply_to` when given) and
    /// returns the wait for the broker's confirm, so a caller can wait for the confirm and a
    /// reply at once. Err: certainly not sent (not connected, refused before writing).
    fn send<'a>(
        &'a self,
        queue: &'a str,
        envelope: &'a Envelope,
        reply_to: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<Confirm, PublishError>> + Send + 'a>>;

    fn is_connected(&self) -> bool;

    /// Waits up to `within` for a connection.
    fn wait_connected(&self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if self.is_connected() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.is_connected()
    }

    /// Closes the connection and stops reconnecting.
    fn stop(&self);
}

/// Publishes and waits for the broker's confirm.
pub async fn publish(
    transport: &dyn Transport,
    queue: &str,
    envelope: &Envelope,
    reply_to: Option<&str>,
) -> Result<(), PublishError> {
    transport.send(queue, envelope, reply_to).await?.await
}

/// Starts a transport whose deliveries go to the given handler (how `MqCore` and the simulator
/// service are given their transport).
pub type Connect = Box<dyn FnOnce(Handler) -> Arc<dyn Transport>>;

/// An in-memory broker for the bridge's unit tests: named bounded queues, one consumer each,
/// deliveries handled one at a time, requeue and dead-letter as the handler says. The real
/// broker's behaviour (confirms, reconnects, persistence) is tested against RabbitMQ in
/// tests/core_link.rs; this only lets the request/reply logic run without a network.
#[cfg(test)]
pub(crate) mod memory {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    const QUEUE_BOUND: usize = 1024;

    pub(crate) struct MemoryBroker {
        runtime: tokio::runtime::Handle,
        queues: Mutex<HashMap<String, tokio::sync::mpsc::Sender<RawMessage>>>,
        pub(crate) dead_lettered: AtomicUsize,
    }

    struct MemoryLink {
        broker: Arc<MemoryBroker>,
        connected: AtomicBool,
    }

    impl MemoryBroker {
        pub(crate) fn new(runtime: tokio::runtime::Handle) -> Arc<MemoryBroker> {
            Arc::new(MemoryBroker {
                runtime,
                queues: Mutex::new(HashMap::new()),
                dead_lettered: AtomicUsize::new(0),
            })
        }

        fn push(&self, queue: &str, message: RawMessage) -> Result<(), PublishError> {
            let sender = self.queues.lock().unwrap().get(queue).cloned();
            let sender = sender
                .ok_or_else(|| PublishError::NotSent(format!("no queue named \"{queue}\"")))?;
            sender
                .try_send(message)
                .map_err(|e| PublishError::NotSent(format!("queue \"{queue}\": {e}")))
        }

        /// A transport consuming `queue` (declared now).
        pub(crate) fn connect(self: &Arc<Self>, queue: &str) -> Connect {
            let (broker, queue) = (self.clone(), queue.to_string());
            Box::new(move |handler: Handler| {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<RawMessage>(QUEUE_BOUND);
                broker.queues.lock().unwrap().insert(queue.clone(), tx);
                let consumer = broker.clone();
                broker.runtime.spawn(async move {
                    while let Some(message) = rx.recv().await {
                        match handler(message.clone()).await {
                            Disposition::Ack => {}
                            Disposition::DeadLetter => {
                                consumer.dead_lettered.fetch_add(1, Ordering::SeqCst);
                            }
                            Disposition::Requeue => {
                                let again = RawMessage {
                                    redelivered: true,
                                    ..message
                                };
                                let _ = consumer.push(&queue, again);
                            }
                        }
                    }
                });
                Arc::new(MemoryLink {
                    broker,
                    connected: AtomicBool::new(true),
                }) as Arc<dyn Transport>
            })
        }

        /// Puts a raw message on `queue` as if someone had published it.
        pub(crate) fn inject(&self, queue: &str, message: RawMessage) {
            self.push(queue, message).unwrap();
        }
    }

    impl Transport for MemoryLink {
        fn send<'a>(
            &'a self,
            queue: &'a str,
            envelope: &'a Envelope,
            reply_to: Option<&'a str>,
        ) -> Pin<Box<dyn Future<Output = Result<Confirm, PublishError>> + Send + 'a>> {
            Box::pin(async move {
                if !self.connected.load(Ordering::Acquire) {
                    return Err(PublishError::NotSent("not connected".into()));
                }
                self.broker
                    .push(queue, RawMessage::from_envelope(envelope, reply_to))?;
                Ok(Box::pin(async { Ok(()) }) as Confirm)
            })
        }

        fn is_connected(&self) -> bool {
            self.connected.load(Ordering::Acquire)
        }

        fn stop(&self) {
            self.connected.store(false, Ordering::Release);
        }
    }
}
