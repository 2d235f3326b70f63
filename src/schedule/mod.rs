//! The scheduler: fires each schedule at its cron times, exactly once per time.
//!
//! Ownership: every process is a member of one consumer group over the schedules topic and the
//! schedule-fires topic. The two have the same number of partitions and the range assignor gives
//! partition `p` of both to the same member, so each schedule (settings and last fire, both keyed
//! by its id) has exactly one owner, N processes share the work, and a dead one's partitions move
//! to the others. The owner reads its partitions from the beginning (nothing is committed: the
//! compacted topics are small) and keeps its own copy of their schedules and last fires.
//!
//! Exactly once: a fire writes the fired messages (to the ready topic or the delay ladder), their
//! CREATED events, and the schedule's new last-fire record in **one Kafka transaction**, through a
//! transactional producer whose identity is the partition (`<prefix>scheduler-<p>`). A process
//! that takes partition `p` over, once it sees a schedule there, first initialises that producer,
//! which fences the previous owner (its commits fail from then on) and aborts any transaction it
//! left open; it then writes a barrier record into both partitions and reads them up to it before
//! it fires anything. (A partition without schedules costs no producer.) So it sees every fire
//! the previous owner committed, and no fire can be committed twice: a takeover neither fires a
//! time twice nor skips it. A time missed while nobody owned the schedule fires once, for the latest missed time, not
//! once per missed time.
//!
//! Timeliness: the owner looks at its schedules every [`TICK`], so a fire leaves within that of
//! its cron time (plus the transaction's commit).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::delay::Router;
use crate::kafka::group::OffRuntime;
use crate::kafka::record::Record;
use crate::kafka::transaction::{Outgoing, TxProducer};
use crate::kafka::{client_config, Role, SetupError};
use crate::model::ids;
use crate::model::now_ms;
use crate::model::schedule::{
    CronSpec, ScheduleFire, ScheduleRecord, Target, SCHEDULE_FIRE_VERSION,
};
use crate::state::writer::created_event;
use crate::state::Views;

/// How often the owner looks for due schedules.
pub const TICK: Duration = Duration::from_millis(200);
/// librdkafka key choosing how partitions are assigned.
const ASSIGNOR_KEY: &str = "partition.assignment.strategy";
/// Range: partition `p` of every subscribed topic goes to the same member.
const RANGE_ASSIGNOR: &str = "range";
/// Timeout of the seek that makes a taken-over partition be read from its beginning.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait after a failed fire before the schedule is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Key of the barrier records a new owner writes to know when it has read a partition to its end
/// (schedule ids cannot contain `~`).
const BARRIER_KEY: &str = "~barrier";

/// Where the scheduler reads and writes.
#[derive(Clone)]
pub struct SchedulerTopics {
    pub schedules: String,
    pub fires: String,
    pub events: String,
    /// Prefix of the per-partition transactional identities.
    pub identity_prefix: String,
}

/// The partitions of the schedules topic this member is assigned now, each with the number of the
/// assignment that gave it (so a partition lost and given back between two looks is taken over
/// again, not kept as if nothing happened); the scheduler loop takes over (and lets go of)
/// partitions to match.
#[derive(Default)]
struct Assignment {
    partitions: HashMap<i32, u64>,
    assignments: u64,
}

struct AssignmentContext {
    schedules_topic: String,
    current: Arc<Mutex<Assignment>>,
}

impl ClientContext for AssignmentContext {}

impl ConsumerContext for AssignmentContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        crate::kafka::group::rebalance(self, consumer, err, tpl);
    }

    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        match rebalance {
            Rebalance::Assign(tpl) => {
                current.assignments += 1;
                let generation = current.assignments;
                for e in tpl.elements_for_topic(&self.schedules_topic) {
                    current.partitions.insert(e.partition(), generation);
                }
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements_for_topic(&self.schedules_topic) {
                    current.partitions.remove(&e.partition());
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "scheduler rebalance error"),
        }
    }
}

