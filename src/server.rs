//! Starting and stopping a kstash process: topics, producer, views, API, delivery worker, delay
//! stage, and (on the embedded cluster) the watch over what its partitions still hold, all under one
//! cancellation token.
//!
//! `start` returns once everything is listening, so a caller (main, or a test) can use the API at
//! once; `stop` is the graceful path (stop taking work, drain, commit, flush). A crash needs no
//! code: nothing is committed for unfinished work, so another process redelivers it.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::{self, auth::Tokens, AppState};
use crate::config::Config;
use crate::delay::{Delayer, Router};
use crate::delivery::destinations::DestinationLimits;
use crate::delivery::guard::DestinationPolicy;
use crate::delivery::http::{HttpDelivery, Timeouts};
use crate::delivery::outcome::Sink;
use crate::delivery::Deliverer;
use crate::health::Health;
use crate::kafka::consumer::{ConsumerSettings, ParallelConsumer};
use crate::kafka::dev_room::{self, Needs, Room};
use crate::kafka::embedded::EmbeddedCluster;
use crate::kafka::transaction::TxProducer;
use crate::kafka::{self, Producer, Role, SetupError};
use crate::model::flow::FlowLimits;
use crate::model::headers::Limits;
use crate::model::ids;
use crate::model::signing_keys::SigningKeysRecord;
use crate::poison::Quarantine;
use crate::schedule::{Scheduler, SchedulerTopics};
use crate::signing::Signer;
use crate::state::tail;
use crate::state::writer::Writer;
use crate::state::{Kind, Store, Views};
use crate::topics::{self, TopicNames};

/// Extra time `stop` allows beyond the shutdown grace for the API and final commits.
const STOP_MARGIN: Duration = Duration::from_secs(10);
/// How long `stop` waits for the producer to hand over queued records.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Kafka(#[from] SetupError),
    #[error("kafka consumer: {0}")]
    Consumer(#[from] rdkafka::error::KafkaError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    State(#[from] crate::state::store::StoreError),
    #[error("configuration: {0}")]
    Config(String),
}

/// A started kstash process.
pub struct Running {
    addr: SocketAddr,
    views: Arc<Views>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    producer: Producer,
    grace: Duration,
    _embedded: Option<Arc<EmbeddedCluster>>,
}

impl Drop for Running {
    /// Dropped without `stop` (a panic, an early return): still tell every task to end, so that
    /// blocking threads such as the state tailer do not outlive the process's runtime.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Running {
    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This process's views (tests look at and inject faults into them).
    pub fn views(&self) -> &Arc<Views> {
        &self.views
    }

    /// Graceful stop: stop taking requests and records, finish or hand back in-flight work,
    /// commit, flush.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let tasks = &mut self.tasks;
        let all_done = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.grace + STOP_MARGIN, all_done)
            .await
            .is_err()
        {
            tracing::warn!("shutdown took too long; aborting what is left");
            self.tasks.abort_all();
        }
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(FLUSH_TIMEOUT)).await;
        tracing::info!("kstash stopped");
    }
}

