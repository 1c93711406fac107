//! Dead letters to a Kafka topic: the original key and value, with UTF-8 headers
//! `canopy-reason`, `canopy-message`, `canopy-source-topic`, `canopy-source-partition`,
//! `canopy-source-offset` (docs/SPEC.md §9).
//!
//! Exactly once: the dead letters of source partition P go, in source order, to dead-letter
//! partition P mod N. When a shard opens, it reads the end of that partition back to find the
//! last source offset already dead-lettered for P, and skips refusals up to it: a record
//! refused again after a crash (its checkpoint was lost) is not written twice. A write is
//! retried with backoff until the broker acknowledges it; it is never dropped.

use std::time::Duration;

use async_trait::async_trait;
use canopy_actors::source::{DeadLetter, DeadLetters, Flush, SourceError};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::VecDeque;
use tracing::warn;

/// A dead letter kept until the broker acknowledged it, so that it can be sent again.
pub struct Letter {
    offset: i64,
    reason: &'static str,
    message: String,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
}

pub struct KafkaDeadLetters {
    pub producer: FutureProducer,
    pub brokers: String,
    pub topic: String,
    pub source_topic: String,
    pub source_partition: i32,
    /// Partitions of the dead-letter topic.
    pub partitions: i32,
    /// The last source offset already in the dead-letter topic (or enqueued for it).
    pub last_written: i64,
    pub pending: VecDeque<(Letter, DeliveryFuture)>,
    /// A scan of the dead-letter topic started ahead (at assignment, for all partitions at
    /// once): opening several shards then costs one broker round trip, not one each.
    pub prefetched: Option<Scan>,
}

pub type Scan = tokio::task::JoinHandle<Result<i64, String>>;

/// Starts [`last_dead_letter`] for one source partition on a blocking thread.
pub fn scan(
    brokers: &str,
    topic: &str,
    partitions: i32,
    source_topic: &str,
    source_partition: i32,
) -> Scan {
    let (b, t, st) = (
        brokers.to_string(),
        topic.to_string(),
        source_topic.to_string(),
    );
    let p = source_partition.rem_euclid(partitions.max(1));
    tokio::task::spawn_blocking(move || last_dead_letter(&b, &t, p, &st, source_partition))
}

/// Where one source partition's dead letters go.
#[derive(Clone)]
struct Route {
    producer: FutureProducer,
    topic: String,
    source_topic: String,
    source_partition: i32,
    partition: i32,
}

impl KafkaDeadLetters {
    fn route(&self) -> Route {
        Route {
            producer: self.producer.clone(),
            topic: self.topic.clone(),
            source_topic: self.source_topic.clone(),
            source_partition: self.source_partition,
            partition: self.source_partition.rem_euclid(self.partitions.max(1)),
        }
    }
}

