//! The AMQP 0-9-1 transport of the core link (RabbitMQ, through lapin).
//!
//! Owns: one connection with a publishing channel (publisher confirms, mandatory routing,
//! persistent messages) and a consuming channel (bounded prefetch, manual ack), the durable
//! queue topology with its dead-letter queue, and reconnection with backoff. Received messages
//! go to a handler that says whether to ack or dead-letter them; the handler decides what a
//! message means, this module only moves bytes and envelope fields.
//! Must never: report a publish as done before the broker confirmed it, or as certainly not sent
//! when it may have reached the broker; ack a message before its handler ran.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::transport::{Confirm, Transport};
pub use super::transport::{Disposition, Handler, PublishError, RawMessage};
use super::wire::Envelope;

/// `amqp://USER@host/vhost` with `password` put in, percent-encoded. Err when the URL names no
/// user (the password would have nobody to belong to).
pub fn uri_with_password(url: &str, password: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "the broker URL has no scheme (amqp:// or amqps://)".to_string())?;
    let (user, host) = rest.split_once('@').ok_or_else(|| {
        "a password is configured but the URL names no user (amqp://USER@host/vhost)".to_string()
    })?;
    let encoded: String = password
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    Ok(format!("{scheme}://{user}:{encoded}@{host}"))
}

/// Header names carrying the envelope fields AMQP has no property for.
pub const HEADER_MAC: &str = "kunpay-mac";
pub const HEADER_KEY_ID: &str = "kunpay-mac-key-id";
pub const HEADER_SENT_AT_MS: &str = "kunpay-sent-at-ms";

/// Backoff between connection attempts: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:port/vhost`; holds the password, never logged.
    pub uri: String,
    /// Queues declared (durable, dead-lettering into `dead_letter_queue`) on every connect.
    pub queues: Vec<String>,
    pub dead_letter_queue: String,
    /// The queue this end consumes (kunpay: its reply queue; the core: the request queue).
    pub consume_queue: String,
    /// Unacknowledged deliveries the broker may push ahead: the bound on work in our hands.
    pub prefetch: u16,
    /// Deliveries handled at once: 1 keeps the queue's order (kunpay's replies); more lets a
    /// handler that waits (the simulator publishing its reply) overlap with the next one.
    pub concurrency: usize,
    /// How long a publish may wait for the broker's confirm.
    pub confirm_timeout: Duration,
    /// Shown in the broker's connection list ("kunpay node-1", "kunpay-coresim").
    pub connection_name: String,
    pub app_id: String,
}

impl std::fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("uri", &"<hidden>")
            .field("queues", &self.queues)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("consume_queue", &self.consume_queue)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

struct LinkState {
    publisher: Mutex<Option<Channel>>,
    connected: AtomicBool,
    connects: AtomicU64,
    stopping: AtomicBool,
    /// The live connection, so `stop` can close it.
    connection: Mutex<Option<Connection>>,
}

/// A running link: reconnects by itself until `stop`.
pub struct AmqpLink {
    runtime: tokio::runtime::Handle,
    settings: AmqpSettings,
    state: Arc<LinkState>,
}