/// Starts every role. With `embedded`, runs on that in-process cluster (whose bootstrap servers
/// replace `kafka.brokers`); otherwise on the configured brokers.
pub async fn start(
    mut config: Config,
    embedded: Option<Arc<EmbeddedCluster>>,
) -> Result<Running, StartError> {
    if let Some(cluster) = &embedded {
        config.kafka.brokers = cluster.bootstrap_servers().to_string();
        // More partitions spread the mock's per-partition size limit over more room, where the
        // data is: messages, events, the DLQ. The small compacted settings topics keep theirs
        // (every partition is one more to poll, on an embedded cluster that shares the process).
        for key in topics::DEV_SCALED {
            if let Some(t) = config.topics.get_mut(*key) {
                t.partitions = config.dev.partitions;
            }
        }
    }
    kafka::check_passthrough(&config.kafka).map_err(SetupError::from)?;
    config.kafka.max_record_bytes = config.record_limit();
    let kafka::topics::Ensured {
        partitions,
        cluster_id,
    } = kafka::topics::ensure(&config.kafka, topics::specs(&config), embedded.as_deref()).await?;
    let names = TopicNames::of(&config);
    let (schedules, fires) = (
        names.state(Kind::Schedules),
        names.state(Kind::ScheduleFires),
    );
    if partitions.get(schedules) != partitions.get(fires) {
        return Err(SetupError::Topics(format!(
            "{schedules} and {fires} must have the same number of partitions (they have {:?} and {:?}): a schedule and its fires share a partition number",
            partitions.get(schedules),
            partitions.get(fires)
        ))
        .into());
    }
    // On the embedded cluster, what each partition still needs is counted (`dev_room.rs`).
    let room = embedded.as_ref().map(|_| Arc::new(Room::default()));
    let mut producer = Producer::new(&config.kafka)?;
    if let Some(room) = &room {
        producer = producer.with_room(room.clone());
    }
    let router = Router::new(
        producer.clone(),
        topics::ladder(&config),
        names.ready.clone(),
        names.delay.clone(),
    );
    let signer = Signer::new(&config.signing.current_key, &config.signing.next_key);
    let shutdown = CancellationToken::new();
    // A start that fails or is abandoned half-way (its future dropped) stops what it started.
    let abandoned = shutdown.clone().drop_guard();
    let mut tasks = JoinSet::new();

    // A store kept in `state.dir` is reused when it was built from this cluster and prefix: the
    // views then read only what is new since the last run.
    let identity = cluster_id.map(|cluster| format!("{cluster}|{}", config.kafka.topic_prefix));
    let store = Arc::new(Store::open(
        Some(config.state.dir.as_str())
            .filter(|d| !d.is_empty())
            .map(std::path::Path::new),
        config.state.cache_bytes,
        identity.as_deref(),
    )?);
    let views = Arc::new(Views::new(store.clone(), signer.clone()));
    let health = Health::default();
    crate::health::start_probe(&config.kafka, health.clone(), shutdown.clone())?;

    // The API listens from here on: /health answers at once (with the catch-up progress), /v2
    // answers 503 until the views reflect what Kafka already holds.
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| StartError::Bind(config.server.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Bind(config.server.listen, e))?;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut state = api_state(
        &config,
        producer.clone(),
        views.clone(),
        in_flight.clone(),
        health.clone(),
    );
    state.dev_room.clone_from(&room);
    let state_writer = state.writer.clone();
    let app = api::router(state);
    tasks.spawn(crate::listener::serve(
        listener,
        app,
        config.server.header_read_timeout,
        shutdown.clone(),
    ));

    let mut caught_up = tail::start(
        &config.kafka,
        names
            .state_topics()
            .map(|(kind, name)| (name.to_string(), kind))
            .collect(),
        views.clone(),
        health.clone(),
        shutdown.clone(),
    )?;
    let _ = caught_up.wait_for(|c| *c).await;
    // The configured keys seed the signing-keys topic when it holds nothing yet.
    if views.signer.record().is_none() {
        let seed = SigningKeysRecord::seed(&config.signing.current_key, &config.signing.next_key);
        if let Err(e) = state_writer.put(seed).await {
            tracing::warn!(error = %e, "could not seed the signing-keys topic; signing with the configured keys");
        }
    }
    tasks.spawn(prune_loop(
        store.clone(),
        config.state.clone(),
        dlq_retention(&config),
        shutdown.clone(),
    ));

    let http = HttpDelivery::new(
        signer.clone(),
        DestinationPolicy::new(config.delivery.allowed_networks.clone()),
        &config.delivery.user_agent,
        Timeouts {
            default: config.delivery.timeout,
            max: config.delivery.max_timeout,
        },
        config
            .delivery
            .proxy_url()
            .map_err(StartError::Config)?
            .as_ref(),
    )?;
    let consumer = ParallelConsumer::new(
        &kafka::client_config(&config.kafka, Role::Consumer).map_err(SetupError::from)?,
        ConsumerSettings {
            topics: vec![names.ready.clone()],
            max_in_flight: config.delivery.max_in_flight,
            commit_interval: config.delivery.commit_interval,
            shutdown_grace: config.server.shutdown_grace,
            lane_buffer: config.delivery.lane_buffer,
            max_buffered: config.delivery.max_buffered,
            commit_metadata_max_bytes: config.kafka.commit_metadata_max_bytes,
        },
    )?
    .with_in_flight_gauge(in_flight);
    let sink = Sink {
        producer: producer.clone(),
        router: router.clone(),
        events: names.state(Kind::Events).to_string(),
        dlq: names.state(Kind::Dlq).to_string(),
        pending: names.state(Kind::Pending).to_string(),
    };
    let limits = limits(&config);
    tasks.spawn(consumer.run(
        Deliverer::new(
            http,
            sink,
            views.clone(),
            limits.flow,
            DestinationLimits {
                max_in_flight: config.delivery.max_in_flight_per_host,
                breaker_failures: config.delivery.breaker_failures,
                breaker_open: config.delivery.breaker_open,
            },
            shutdown.clone(),
        ),
        shutdown.clone(),
    ));

    let mut delay_kafka = config.kafka.clone();
    delay_kafka.group_id = config.kafka.delay_group_id.clone();
    let delay_consumer = ParallelConsumer::new(
        &kafka::client_config(&delay_kafka, Role::Consumer).map_err(SetupError::from)?,
        ConsumerSettings {
            topics: names.delay.clone(),
            max_in_flight: config.delay.max_in_flight,
            commit_interval: config.delivery.commit_interval,
            // Held last stretches are handed back at once on shutdown; the next owner re-reads them.
            shutdown_grace: config.server.shutdown_grace,
            // The delay stage has no lanes.
            lane_buffer: config.delivery.lane_buffer,
            max_buffered: config.delivery.max_buffered,
            commit_metadata_max_bytes: config.kafka.commit_metadata_max_bytes,
        },
    )?;
    tasks.spawn(delay_consumer.run(
        Delayer::new(
            router.clone(),
            Quarantine::new(
                producer.clone(),
                names.state(Kind::Dlq).to_string(),
                "delay",
                shutdown.clone(),
            ),
            shutdown.clone(),
        ),
        shutdown.clone(),
    ));

    let scheduler = Scheduler::new(
        &config.kafka,
        SchedulerTopics {
            schedules: names.state(Kind::Schedules).to_string(),
            fires: names.state(Kind::ScheduleFires).to_string(),
            events: names.state(Kind::Events).to_string(),
            identity_prefix: config.kafka.topic_prefix.clone(),
        },
        router.clone(),
        views.clone(),
    );
    let scheduler_shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = scheduler.run(scheduler_shutdown).await {
            tracing::error!(error = %e, "the scheduler could not start; schedules do not fire");
        }
    });

    if let Some(room) = room {
        let count = |topic: &str| partitions.get(topic).copied().unwrap_or_default();
        let health = health.clone();
        let needs = Needs {
            groups: vec![
                (
                    config.kafka.group_id.clone(),
                    vec![(names.ready.clone(), count(&names.ready))],
                ),
                (
                    config.kafka.delay_group_id.clone(),
                    names.delay.iter().map(|t| (t.clone(), count(t))).collect(),
                ),
            ],
            views: names
                .state_topics()
                .map(|(_, t)| (t.to_string(), count(t)))
                .collect(),
            view_position: Arc::new(move |topic, partition| health.view_position(topic, partition)),
        };
        tasks.spawn(dev_room::watch(
            config.kafka.clone(),
            room,
            needs,
            config.dev.watchdog_interval,
            shutdown.clone(),
        ));
    }
    tracing::info!(%addr, brokers = %config.kafka.brokers, "kstash started");
    abandoned.disarm();
    Ok(Running {
        addr,
        views: views.clone(),
        shutdown,
        tasks,
        producer,
        grace: config.server.shutdown_grace,
        _embedded: embedded,
    })
}