/// Hands a letter to the producer's queue, waiting for room and retrying errors.
async fn send(r: &Route, l: &Letter) -> DeliveryFuture {
    let (partition, offset) = (r.source_partition.to_string(), l.offset.to_string());
    let mut delay = Duration::from_millis(5);
    loop {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "canopy-reason",
                value: Some(l.reason),
            })
            .insert(Header {
                key: "canopy-message",
                value: Some(l.message.as_str()),
            })
            .insert(Header {
                key: "canopy-source-topic",
                value: Some(r.source_topic.as_str()),
            })
            .insert(Header {
                key: "canopy-source-partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "canopy-source-offset",
                value: Some(offset.as_str()),
            });
        let mut rec = FutureRecord::to(&r.topic)
            .payload(&l.value)
            .partition(r.partition)
            .headers(headers);
        if let Some(k) = &l.key {
            rec = rec.key(k);
        }
        match r.producer.send_result(rec) {
            Ok(f) => return f,
            Err((e, _)) => {
                warn!(error = %e, "dead-letter enqueue failed (queue full?); retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Waits for every letter in order, sending again any the broker did not take.
async fn deliver(r: Route, pending: VecDeque<(Letter, DeliveryFuture)>) -> Result<(), SourceError> {
    for (letter, fut) in pending {
        let mut result = fut.await;
        let mut delay = Duration::from_millis(50);
        loop {
            match result {
                Ok(Ok(_)) => break,
                Ok(Err((e, _))) => {
                    metrics::counter!("canopy_dead_letter_retries_total").increment(1);
                    warn!(error = %e, offset = letter.offset, retry_in_ms = delay.as_millis() as u64,
                        "dead-letter produce failed; retrying");
                }
                Err(_) => warn!(
                    offset = letter.offset,
                    "dead-letter delivery lost its producer; retrying"
                ),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            result = send(&r, &letter).await.await;
        }
    }
    Ok(())
}

fn header<'a>(h: &'a rdkafka::message::BorrowedHeaders, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|x| x.key == name)
        .and_then(|x| x.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// The highest `canopy-source-offset` of `source_partition` in dead-letter partition `p`,
/// reading back from the end in growing windows.
fn last_dead_letter(
    brokers: &str,
    topic: &str,
    p: i32,
    source_topic: &str,
    source_partition: i32,
) -> Result<i64, String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "canopy-dead-letter-scan")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let (low, high) = c
        .fetch_watermarks(topic, p, Duration::from_secs(10))
        .map_err(|e| format!("dead-letter topic {topic}[{p}] watermarks: {e}"))?;
    let mut window = 1000i64;
    let mut end = high;
    while end > low {
        let start = (end - window).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(start))
            .map_err(|e| e.to_string())?;
        c.assign(&tpl).map_err(|e| e.to_string())?;
        let mut best = -1i64;
        let mut next = start;
        let mut idle = 0;
        while next < end && idle < 100 {
            match c.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    idle = 0;
                    next = m.offset() + 1;
                    if let Some(h) = m.headers() {
                        let same = header(h, "canopy-source-topic") == Some(source_topic)
                            && header(h, "canopy-source-partition")
                                == Some(source_partition.to_string().as_str());
                        if same {
                            if let Some(o) =
                                header(h, "canopy-source-offset").and_then(|v| v.parse().ok())
                            {
                                best = best.max(o);
                            }
                        }
                    }
                }
                Some(Err(e)) => return Err(format!("reading the dead-letter topic: {e}")),
                None => idle += 1,
            }
        }
        if next < end {
            return Err(format!(
                "reading dead-letter topic {topic}[{p}] timed out at offset {next}"
            ));
        }
        if best >= 0 {
            return Ok(best);
        }
        end = start;
        window *= 4;
    }
    Ok(-1)
}

#[async_trait]
impl DeadLetters for KafkaDeadLetters {
    async fn resume(&mut self, _: Option<&[u8]>) -> Result<(), SourceError> {
        let scan = match self.prefetched.take() {
            Some(s) => s,
            None => scan(
                &self.brokers,
                &self.topic,
                self.partitions,
                &self.source_topic,
                self.source_partition,
            ),
        };
        self.last_written = scan
            .await
            .map_err(|e| SourceError::Io(e.to_string()))?
            .map_err(SourceError::Unavailable)?;
        Ok(())
    }

    async fn write(&mut self, dl: DeadLetter<'_>) -> Result<(), SourceError> {
        let offset = dl.tag as i64;
        if offset <= self.last_written && !dl.backlog {
            return Ok(()); // written before a crash; the topic has it already
        }
        let letter = Letter {
            offset,
            reason: dl.refusal.reason(),
            message: dl.refusal.to_string(),
            key: dl.origin.and_then(|o| o.key.clone()),
            value: dl.raw.to_vec(),
        };
        // Enqueued, not awaited: a broker round trip per dead letter would throttle the whole
        // partition. The checkpoint covering it waits for delivery (`sync`).
        let f = send(&self.route(), &letter).await;
        self.pending.push_back((letter, f));
        self.last_written = self.last_written.max(offset);
        Ok(())
    }

    async fn sync(&mut self) -> Result<Flush, SourceError> {
        let pending = std::mem::take(&mut self.pending);
        Ok(Flush {
            position: Vec::new(),
            durable: Box::pin(deliver(self.route(), pending)),
        })
    }
}