impl AmqpLink {
    /// Starts connecting in the background on `runtime`; `handler` sees every delivery of
    /// `settings.consume_queue`, in order, one at a time.
    pub fn start(
        runtime: tokio::runtime::Handle,
        settings: AmqpSettings,
        handler: Handler,
    ) -> AmqpLink {
        assert!(settings.prefetch > 0, "prefetch bounds the work in hand");
        assert!(
            settings.concurrency > 0 && settings.concurrency <= usize::from(settings.prefetch),
            "concurrency is within the prefetch bound"
        );
        let state = Arc::new(LinkState {
            publisher: Mutex::new(None),
            connected: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            connection: Mutex::new(None),
        });
        runtime.spawn(supervise(settings.clone(), state.clone(), handler));
        AmqpLink {
            runtime,
            settings,
            state,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.state.connected.load(Ordering::Acquire)
    }

    /// Successful connections so far (the first one included).
    pub fn connects(&self) -> u64 {
        self.state.connects.load(Ordering::Acquire)
    }

    /// Waits up to `within` for a connection.
    pub fn wait_connected(&self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if self.is_connected() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.is_connected()
    }

    /// Publishes from a thread outside the runtime and waits for the broker's confirm.
    pub fn publish_blocking(
        &self,
        queue: &str,
        envelope: &Envelope,
        reply_to: Option<&str>,
    ) -> Result<(), PublishError> {
        assert!(
            tokio::runtime::Handle::try_current().is_err(),
            "publish_blocking is for worker threads; use publish inside the runtime"
        );
        self.runtime
            .block_on(self.publish(queue, envelope, reply_to))
    }

    /// Publishes persistent, mandatory, and waits for the broker's confirm.
    pub async fn publish(
        &self,
        queue: &str,
        envelope: &Envelope,
        reply_to: Option<&str>,
    ) -> Result<(), PublishError> {
        self.send(queue, envelope, reply_to).await?.await
    }

    /// Hands the message to the broker and returns the wait for its confirm, so a caller can
    /// wait for the confirm and something else (a reply) at once. Err: certainly not sent.
    pub async fn send(
        &self,
        queue: &str,
        envelope: &Envelope,
        reply_to: Option<&str>,
    ) -> Result<impl std::future::Future<Output = Result<(), PublishError>> + use<>, PublishError>
    {
        let channel = self
            .state
            .publisher
            .lock()
            .expect("publisher lock")
            .clone()
            .ok_or_else(|| PublishError::NotSent("not connected to the broker".into()))?;
        let mut headers = FieldTable::default();
        headers.insert(
            HEADER_MAC.into(),
            AMQPValue::LongString(LongString::from(envelope.mac_hex())),
        );
        headers.insert(
            HEADER_KEY_ID.into(),
            AMQPValue::LongString(LongString::from(envelope.key_id.clone())),
        );
        headers.insert(
            HEADER_SENT_AT_MS.into(),
            AMQPValue::LongLongInt(envelope.sent_at_ms as i64),
        );
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_type(envelope.message_type.name().into())
            .with_message_id(envelope.message_id.clone().into())
            .with_correlation_id(envelope.correlation_id.clone().into())
            .with_timestamp(envelope.sent_at_ms / 1000)
            .with_app_id(self.settings.app_id.clone().into())
            .with_headers(headers);
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        let confirm = channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &envelope.body,
                properties,
            )
            .await
            // Refused before anything was written to the socket.
            .map_err(|e| PublishError::NotSent(format!("publish refused: {e}")))?;
        let (confirm_timeout, queue) = (self.settings.confirm_timeout, queue.to_string());
        Ok(async move {
            match tokio::time::timeout(confirm_timeout, confirm).await {
                Err(_) => Err(PublishError::Unconfirmed(format!(
                    "no confirm within {confirm_timeout:?}"
                ))),
                Ok(Err(e)) => Err(PublishError::Unconfirmed(format!(
                    "connection lost before the confirm: {e}"
                ))),
                Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                Ok(Ok(Confirmation::Ack(Some(_)))) => Err(PublishError::NotSent(format!(
                    "no queue named \"{queue}\" (the message was returned unrouted)"
                ))),
                Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::NotSent(
                    "the broker refused the message (nack)".into(),
                )),
                Ok(Ok(Confirmation::NotRequested)) => {
                    unreachable!("the publishing channel is in confirm mode")
                }
            }
        })
    }

    /// Runs a future on the link's runtime from a thread outside it.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        assert!(
            tokio::runtime::Handle::try_current().is_err(),
            "block_on is for worker threads, not the runtime"
        );
        self.runtime.block_on(future)
    }

    /// Closes the connection and stops reconnecting.
    pub fn stop(&self) {
        self.state.stopping.store(true, Ordering::Release);
        self.state.connected.store(false, Ordering::Release);
        self.state.publisher.lock().expect("publisher lock").take();
        let connection = self
            .state
            .connection
            .lock()
            .expect("connection lock")
            .take();
        if let Some(connection) = connection {
            // Closing is best effort: the broker drops the connection anyway when we exit.
            drop(
                self.runtime
                    .spawn(async move { connection.close(200, "stopping".into()).await }),
            );
        }
    }
}

impl Transport for AmqpLink {
    fn send<'a>(
        &'a self,
        queue: &'a str,
        envelope: &'a Envelope,
        reply_to: Option<&'a str>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Confirm, PublishError>> + Send + 'a>,
    > {
        Box::pin(async move {
            let confirm = AmqpLink::send(self, queue, envelope, reply_to).await?;
            Ok(Box::pin(confirm) as Confirm)
        })
    }

    fn is_connected(&self) -> bool {
        AmqpLink::is_connected(self)
    }

    fn wait_connected(&self, within: Duration) -> bool {
        AmqpLink::wait_connected(self, within)
    }

    fn stop(&self) {
        AmqpLink::stop(self)
    }
}