/// The API's state for `config`: its writes go through `producer`, its reads to `views`, and
/// `in_flight` is the delivery stage's gauge (also used by tests that drive the router alone).
pub fn api_state(
    config: &Config,
    producer: Producer,
    views: Arc<Views>,
    in_flight: Arc<AtomicUsize>,
    health: Health,
) -> AppState {
    let names = TopicNames::of(config);
    let router = Router::new(
        producer.clone(),
        topics::ladder(config),
        names.ready.clone(),
        names.delay.clone(),
    );
    AppState {
        writer: Writer::new(
            producer,
            router,
            names,
            views,
            TxProducer::new(
                &config.kafka,
                // Process-unique: fan-outs of different processes never fence each other.
                format!("{}-api-{}", config.kafka.client_id, ids::instance_id()),
                config.kafka.transaction_timeout,
            ),
            config.state.long_delay_after,
        ),
        dedup_window: config.state.dedup_window,
        tokens: Tokens::new(config.auth.tokens.clone()),
        body_limit: config.server.body_limit,
        request_limits: crate::api::limits::RequestLimits::new(&config.server),
        batch_limit: config.server.batch_limit,
        limits: limits(config),
        max_queue_parallelism: config.queues.max_parallelism,
        global_parallelism: (config.delivery.max_in_flight, in_flight),
        health,
        dev_room: None,
        llm: crate::api::llm::Llm::new(&config.llm),
        management_limit: crate::api::rate_limit::ManagementLimit::new(&config.rate_limit),
    }
}