/// How far the owner is with one of its partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Read from the beginning; no schedule seen yet, so nothing to fence or fire (an idle
    /// partition costs no transactional producer).
    Idle,
    /// Fenced; waiting to read back the barrier records written in the schedules and the fires
    /// partition (`None` once read): everything before them, every fire the previous owner
    /// committed included, is then known.
    Arming(Option<i64>, Option<i64>),
    /// Fires what is due.
    Ready,
}

/// What the owner knows of one of its partitions.
struct Owned {
    /// The assignment that gave it.
    generation: u64,
    stage: Stage,
    /// The partition's transactional producer, from arming on.
    producer: Option<Arc<TxProducer>>,
    schedules: HashMap<String, ScheduleRecord>,
    fires: HashMap<String, ScheduleFire>,
    /// Schedules whose last fire failed: not before this time (unix ms).
    backoff: HashMap<String, i64>,
}

/// Fires schedules.
pub struct Scheduler {
    kafka: KafkaConfig,
    topics: SchedulerTopics,
    router: Router,
    views: Arc<Views>,
    transaction_timeout: Duration,
}

/// The scheduler's consumer, closed off the runtime whenever it is dropped.
type Inner = OffRuntime<StreamConsumer<AssignmentContext>>;

impl Scheduler {
    pub fn new(
        kafka: &KafkaConfig,
        topics: SchedulerTopics,
        router: Router,
        views: Arc<Views>,
    ) -> Self {
        let mut kafka = kafka.clone();
        kafka.group_id = kafka.scheduler_group_id.clone();
        Scheduler {
            transaction_timeout: kafka.transaction_timeout,
            kafka,
            topics,
            router,
            views,
        }
    }

