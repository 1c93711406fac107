//! Writing NDJSON records to a topic, keyed by tenant, in order (`canopy produce` and
//! `canopy loadgen --brokers`). One producer, one request in flight per connection, so a
//! tenant's records keep their order inside their partition.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

#[derive(Default)]
pub struct Delivery {
    pub failed: AtomicU64,
}

pub struct Ctx(Arc<Delivery>);

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = r {
            self.0.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "record not delivered");
        }
    }
}

/// The tenant a record line names, used as its key (None when the line is not such JSON: it
/// will be dead-lettered anyway).
pub fn tenant_key(line: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct T {
        tenant: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<T>(line).ok()?.tenant? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    }
}

/// A `Write` that produces every line to `topic`, paced to `rate` lines/s when given.
pub struct TopicWriter {
    producer: ThreadedProducer<Ctx>,
    delivery: Arc<Delivery>,
    topic: String,
    rate: Option<f64>,
    started: Instant,
    sent: u64,
    line: Vec<u8>,
}

impl TopicWriter {
    pub fn new(brokers: &str, topic: &str, rate: Option<f64>) -> Result<Self, KafkaError> {
        let delivery = Arc::new(Delivery::default());
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "1")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "120000")
            .create_with_context(Ctx(delivery.clone()))?;
        Ok(TopicWriter {
            producer,
            delivery,
            topic: topic.to_string(),
            rate,
            started: Instant::now(),
            sent: 0,
            line: Vec::new(),
        })
    }

    fn send(&mut self, line: &[u8]) -> std::io::Result<()> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        if let Some(r) = self.rate {
            let due = self.started + Duration::from_secs_f64(self.sent as f64 / r);
            if let Some(w) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
        }
        let key = tenant_key(line);
        loop {
            let mut rec = BaseRecord::to(&self.topic).payload(line);
            if let Some(k) = &key {
                rec = rec.key(k.as_str());
            }
            match self.producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(std::io::Error::other(e)),
            }
        }
        self.sent += 1;
        Ok(())
    }

    /// Waits until every record is acknowledged; returns how many were produced.
    pub fn finish(mut self) -> std::io::Result<u64> {
        if !self.line.is_empty() {
            let l = std::mem::take(&mut self.line);
            self.send(&l)?;
        }
        self.producer
            .flush(Duration::from_secs(120))
            .map_err(std::io::Error::other)?;
        let failed = self.delivery.failed.load(Ordering::Relaxed);
        if failed > 0 {
            return Err(std::io::Error::other(format!(
                "{failed} records were not delivered"
            )));
        }
        Ok(self.sent)
    }
}

impl Write for TopicWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                let l = std::mem::take(&mut self.line);
                self.send(&l)?;
            } else {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