impl Drop for AmqpLink {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn supervise(settings: AmqpSettings, state: Arc<LinkState>, handler: Handler) {
    let mut backoff = BACKOFF_FIRST;
    while !state.stopping.load(Ordering::Acquire) {
        let result = serve(&settings, &state, &handler, &mut backoff).await;
        state.connected.store(false, Ordering::Release);
        state.publisher.lock().expect("publisher lock").take();
        state.connection.lock().expect("connection lock").take();
        if state.stopping.load(Ordering::Acquire) {
            break;
        }
        if let Err(why) = result {
            tracing::warn!(
                queue = %settings.consume_queue,
                retry_in = ?backoff,
                "core link: broker connection lost or refused: {why}"
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn queue_arguments(dead_letter_queue: &str) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dead_letter_queue.to_string())),
    );
    arguments
}

/// Opens the AMQP connection over a TCP socket with Nagle's algorithm off. lapin's own connect
/// leaves it on, and a publish (three frames) then waits for the broker's delayed ACK: measured
/// 35-45 ms per request/reply round trip on an idle machine, ~1 ms with TCP_NODELAY.
async fn connect(uri: &str, properties: ConnectionProperties) -> Result<Connection, String> {
    use lapin::tcp::{AsyncTcpStream, TLSConfig};
    use lapin::uri::{AMQPScheme, AMQPUri};
    let uri: AMQPUri = uri
        .parse()
        .map_err(|e| format!("the broker URL is not valid: {e}"))?;
    let runtime = lapin::runtime::default_runtime().map_err(|e| format!("runtime: {e}"))?;
    Connection::connector(
        uri,
        runtime,
        async |uri: AMQPUri, _runtime| {
            let stream =
                tokio::net::TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))
                    .await?;
            stream.set_nodelay(true)?;
            let stream = AsyncTcpStream::Plain(async_compat::Compat::new(stream));
            Ok(match uri.scheme {
                AMQPScheme::AMQP => stream,
                AMQPScheme::AMQPS => {
                    stream
                        .into_tls(&uri.authority.host, TLSConfig::default())
                        .await?
                }
            })
        },
        properties,
    )
    .await
    .map_err(|e| format!("connect: {e}"))
}

/// One connection's life: connect, declare, consume until it fails.
async fn serve(
    settings: &AmqpSettings,
    state: &LinkState,
    handler: &Handler,
    backoff: &mut Duration,
) -> Result<(), String> {
    let properties = ConnectionProperties::default()
        .with_connection_name(settings.connection_name.clone().into());
    let connection = connect(&settings.uri, properties).await?;
    let publisher = connection
        .create_channel()
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("confirm mode: {e}"))?;
    let consumer_channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    consumer_channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| format!("prefetch: {e}"))?;
    publisher
        .queue_declare(
            settings.dead_letter_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("declare {}: {e}", settings.dead_letter_queue))?;
    for queue in &settings.queues {
        publisher
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                queue_arguments(&settings.dead_letter_queue),
            )
            .await
            .map_err(|e| {
                format!(
                    "declare {queue}: {e} (an existing queue with other arguments must be deleted \
                     or renamed in the configuration)"
                )
            })?;
    }
    let mut deliveries = consumer_channel
        .basic_consume(
            settings.consume_queue.as_str().into(),
            ShortString::from(format!("{}-{}", settings.app_id, std::process::id())),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("consume {}: {e}", settings.consume_queue))?;
    *state.publisher.lock().expect("publisher lock") = Some(publisher);
    *state.connection.lock().expect("connection lock") = Some(connection);
    state.connects.fetch_add(1, Ordering::AcqRel);
    state.connected.store(true, Ordering::Release);
    *backoff = BACKOFF_FIRST;
    tracing::info!(queue = %settings.consume_queue, "core link: connected to the broker");
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.concurrency));
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery.map_err(|e| format!("delivery: {e}"))?;
        let header = |name: &str| {
            delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name).cloned())
        };
        let text = |value: Option<AMQPValue>| match value {
            Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).ok(),
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
            _ => None,
        };
        let sent_at_ms = match header(HEADER_SENT_AT_MS) {
            Some(AMQPValue::LongLongInt(v)) if v >= 0 => Some(v as u64),
            Some(AMQPValue::LongUInt(v)) => Some(v as u64),
            Some(AMQPValue::LongInt(v)) if v >= 0 => Some(v as u64),
            _ => None,
        };
        let short = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_string());
        let message = RawMessage {
            message_type: short(delivery.properties.kind()),
            message_id: short(delivery.properties.message_id()),
            correlation_id: short(delivery.properties.correlation_id()),
            reply_to: short(delivery.properties.reply_to()),
            sent_at_ms,
            key_id: text(header(HEADER_KEY_ID)),
            mac: text(header(HEADER_MAC)),
            body: delivery.data.clone(),
            redelivered: delivery.redelivered,
        };
        if settings.concurrency == 1 {
            settle(handler(message).await, &delivery).await?;
        } else {
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| format!("handler slots: {e}"))?;
            let handler = handler.clone();
            tokio::spawn(async move {
                let disposition = handler(message).await;
                if let Err(why) = settle(disposition, &delivery).await {
                    // The channel is gone; the broker redelivers what was not settled.
                    tracing::warn!("core link: {why}");
                }
                drop(permit);
            });
        }
    }
    Err("the broker cancelled the consumer".into())
}

/// Acknowledges, dead-letters or requeues one delivery as its handler decided.
async fn settle(
    disposition: Disposition,
    delivery: &lapin::message::Delivery,
) -> Result<(), String> {
    let settled = match disposition {
        Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
        Disposition::DeadLetter => delivery.reject(BasicRejectOptions { requeue: false }).await,
        Disposition::Requeue => {
            // Not at once: a fault that persists would spin the message through the queue.
            tokio::time::sleep(BACKOFF_FIRST).await;
            delivery.reject(BasicRejectOptions { requeue: true }).await
        }
    };
    settled
        .map(|_| ())
        .map_err(|e| format!("settle a delivery: {e}"))
}