    /// Joins the scheduler group and fires what it owns until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SetupError> {
        let current = Arc::new(Mutex::new(Assignment::default()));
        let mut config = client_config(&self.kafka, Role::Consumer)?;
        config.set(ASSIGNOR_KEY, RANGE_ASSIGNOR);
        let consumer: StreamConsumer<AssignmentContext> =
            config.create_with_context(AssignmentContext {
                schedules_topic: self.topics.schedules.clone(),
                current: current.clone(),
            })?;
        consumer.subscribe(&[&self.topics.schedules, &self.topics.fires])?;
        let consumer = Arc::new(OffRuntime::new(consumer));
        let mut owned: HashMap<i32, Owned> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                received = consumer.recv() => match received {
                    Ok(m) => self.take(&mut owned, &m),
                    Err(e) => tracing::warn!(error = %e, "scheduler consumer error"),
                },
                _ = tick.tick() => {
                    self.follow_assignment(&consumer, &current, &mut owned).await;
                    self.fire_due(&mut owned).await;
                }
            }
        }
        crate::kafka::group::leave(consumer).await;
        tracing::info!("scheduler stopped");
        Ok(())
    }

    /// Applies a record of an owned partition to the owner's copy.
    fn take(&self, owned: &mut HashMap<i32, Owned>, m: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(part) = owned.get_mut(&m.partition()) else {
            return; // not taken over yet: it is read again from the beginning when it is
        };
        let is_fire = m.topic() == self.topics.fires;
        if let Stage::Arming(schedules_barrier, fires_barrier) = &mut part.stage {
            let barrier = if is_fire {
                fires_barrier
            } else {
                schedules_barrier
            };
            if barrier.is_some_and(|b| m.offset() >= b) {
                *barrier = None;
            }
            if part.stage == Stage::Arming(None, None) {
                part.stage = Stage::Ready;
                tracing::info!(
                    partition = m.partition(),
                    schedules = part.schedules.len(),
                    "schedules partition read to its end; firing"
                );
            }
        }
        let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            return;
        };
        if key == BARRIER_KEY {
            return;
        }
        match (m.payload(), is_fire) {
            (None, false) => {
                part.schedules.remove(key);
            }
            (None, true) => {
                part.fires.remove(key);
            }
            (Some(bytes), false) => match ScheduleRecord::decode(bytes) {
                Ok(s) => {
                    part.schedules.insert(key.to_string(), s);
                }
                Err(e) => tracing::warn!(key, error = %e, "unreadable schedule record"),
            },
            (Some(bytes), true) => match ScheduleFire::decode(bytes) {
                Ok(f) => {
                    let newer = part
                        .fires
                        .get(key)
                        .is_none_or(|old| old.scheduled_at <= f.scheduled_at);
                    if newer {
                        part.fires.insert(key.to_string(), f);
                    }
                }
                Err(e) => tracing::warn!(key, error = %e, "unreadable schedule fire record"),
            },
        }
    }

    /// Lets go of partitions no longer assigned and takes over newly assigned ones (fencing their
    /// previous owner); a take-over that fails is tried again at the next tick while the
    /// partition is still assigned.
    async fn follow_assignment(
        &self,
        consumer: &Arc<Inner>,
        current: &Mutex<Assignment>,
        owned: &mut HashMap<i32, Owned>,
    ) {
        let assigned = current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .partitions
            .clone();
        owned.retain(|p, o| {
            let keep = assigned.get(p) == Some(&o.generation);
            if !keep {
                tracing::info!(partition = p, "schedules partition released");
            }
            keep
        });
        let new: Vec<(i32, u64)> = assigned
            .into_iter()
            .filter(|(p, _)| !owned.contains_key(p))
            .collect();
        for (p, generation) in new {
            // Read both partitions again from the beginning: the copy is rebuilt from Kafka
            // (records that arrived before now were not kept).
            let sought = [&self.topics.schedules, &self.topics.fires]
                .iter()
                .map(|topic| consumer.seek(topic, p, Offset::Beginning, SEEK_TIMEOUT))
                .collect::<Result<Vec<()>, _>>();
            if let Err(e) = sought {
                tracing::debug!(partition = p, error = %e, "seek to the beginning failed; will retry");
                continue;
            }
            owned.insert(
                p,
                Owned {
                    generation,
                    stage: Stage::Idle,
                    producer: None,
                    schedules: HashMap::new(),
                    fires: HashMap::new(),
                    backoff: HashMap::new(),
                },
            );
            tracing::info!(partition = p, "schedules partition taken over");
        }
        for (p, part) in owned.iter_mut() {
            if part.stage == Stage::Idle && !part.schedules.is_empty() {
                self.arm(*p, part).await;
            }
        }
    }

    /// A partition with schedules to fire: fences its previous owner (which aborts whatever it
    /// left open) and writes the barriers to read back before firing. A failure is tried again at
    /// the next tick.
    async fn arm(&self, p: i32, part: &mut Owned) {
        let producer = Arc::new(TxProducer::new(
            &self.kafka,
            format!("{}scheduler-{p}", self.topics.identity_prefix),
            self.transaction_timeout,
        ));
        if let Err(e) = producer.init().await {
            tracing::error!(partition = p, error = %e, "cannot fence the schedules partition's previous owner; will retry");
            return;
        }
        let barrier = |topic: &str| Outgoing {
            topic: topic.to_string(),
            partition: Some(p),
            key: BARRIER_KEY.to_string(),
            value: None,
            headers: Vec::new(),
        };
        match producer
            .write(&[barrier(&self.topics.schedules), barrier(&self.topics.fires)])
            .await
        {
            Ok(acks) if acks.len() == 2 => {
                part.stage = Stage::Arming(Some(acks[0].offset), Some(acks[1].offset));
                part.producer = Some(producer);
                tracing::debug!(
                    partition = p,
                    "schedules partition fenced; reading to its end"
                );
            }
            other => {
                tracing::warn!(partition = p, result = ?other.err(), "cannot mark the partition's end; will retry");
            }
        }
    }

    /// Fires every due schedule of the caught-up partitions.
    async fn fire_due(&self, owned: &mut HashMap<i32, Owned>) {
        let now = now_ms();
        for (p, part) in owned.iter_mut().filter(|(_, o)| o.stage == Stage::Ready) {
            let due: Vec<(ScheduleRecord, i64)> = part
                .schedules
                .values()
                .filter(|s| part.backoff.get(&s.schedule_id).is_none_or(|b| *b <= now))
                .filter_map(|s| {
                    let cron = CronSpec::parse(&s.cron).ok()?;
                    let last = part.fires.get(&s.schedule_id).map(|f| f.scheduled_at);
                    s.due(&cron, last, now).map(|at| (s.clone(), at))
                })
                .collect();
            for (schedule, at) in due {
                match self.fire(*p, part, &schedule, at, now).await {
                    Ok(fire) => {
                        part.backoff.remove(&schedule.schedule_id);
                        part.fires.insert(schedule.schedule_id.clone(), fire);
                    }
                    Err(e) => {
                        tracing::warn!(schedule_id = %schedule.schedule_id, error = %e, "schedule fire failed; will try again");
                        let retry = now + i64::try_from(RETRY_AFTER.as_millis()).unwrap_or(0);
                        part.backoff.insert(schedule.schedule_id.clone(), retry);
                    }
                }
            }
        }
    }

    /// Fires `schedule` for cron time `at`: its message (one per endpoint of a URL group), their
    /// CREATED events and the last-fire record, in one transaction.
    async fn fire(
        &self,
        partition: i32,
        part: &Owned,
        schedule: &ScheduleRecord,
        at: i64,
        now: i64,
    ) -> Result<ScheduleFire, crate::kafka::transaction::TxError> {
        let (targets, error) = self.targets(schedule);
        let envelopes: Vec<_> = targets
            .into_iter()
            .map(|target| {
                schedule.message.envelope(
                    ids::message_id(),
                    target,
                    schedule.queue_name.clone(),
                    Some(schedule.schedule_id.clone()),
                    now,
                )
            })
            .collect();
        let fire = ScheduleFire {
            v: SCHEDULE_FIRE_VERSION,
            schedule_id: schedule.schedule_id.clone(),
            scheduled_at: at,
            fired_at: now,
            message_ids: envelopes.iter().map(|e| e.message_id.clone()).collect(),
            error,
        };
        let mut records: Vec<Outgoing> = envelopes
            .iter()
            .map(|e| self.router.outgoing(e, now))
            .collect();
        records.extend(
            envelopes
                .iter()
                .map(|e| Outgoing::record(&self.topics.events, None, &created_event(e))),
        );
        records.push(Outgoing::record(&self.topics.fires, Some(partition), &fire));
        let producer = part
            .producer
            .as_ref()
            .expect("a partition is ready only once it has its producer");
        producer.write(&records).await?;
        tracing::debug!(
            schedule_id = %schedule.schedule_id,
            scheduled_at = at,
            late_ms = now - at,
            messages = fire.message_ids.len(),
            "schedule fired"
        );
        Ok(fire)
    }

    /// Where a fire goes: its URL, or every endpoint of its URL group (none, with the reason,
    /// when the group does not exist).
    fn targets(&self, schedule: &ScheduleRecord) -> (Vec<Target>, Option<String>) {
        let d = &schedule.destination;
        let lower = d.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            return (
                vec![Target {
                    url: d.clone(),
                    topic_name: None,
                    endpoint_name: None,
                }],
                None,
            );
        }
        match self.views.url_groups.get(d) {
            Some(group) if !group.endpoints.is_empty() => (
                group
                    .endpoints
                    .into_iter()
                    .map(|e| Target {
                        url: e.url,
                        topic_name: Some(group.name.clone()),
                        endpoint_name: e.name,
                    })
                    .collect(),
                None,
            ),
            _ => (Vec::new(), Some(format!("URL group {d:?} not found"))),
        }
    }
}