/// What a publish is checked against.
fn limits(config: &Config) -> Limits {
    Limits {
        max_delay: config.delay.max_delay,
        default_retries: config.delivery.default_retries,
        max_retries: config.delivery.max_retries,
        flow: FlowLimits {
            max_parallelism: config.flow_control.max_parallelism,
            max_rate: config.flow_control.max_rate,
            max_period: config.flow_control.max_period,
        },
    }
}

/// Default DLQ retention when the topic config does not set `retention.ms` (Kafka's default).
const DEFAULT_DLQ_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;

/// The DLQ topic's retention (ms), from `topics.dlq.config."retention.ms"`; -1 means forever.
fn dlq_retention(config: &Config) -> i64 {
    config
        .topic(Kind::Dlq.config_key())
        .config
        .get("retention.ms")
        .and_then(|v| v.parse::<i64>().ok())
        .map(|ms| if ms < 0 { i64::MAX } else { ms })
        .unwrap_or(DEFAULT_DLQ_RETENTION_MS)
}

/// Drops old events, DLQ entries past the DLQ topic's retention and expired dedup ids from the
/// local store every `prune_interval`.
async fn prune_loop(
    store: Arc<Store>,
    config: crate::config::StateConfig,
    dlq_retention_ms: i64,
    shutdown: CancellationToken,
) {
    let retention = i64::try_from(config.events_retention.as_millis()).unwrap_or(i64::MAX);
    let mut ticker = tokio::time::interval(config.prune_interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let store = store.clone();
        let now = crate::model::now_ms();
        let (events_cutoff, dlq_cutoff) = (
            now.saturating_sub(retention),
            now.saturating_sub(dlq_retention_ms),
        );
        match tokio::task::spawn_blocking(move || store.prune(events_cutoff, dlq_cutoff, now)).await
        {
            Ok(Ok(pruned)) if pruned > 0 => tracing::debug!(pruned, "pruned old events"),
            Ok(Err(e)) => tracing::warn!(error = %e, "pruning the state store failed"),
            _ => {}
        }
    }
}
